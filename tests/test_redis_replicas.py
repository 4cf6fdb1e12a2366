"""Redis replicas and cluster seeds end to end: what an ack promises, and starting without Redis.

Real `python server.py` processes on private redis-servers: a master with a
replica (`REDIS_ACK_REPLICAS`: an ack waits until the replica holds the
write), and Redis Clusters named by several seed nodes (an instance starts
while none answers, or while the first is dead and its replica took over).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import Client, Frame, Server, ServerFactory, call, connect, eventually, http_get, paired
from redis_servers import RedisCluster3, RedisFactory, RedisServer

import config

HASH_KEY = "replicas-test-hash-key-0123456789"  # instances agree on keys without asking Redis
ACK_TIMEOUT = "1.0"  # generous: a busy machine delays a replica's answer
# A short cluster-node-timeout: a dead master's replica takes over within a few seconds.
NODE_TIMEOUT_MS = 1500


def history_on(server: RedisServer, code: str) -> list[bytes]:
    """The session's history list as `server` holds it (a replica answers reads too)."""
    client = server.client(single_connection_client=True)
    try:
        if server.cluster:
            client.readonly()  # a cluster replica answers reads of its master's slots
        entries = client.lrange(f"tandem:{{{code}}}:h", 0, -1)
        return [e if isinstance(e, bytes) else e.encode() for e in entries]
    finally:
        client.close()


def ready(server: Server) -> int:
    return http_get(server.http + "/health/ready", timeout=5.0)[0]


async def send(client: Client, data: Any, mid: str, inbox: list[Frame]) -> Frame:
    return await call(client, "message:send", inbox, data=data, mid=mid)


def master_and_replica(private_redis: RedisFactory) -> tuple[RedisServer, RedisServer]:
    master = private_redis(appendonly=True)
    replica = private_redis(appendonly=True, replica_of=master)
    replica.wait_replicated()
    return master, replica


# --- REDIS_ACK_REPLICAS on one master and its replica -----------------------------------------


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_with_ack_replicas_an_ack_means_the_replica_holds_the_message(
    private_redis: RedisFactory, tandem_factory: ServerFactory
) -> None:
    master, replica = master_and_replica(private_redis)
    server = tandem_factory(REDIS_URL=master.url(), REDIS_ACK_REPLICAS="1", REDIS_ACK_TIMEOUT=ACK_TIMEOUT)
    async with paired(server) as (a, b, created, _):
        inbox: list[Frame] = []
        first = await send(a, "one", "m1", inbox)
        assert first["type"] == "message:ack" and first["seq"] == 1, first
        assert len(history_on(replica, created["code"])) == 1  # there before the ack came
        assert (await b.expect("message"))["seq"] == 1

        replica.pause()  # it receives nothing now: no ack can be given
        try:
            refused = await send(a, "two", "m2", inbox)
            assert refused["type"] == "error" and refused["code"] == "unavailable", refused
            assert refused["retry_after"] > 0
        finally:
            replica.resume()
        # The master stored it and the peer got it; the resend is acknowledged
        # once the replica confirms, with the original seq, stored once.
        assert (await b.expect("message"))["seq"] == 2
        retried = None
        for _ in range(50):
            retried = await send(a, "two", "m2", inbox)
            if retried["type"] == "message:ack":
                break
            await trio.sleep(0.1)
        assert retried is not None and retried["type"] == "message:ack", retried
        assert retried["seq"] == 2 and retried["duplicate"] is True, retried
        assert len(history_on(replica, created["code"])) == 2
        await b.nothing(0.3)  # delivered once

        master.kill()  # the master is lost: everything acknowledged is on the replica
        assert [entry.split(b"|")[0] for entry in history_on(replica, created["code"])] == [b"1", b"2"]


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_without_ack_replicas_an_ack_follows_the_master_alone(
    private_redis: RedisFactory, tandem_factory: ServerFactory
) -> None:
    """What docs/setup.md, "What an ack promises", says: a failover may lose an acknowledged message."""
    master, replica = master_and_replica(private_redis)
    server = tandem_factory(REDIS_URL=master.url())
    async with paired(server) as (a, _b, created, _):
        replica.pause()  # it reads nothing of the replication stream now
        try:
            acked = await send(a, "only on the master", "m1", [])
            assert acked["type"] == "message:ack" and acked["seq"] == 1, acked
            master.kill()
            replica.kill()  # before it read what reached its socket
        finally:
            replica.resume()
        replica.start()  # from its own append-only file: what a promoted replica would hold
        assert history_on(replica, created["code"]) == []


# --- a cluster from several seeds ----------------------------------------------------------


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_an_instance_starts_while_no_seed_answers_and_serves_once_the_cluster_is_up(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    nodes = RedisCluster3(tmp_path / "cluster")  # its ports are known; nothing listens yet
    try:
        server = tandem_factory(REDIS_URL=nodes.seeds, REDIS_CLUSTER="1", HASH_KEY=HASH_KEY)
        assert http_get(server.http + "/health/live", timeout=5.0)[0] == 200
        assert ready(server) == 503
        async with connect(server) as early:
            refused = await early.request("session:create")
            assert refused["type"] == "error" and refused["code"] == "unavailable", refused

        await trio.to_thread.run_sync(nodes.start)
        await eventually(lambda: ready(server), 200, within=15)
        async with paired(server) as (a, b, _, _):
            assert await a.message("hello") == 1
            assert (await b.expect("message"))["data"] == "hello"
        assert "listener_crashed" not in server.output()
    finally:
        nodes.stop()


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_an_instance_starts_while_the_first_seed_is_dead_and_its_replica_took_over(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    nodes = RedisCluster3(tmp_path / "cluster", replicas=1, node_timeout_ms=NODE_TIMEOUT_MS).start()
    try:
        first = nodes.nodes[0]
        assert first.role() == "master"
        first.kill()
        await trio.to_thread.run_sync(nodes.wait_failover)  # a replica serves its slots now

        server = tandem_factory(REDIS_URL=nodes.seeds, REDIS_CLUSTER="1", HASH_KEY=HASH_KEY)
        await eventually(lambda: ready(server), 200, within=15)
        for _ in range(6):  # sessions land on every master, the promoted replica's included
            async with paired(server) as (a, b, _, _):
                assert await a.message("hello") == 1
                assert (await b.expect("message"))["data"] == "hello"
    finally:
        nodes.stop()


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_on_a_cluster_an_ack_waits_for_the_replica_of_the_sessions_master(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    nodes = RedisCluster3(tmp_path / "cluster", replicas=1, node_timeout_ms=5000).start()
    try:
        server = tandem_factory(
            REDIS_URL=nodes.seeds,
            REDIS_CLUSTER="1",
            HASH_KEY=HASH_KEY,
            REDIS_ACK_REPLICAS="1",
            REDIS_ACK_TIMEOUT=ACK_TIMEOUT,
        )
        async with paired(server) as (a, b, created, _), paired(server) as (c, _d, other, _):
            inbox: list[Frame] = []
            assert (await send(a, "one", "m1", inbox))["seq"] == 1
            master = nodes.owner(f"tandem:{{{created['code']}}}:s")
            replica = nodes.replica_of(master)
            assert len(history_on(replica, created["code"])) == 1
            assert (await b.expect("message"))["seq"] == 1
            elsewhere = nodes.owner(f"tandem:{{{other['code']}}}:s") is not master

            replica.pause()
            try:
                refused = await send(a, "two", "m2", inbox)
                assert refused["type"] == "error" and refused["code"] == "unavailable", refused
                # A session on another master (and its replica) is not held up.
                reply = await send(c, "other", "m1", [])
                assert (reply["type"] == "message:ack") == elsewhere, reply
            finally:
                replica.resume()
            assert (await b.expect("message"))["seq"] == 2
            retried: Frame = {}
            for _ in range(50):
                retried = await send(a, "two", "m2", inbox)
                if retried["type"] == "message:ack":
                    break
                await trio.sleep(0.1)
            assert retried.get("seq") == 2 and retried.get("duplicate") is True, retried
    finally:
        nodes.stop()


def test_several_seeds_need_redis_cluster() -> None:
    with pytest.raises(config.ConfigError, match="REDIS_CLUSTER=1 for several"):
        config.load({"REDIS_URL": "redis://:secret@127.0.0.1:7000,127.0.0.1:7001"}, None)
    with pytest.raises(config.ConfigError, match="REDIS_URL"):
        config.load({"REDIS_URL": "redis://127.0.0.1:7000,127.0.0.1", "REDIS_CLUSTER": "1"}, None)
    loaded = config.load({"REDIS_URL": "redis://127.0.0.1:7000,127.0.0.1:7001", "REDIS_CLUSTER": "1"}, None)
    assert loaded.redis_cluster


def test_seed_urls_keep_credentials_and_options_for_each_node() -> None:
    assert config.seed_urls("rediss://u:p%40w@h1:7000,h2:7001/0?ssl_ca_certs=/ca.pem") == [
        "rediss://u:p%40w@h1:7000/0?ssl_ca_certs=/ca.pem",
        "rediss://u:p%40w@h2:7001/0?ssl_ca_certs=/ca.pem",
    ]
    assert config.seed_urls("redis://h:6379") == ["redis://h:6379"]
