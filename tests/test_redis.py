"""The Redis store end to end: real `python server.py` processes on a real Redis.

Several Tandem instances share one Redis (the shared one at 127.0.0.1:6379,
or a private `redis-server` where a test stops, kills or inspects all of it,
or a private 3-master Redis Cluster). What is checked is what clients see
(replies, events, seqs, close codes, health probes) and what Redis holds
(keys, TTLs, shard-channel subscribers, the commands a message costs).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import trio
from helpers import (
    SHARED_REDIS_URL,
    Client,
    Server,
    ServerFactory,
    assert_no_trace,
    call,
    check_redis,
    connect,
    eventually,
    expect_messages,
    frames_until_close,
    http_get,
    log_lines,
    resume,
)
from redis_servers import REDIS_CLI, RedisCluster3, RedisFactory, RedisServer, TlsFiles
from trio_websocket import ConnectionClosed, connect_websocket_url

import redaction
from redis_scripts import SCRIPTS
from redis_store import SHARED_SECRET_KEY

# --- backends and instances ---------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """The Redis a group of Tandem instances shares: their settings, and every primary's URL."""

    name: str
    settings: dict[str, str]
    primaries: tuple[str, ...]

    def shard_subscribers(self, code: str) -> int:
        """Subscribers of the session's shard channel, over every primary (PUBSUB SHARDNUMSUB)."""
        total = 0
        for url in self.primaries:
            client = redis.Redis.from_url(url, socket_timeout=2.0)
            try:
                total += sum(int(n) for _, n in client.pubsub_shardnumsub(f"tandem:{{{code}}}:c"))
            finally:
                client.close()
        return total


@pytest.fixture(params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        check_redis(SHARED_REDIS_URL)
        return Backend("redis", {"REDIS_URL": SHARED_REDIS_URL}, (SHARED_REDIS_URL,))
    nodes: RedisCluster3 = request.getfixturevalue("cluster")
    return Backend("cluster", {"REDIS_URL": nodes.url, "REDIS_CLUSTER": "1"}, tuple(n.url() for n in nodes.nodes))


@pytest.fixture
def shared() -> Backend:
    check_redis(SHARED_REDIS_URL)
    return Backend("redis", {"REDIS_URL": SHARED_REDIS_URL}, (SHARED_REDIS_URL,))


def private_backend(server: RedisServer) -> Backend:
    return Backend("private", {"REDIS_URL": server.url()}, (server.url(),))


def instances(
    factory: ServerFactory, tmp_path: Path, backend: Backend, count: int = 2, **settings: str
) -> list[Server]:
    """`count` Tandem processes on one Redis, each with a DATA_DIR of its own."""
    return [factory(data_dir=tmp_path / f"data-{n}", **backend.settings, **settings) for n in range(count)]


# --- client helpers ---------------------------------------------------------------------


async def drain(client: Client, quiet: float = 0.5, limit: int = 10_000) -> list[dict[str, Any]]:
    """Every frame that arrives until none has for `quiet` s."""
    frames: list[dict[str, Any]] = []
    for _ in range(limit):
        with trio.move_on_after(quiet):
            frames.append(orjson.loads(await client.ws.get_message()))
            continue
        return frames
    raise AssertionError(f"more than {limit} frames")


async def paired_frames(*clients: Client) -> None:
    for client in clients:
        await client.expect("session:paired")


def http_status(server: Server, path: str) -> int:
    return http_get(server.http + path, timeout=5.0)[0]


async def status_of(server: Server, path: str) -> int:
    return await trio.to_thread.run_sync(http_status, server, path)


async def send_until_acked(client: Client, inbox: list[dict[str, Any]], label: str, within: float = 15.0) -> int:
    """After an outage: send (new data each time) until acked; only `unavailable` may come before."""
    deadline = trio.current_time() + within
    for attempt in range(200):
        reply = await call(client, "message:send", inbox, data={"label": label, "attempt": attempt})
        if reply["type"] == "message:ack":
            return int(reply["seq"])
        assert reply["type"] == "error" and reply["code"] == "unavailable", reply
        assert trio.current_time() < deadline, f"still unavailable after {within} s"
        await trio.sleep(0.2)
    raise AssertionError("never acked")


def assert_unavailable(reply: dict[str, Any]) -> None:
    assert reply["type"] == "error" and reply["code"] == "unavailable", reply
    assert isinstance(reply["retry_after"], (int, float)) and reply["retry_after"] > 0, reply


# --- two instances, one session ----------------------------------------------------------


async def test_two_instances_share_sessions_and_subscribe_only_where_members_are(
    backend: Backend, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    key = "two-instances-key-0123456789"  # one HASH_KEY: a code has one hash in both logs
    s1, s2 = instances(tandem_factory, tmp_path, backend, SESSION_IDLE_TIMEOUT="3", SWEEP_INTERVAL="0.1", HASH_KEY=key)
    subscribers = backend.shard_subscribers
    async with connect(s1) as a:
        created = await a.create()
        code, a_id = created["code"], created["client_id"]
        a_creds = {**created}
        await eventually(lambda: subscribers(code), 1)  # s1 only: s2 has no member

        async with connect(s2) as b:
            joined = await b.join(code)
            b_id = joined["client_id"]
            b_creds = {**joined, "code": code}
            await paired_frames(b, a)
            await eventually(lambda: subscribers(code), 2)
            assert await a.message("a to b") == 1
            frame = await b.expect("message")
            assert (frame["seq"], frame["from"], frame["data"]) == (1, a_id, "a to b")
            assert await b.message("b to a") == 2
            frame = await a.expect("message")
            assert (frame["seq"], frame["from"], frame["data"]) == (2, b_id, "b to a")

        # B's socket on s2 dropped: A on s1 is told, and s2 lets go of the channel.
        assert await a.expect("session:presence") == {"type": "session:presence", "client_id": b_id, "online": False}
        await eventually(lambda: subscribers(code), 1)
        missed = [await a.message({"missed": n}) for n in range(3)]
        assert missed == [3, 4, 5]

        async with connect(s1) as b2:  # B resumes on the other instance
            resumed = await resume(b2, b_creds, 2)
            assert resumed["last_seq"] == 5 and resumed["recovered"] is True
            assert {(c["client_id"], c["online"]) for c in resumed["clients"]} == {(a_id, True), (b_id, True)}
            replay = await expect_messages(b2, 3)
            assert [(m["seq"], m["data"]) for m in replay] == [(3 + n, {"missed": n}) for n in range(3)]
            await b2.nothing(0.2)
            assert await a.expect("session:presence") == {"type": "session:presence", "client_id": b_id, "online": True}
            await eventually(lambda: subscribers(code), 1)  # both members on s1

            async with connect(s2) as a2:  # A moves to s2 while online: s1 closes its old socket
                resumed = await resume(a2, a_creds, 2)
                assert resumed["last_seq"] == 5
                frames, close_code = await frames_until_close(a)
                assert (frames, close_code) == ([], 1000)
                await a2.nothing(0.2)  # its own messages are not replayed
                presence = await b2.expect("session:presence")
                assert presence == {"type": "session:presence", "client_id": a_id, "online": True}
                await eventually(lambda: subscribers(code), 2)

                assert await a2.message("live from s2") == 6
                frame = await b2.expect("message")
                assert (frame["seq"], frame["data"]) == (6, "live from s2")
                assert await b2.message("live from s1") == 7
                frame = await a2.expect("message")
                assert (frame["seq"], frame["data"]) == (7, "live from s1")

                # Idle: the session expires once; each member, on either instance, is told once.
                for client in (a2, b2):
                    client.patience = 10
                    assert await client.expect("session:expired") == {
                        "type": "session:expired",
                        "code": code,
                        "reason": "idle",
                    }
                await a2.nothing(0.5)
                await b2.nothing(0.1)
                await eventually(lambda: subscribers(code), 0)
                hashed = redaction.Redactor("hash", key.encode()).code(code)  # logs hold no codes
                expired = [e for s in (s1, s2) for e in log_lines(s, "session.expired") if e.get("session") == hashed]
                assert len(expired) == 1, expired
                reply = await a2.request("session:join", code=code)
                assert reply["type"] == "error" and reply["code"] == "not_found", reply
                assert_no_trace(s1, [code])


async def test_member_on_a_killed_instance_resumes_on_another_and_nothing_acked_is_lost(
    shared: Backend, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    s1, s2 = instances(tandem_factory, tmp_path, shared, HISTORY_SIZE="1000")
    async with connect(s2) as b:
        async with connect(s1) as a:
            created = await a.create()
            code = created["code"]
            joined = await b.join(code)
            await paired_frames(b, a)
            assert [await b.message({"b": n}) for n in range(3)] == [1, 2, 3]
            assert [m["seq"] for m in await expect_messages(a, 3)] == [1, 2, 3]

            # A pipelines a burst to s1; s1 is killed (-9) after 40 acks.
            acked: dict[int, int] = {}
            close_code = 0

            async def sender() -> None:
                for n in range(300):
                    try:
                        await a.send({"type": "message:send", "id": n, "data": {"a": n}})
                    except ConnectionClosed:
                        return

            async def reader() -> None:
                nonlocal close_code
                for _ in range(400):
                    try:
                        frame = orjson.loads(await a.ws.get_message())
                    except ConnectionClosed as exc:
                        close_code = int(exc.reason.code) if exc.reason is not None else 1006
                        return
                    assert frame["type"] == "message:ack", frame
                    acked[frame["id"]] = frame["seq"]
                    if len(acked) == 40:
                        s1.kill()

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    await reader()
                    nursery.cancel_scope.cancel()
        assert close_code == 1006
        assert len(acked) >= 40

        # B (on s2) got every acked message of A live, in order, once; maybe a
        # few more that were stored but whose ack died with s1.
        received = [f for f in await drain(b) if f["type"] == "message"]
        seqs = [f["seq"] for f in received]
        assert seqs == list(range(4, 4 + len(seqs))), seqs
        by_seq = {f["seq"]: f["data"] for f in received}
        for n, seq in acked.items():
            assert by_seq[seq] == {"a": n}
        newest = seqs[-1]

        # B writes on while A is away; A resumes on s2 and receives exactly those.
        away = [await b.message({"away": n}) for n in range(5)]
        assert away == list(range(newest + 1, newest + 6))
        async with connect(s2) as a2:
            resumed = await resume(a2, {**created}, 3)
            assert resumed["last_seq"] == away[-1] and resumed["recovered"] is True
            replay = await expect_messages(a2, 5)
            assert [(m["seq"], m["data"]) for m in replay] == [(s, {"away": n}) for n, s in enumerate(away)]
            await a2.nothing(0.2)
            presence = await b.expect("session:presence")
            assert presence["client_id"] == created["client_id"] and presence["online"] is True
            assert await a2.message("back") == away[-1] + 1
            frame = await b.expect("message")
            assert frame["data"] == "back"
            assert joined["client_id"] != created["client_id"]


# --- seams: subscribing, resubscribing ------------------------------------------------------


async def test_member_hopping_between_instances_misses_nothing_while_the_peer_keeps_sending(
    shared: Backend, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    s1, s2 = instances(tandem_factory, tmp_path, shared, HISTORY_SIZE="1000")
    total, hops = 500, 8
    async with connect(s1) as a, connect(s2) as b:
        created = await a.create()
        joined = await b.join(created["code"])
        b_creds = {**joined, "code": created["code"]}
        await paired_frames(b, a)
        acked: list[int] = []
        seen: list[int] = []  # every seq B received, over all its connections, in order
        hopped_mid_stream = 0

        async def keep_sending() -> None:
            inbox: list[dict[str, Any]] = []  # B's presence as it hops
            for n in range(total):
                reply = await call(a, "message:send", inbox, data=n)
                assert reply["type"] == "message:ack", reply
                acked.append(int(reply["seq"]))
                await trio.sleep(0.002)
            assert {f["type"] for f in inbox} <= {"session:presence"}, inbox

        async def read_messages(client: Client, until: int = total + 1) -> None:
            """Each connection's seqs continue `seen`: no gap, no repeat, in order."""
            for _ in range(total):
                if seen and seen[-1] >= until:
                    return
                frame = await client.recv()
                assert frame["type"] == "message", frame
                assert frame["seq"] == len(seen) + 1, (frame["seq"], seen[-3:])
                assert frame["data"] == len(seen)
                seen.append(frame["seq"])

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_sending)
                current = b
                for hop in range(hops):
                    with trio.move_on_after(0.1):
                        await read_messages(current)
                    await current.ws.aclose()
                    # To s1, where A is (subscribed), then to s2, where no member
                    # of the session is any more (it subscribes anew), and so on.
                    target = s1 if hop % 2 == 0 else s2
                    current = Client(await connect_websocket_url(nursery, target.url))
                    reply = await resume(current, b_creds, seen[-1] if seen else 0)
                    assert reply["recovered"] is True
                    hopped_mid_stream += len(acked) < total
                await read_messages(current, until=total)
                await current.ws.aclose()
        assert hopped_mid_stream >= 4, hopped_mid_stream
        assert acked == list(range(1, total + 1))
        assert seen == list(range(1, total + 1))


async def test_listener_killed_by_redis_is_restarted_counted_and_loses_nothing(
    private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    server = private_redis()
    s1, s2 = instances(tandem_factory, tmp_path, private_backend(server), HISTORY_SIZE="1000")
    total, kills = 300, 3
    killed: list[int] = []
    admin = server.client()
    try:
        async with connect(s1) as a, connect(s2) as b:
            created = await a.create()
            await b.join(created["code"])
            await paired_frames(b, a)
            seen: list[int] = []

            async def keep_sending() -> None:
                for n in range(total):
                    assert await a.message(n) == n + 1
                    if n % (total // (kills + 1)) == total // (kills + 1) - 1 and n < total - 10:
                        # Every pub/sub connection of both instances goes, mid-conversation.
                        killed.append(admin.client_kill_filter(_type="pubsub"))
                    await trio.sleep(0.002)

            async def receive() -> None:
                for _ in range(total):
                    frame = await b.expect("message")
                    assert frame["seq"] == len(seen) + 1 and frame["data"] == len(seen), frame
                    seen.append(frame["seq"])

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_sending)
                    await receive()
            assert seen == list(range(1, total + 1))
            assert len(killed) == kills and killed[0] == 2 and sum(killed) >= kills + 1, killed
            await b.nothing(0.3)
            for instance in (s1, s2):  # each restart was noticed and logged
                assert len(log_lines(instance, "redis.listener_disconnected")) >= 1, instance.output()[-2000:]
            assert await b.message("still live") == total + 1
            assert (await a.expect("message"))["data"] == "still live"
    finally:
        admin.close()


async def test_session_expiring_while_an_instance_cannot_listen_still_ends_for_its_members(
    private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    server = private_redis()
    admin = server.client()
    try:
        # s2 logs in as its own ACL user (a user name and password in the URL),
        # so that its listener can be kept from subscribing for a while.
        admin.acl_setuser("s2", enabled=True, passwords=["+s2-pass"], keys=["*"], channels=["*"], commands=["+@all"])
        backend = private_backend(server)
        s1 = tandem_factory(data_dir=tmp_path / "d1", REDIS_URL=server.url(), SESSION_IDLE_TIMEOUT="1.5")
        s2_url = f"redis://s2:s2-pass@127.0.0.1:{server.port}/0"
        s2 = tandem_factory(data_dir=tmp_path / "d2", REDIS_URL=s2_url, SESSION_IDLE_TIMEOUT="1.5")
        async with connect(s1) as a, connect(s2) as b:
            created = await a.create()
            code = created["code"]
            await b.join(code)
            await paired_frames(b, a)
            assert await a.message("hi") == 1
            assert (await b.expect("message"))["data"] == "hi"
            assert backend.shard_subscribers(code) == 2

            admin.acl_setuser("s2", enabled=True, commands=["-ssubscribe"])
            assert admin.client_kill_filter(_type="pubsub", user="s2") == 1
            a.patience = b.patience = 10
            expired = {"type": "session:expired", "code": code, "reason": "idle"}
            assert await a.expect("session:expired") == expired  # s1 heard it; s2 could not
            await eventually(lambda: backend.shard_subscribers(code), 0)

            admin.acl_setuser("s2", enabled=True, commands=["+ssubscribe"])
            assert await b.expect("session:expired") == expired  # s2 resubscribed and found it gone
            assert (await b.create())["code"] != code  # and the socket is free again
            assert log_lines(s2, "redis.listener_disconnected") + log_lines(s2, "redis.listener_crashed")
    finally:
        admin.close()


async def test_events_missed_while_an_instance_cannot_listen_are_caught_up(
    private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    """Presence, a peer's leave and a takeover, published while s2's listener
    could not subscribe, reach s2's members once it resubscribes."""
    server = private_redis()
    admin = server.client()
    try:
        admin.acl_setuser("s2", enabled=True, passwords=["+s2-pass"], keys=["*"], channels=["*"], commands=["+@all"])
        s1 = tandem_factory(data_dir=tmp_path / "d1", REDIS_URL=server.url())
        s2 = tandem_factory(data_dir=tmp_path / "d2", REDIS_URL=f"redis://s2:s2-pass@127.0.0.1:{server.port}/0")

        def deaf() -> None:  # s2's listener cannot subscribe until `hear`
            admin.acl_setuser("s2", enabled=True, commands=["-ssubscribe"])
            assert admin.client_kill_filter(_type="pubsub", user="s2") == 1

        def hear() -> None:
            admin.acl_setuser("s2", enabled=True, commands=["+ssubscribe"])

        # A's connection drops while s2 is deaf: B (on s2) is told A is offline.
        async with connect(s2) as b:
            async with connect(s1) as a:
                created = await a.create()
                joined = await b.join(created["code"])
                await paired_frames(b, a)
                deaf()
            await trio.sleep(0.3)  # A's disconnect is published to nobody on s2
            hear()
            b.patience = 10
            assert await b.expect("session:presence") == {
                "type": "session:presence",
                "client_id": created["client_id"],
                "online": False,
            }
            # A comes back, then leaves, while s2 is deaf: B is told both, once.
            deaf()
            async with connect(s1) as a2:
                await resume(a2, {**created, "code": created["code"]}, 0)
                assert (await a2.request("session:leave"))["type"] == "session:left"
            await trio.sleep(0.3)
            hear()
            assert await b.expect("session:peer_left") == {
                "type": "session:peer_left",
                "client_id": created["client_id"],
            }
            await b.nothing(0.5)
            # B's member is taken over on s1 while s2 is deaf: s2 closes B's socket with 1000.
            deaf()
            async with connect(s1) as b2:
                await resume(b2, {**joined, "code": created["code"]}, 0)
                await trio.sleep(0.3)
                hear()
                frames, code = await frames_until_close(b, 10)
                assert (frames, code) == ([], 1000)
    finally:
        admin.close()


# --- a Redis outage -----------------------------------------------------------------------------


async def test_redis_outage_gives_unavailable_then_service_resumes_without_restart(
    private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    server = private_redis(appendonly=True)
    s1, s2 = instances(tandem_factory, tmp_path, private_backend(server), HISTORY_SIZE="1000")
    async with connect(s1) as a, connect(s2) as b, connect(s1) as c, connect(s1) as idle:
        # Session 1: A (s1) and B (s2) stay connected. Session 2: C (s1) and D (s2); D drops.
        created = await a.create()
        await b.join(created["code"])
        await paired_frames(b, a)
        created2 = await c.create()
        async with connect(s2) as d:
            joined2 = await d.join(created2["code"])
            await paired_frames(d, c)
            assert [await a.message({"before": n}) for n in range(3)] == [1, 2, 3]
            assert [m["seq"] for m in await expect_messages(b, 3)] == [1, 2, 3]
            assert await b.message("b before") == 4
            assert (await a.expect("message"))["seq"] == 4
            assert [await c.message({"c": n}) for n in range(2)] == [1, 2]
            assert [m["seq"] for m in await expect_messages(d, 2)] == [1, 2]
            assert await status_of(s1, "/health/ready") == 200

            server.stop()  # SIGTERM: Redis writes its append-only file and exits
            assert not server.running

            a_inbox: list[dict[str, Any]] = []
            assert_unavailable(await call(a, "message:send", a_inbox, data="during"))
            assert_unavailable(await idle.request("session:create"))
            assert_unavailable(await d.request("message:send", data="during"))
        # D's socket dropped during the outage.

        pong = await call(a, "ping", a_inbox)  # the sockets stay open, the process lives
        assert pong["type"] == "pong"
        assert (await b.request("ping"))["type"] == "pong"
        for instance in (s1, s2):
            assert instance.proc is not None and instance.proc.poll() is None
            assert await status_of(instance, "/health/live") == 200
        await eventually(lambda: http_status(s1, "/health/ready"), 503, within=5)

        server.start()  # same port, same directory: the append-only file brings the data back

        # Retries succeed within a few seconds; live delivery both ways proves
        # that both instances subscribed again.
        seq = await send_until_acked(a, a_inbox, "after")
        b_inbox: list[dict[str, Any]] = []
        with trio.fail_after(10):
            for _ in range(100):
                b_inbox.append(await b.recv())
                if b_inbox[-1].get("seq") == seq:
                    break
        b_messages = [f for f in b_inbox if f["type"] == "message"]
        assert [f["seq"] for f in b_messages] == list(range(5, seq + 1)), b_inbox
        assert b_messages[-1]["data"]["label"] == "after"
        reply = await call(b, "message:send", b_inbox, data="b after")
        assert reply["type"] == "message:ack" and reply["seq"] == seq + 1, reply
        for _ in range(10):
            frame = await a.recv()
            if frame["type"] == "message":
                break
            a_inbox.append(frame)
        assert (frame["seq"], frame["data"]) == (seq + 1, "b after")
        assert all(f["type"] == "session:presence" for f in a_inbox), a_inbox

        c_inbox: list[dict[str, Any]] = []
        c_seq = await send_until_acked(c, c_inbox, "c after")
        async with connect(s2) as d2:  # D resumes from 0: nothing acked was lost
            resumed = await resume(d2, {**joined2, "code": created2["code"]}, 0)
            assert resumed["recovered"] is True and resumed["last_seq"] == c_seq
            replay = await expect_messages(d2, c_seq)
            assert [m["seq"] for m in replay] == list(range(1, c_seq + 1))
            assert [m["data"] for m in replay[:2]] == [{"c": 0}, {"c": 1}]
            assert replay[-1]["data"]["label"] == "c after"
        await eventually(lambda: http_status(s1, "/health/ready"), 200, within=5)
        await eventually(lambda: http_status(s2, "/health/ready"), 200, within=5)
        assert (await idle.request("session:create"))["type"] == "session:created"


async def test_cluster_master_outage_gives_unavailable_then_service_resumes(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    nodes = RedisCluster3(tmp_path / "cluster", appendonly=True).start()
    try:
        backend = Backend("cluster", {"REDIS_URL": nodes.url, "REDIS_CLUSTER": "1"}, ())
        s1, s2 = instances(tandem_factory, tmp_path, backend)
        async with connect(s1) as a, connect(s2) as b, connect(s1) as idle:
            created = await a.create()
            joined = await b.join(created["code"])
            await paired_frames(b, a)
            assert await a.message("before") == 1
            assert (await b.expect("message"))["seq"] == 1
            victim = nodes.owner(f"tandem:{{{created['code']}}}:s")

            victim.stop()  # the master of this session's slot goes away
            a_inbox: list[dict[str, Any]] = []
            assert_unavailable(await call(a, "message:send", a_inbox, data="during"))
            assert (await b.request("ping"))["type"] == "pong"
            assert await status_of(s1, "/health/live") == 200
            await trio.sleep(0.5)  # the sweepers of both instances run meanwhile
            for instance in (s1, s2):
                assert instance.proc is not None and instance.proc.poll() is None, instance.output()[-3000:]

            victim.start()  # same port, directory and node id: it takes its slots back
            nodes.wait_ok()
            seq = await send_until_acked(a, a_inbox, "after")
            b_inbox: list[dict[str, Any]] = []
            with trio.fail_after(10):
                for _ in range(100):
                    b_inbox.append(await b.recv())
                    if b_inbox[-1].get("seq") == seq:
                        break
            assert [f["seq"] for f in b_inbox if f["type"] == "message"] == list(range(2, seq + 1)), b_inbox
            reply = await call(b, "message:send", b_inbox, data="b after")
            assert reply["type"] == "message:ack" and reply["seq"] == seq + 1, reply
            async with connect(s1) as b2:  # the history survived the master's restart
                resumed = await resume(b2, {**joined, "code": created["code"]}, 0)
                assert resumed["last_seq"] == seq + 1
                replay = await expect_messages(b2, seq)
                assert [m["seq"] for m in replay] == list(range(1, seq + 1))
                assert replay[0]["data"] == "before"
            assert (await idle.request("session:create"))["type"] == "session:created"
            for instance in (s1, s2):
                assert instance.proc is not None and instance.proc.poll() is None, instance.output()[-3000:]
    finally:
        nodes.stop()


# --- keys -------------------------------------------------------------------------------------


def all_keys(client: redis.Redis) -> dict[str, int]:
    """Every key of the database and its PTTL (-1: none); keys gone since the SCAN are left out."""
    ttls = {key.decode(): int(client.pttl(key)) for key in client.scan_iter(count=1000)}
    return {key: ttl for key, ttl in ttls.items() if ttl != -2}


async def test_no_key_without_ttl_and_nothing_left_of_ended_or_expired_sessions(
    private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    server = private_redis()
    s1, s2 = instances(
        tandem_factory,
        tmp_path,
        private_backend(server),
        SESSION_IDLE_TIMEOUT="1.5",
        SWEEP_INTERVAL="0.1",
        HISTORY_SIZE="3",
        # As in production: rate limits on, so their keys (a member's beside its
        # session) are counted too; the per-IP ones are wide enough for this test.
        RATE_LIMIT_ENABLED="1",
        RATE_LIMIT_CONNECTIONS_IP="1000/60",
        RATE_LIMIT_MESSAGES_IP="1000/60",
    )
    admin = server.client()
    codes: list[str] = []
    try:
        async with connect(s1) as a, connect(s2) as b, connect(s1) as c, connect(s2) as d:
            # left: both members leave (messages past HISTORY_SIZE first).
            left = await a.create()
            left_b = await b.join(left["code"])
            await paired_frames(b, a)
            assert [await a.message(n) for n in range(5)] == [1, 2, 3, 4, 5]
            await expect_messages(b, 5)
            assert await b.message("b too") == 6
            await a.expect("message")
            # expiring: paired, members stay connected until it expires.
            expiring = await c.create()
            await d.join(expiring["code"])
            await paired_frames(d, c)
            assert await d.message("x") == 1
            await c.expect("message")
            # abandoned: created, a message, the creator goes away.
            async with connect(s2) as e:
                abandoned = await e.create()
                assert await e.message("bye") == 1
            codes = [left["code"], expiring["code"], abandoned["code"]]

            keys = all_keys(admin)
            assert keys, "no keys while three sessions live"
            # The instances' shared hash key is the one key meant to outlive every session.
            assert [k for k, ttl in keys.items() if ttl < 0 and k != SHARED_SECRET_KEY] == [], keys
            for code in codes:
                assert f"tandem:{{{code}}}:s" in keys
                assert any(k.startswith(f"tandem:{{{code}}}:rl:") for k in keys), keys  # a member's rate limit

            assert (await b.request("session:leave"))["type"] == "session:left"
            assert (await a.expect("session:peer_left"))["client_id"] == left_b["client_id"]
            limits = [k for k in all_keys(admin) if k.startswith(f"tandem:{{{left['code']}}}:rl:")]
            assert len(limits) == 1 and limits[0].endswith(":" + left["client_id"]), limits  # b's went with b
            assert (await a.request("session:leave"))["type"] == "session:left"
            assert [k for k in all_keys(admin) if left["code"] in k] == []

            for client in (c, d):
                client.patience = 10
                assert (await client.expect("session:expired"))["code"] == expiring["code"]

        assert_no_trace(s1, codes, within=5)
        keys = all_keys(admin)
        assert [k for k, ttl in keys.items() if ttl < 0 and k != SHARED_SECRET_KEY] == [], keys
        assert [k for k in keys if any(code in k for code in codes)] == [], keys
        # What is left belongs to no session: per-address rate limits, the
        # expiry index and the live instances' member sets (without these
        # sessions, once a heartbeat dropped what ended), the shared key.
        assert all(
            k.startswith(("tandem:rl:", "tandem:expiry:", "tandem:instance")) or k == SHARED_SECRET_KEY for k in keys
        ), keys
        for key in (k for k in keys if k.startswith("tandem:expiry:")):
            members = {m.decode() if isinstance(m, bytes) else str(m) for m in admin.zrange(key, 0, -1)}
            assert not set(codes) & members, (key, members)

        def instance_entries() -> list[str]:
            sets = admin.scan_iter(match="tandem:instance:*:members", count=1000)
            return [m.decode() if isinstance(m, bytes) else str(m) for key in sets for m in admin.smembers(key)]

        await eventually(lambda: [e for e in instance_entries() if e.split("|")[0] in codes], [], within=6)
    finally:
        admin.close()


def start_monitor(server: RedisServer, log_path: Path) -> subprocess.Popen[bytes]:
    """`redis-cli monitor`: every command Redis runs, one line each, into `log_path`."""
    with open(log_path, "wb") as out:
        return subprocess.Popen([REDIS_CLI, "-p", str(server.port), "monitor"], stdout=out)


async def test_a_relayed_message_is_one_redis_command(
    private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    server = private_redis()
    (s1,) = instances(tandem_factory, tmp_path, private_backend(server), count=1, SWEEP_INTERVAL="3600")
    log_path = tmp_path / "monitor.log"
    async with connect(s1) as a, connect(s1) as b:
        created = await a.create()
        await b.join(created["code"])
        await paired_frames(b, a)
        monitor = start_monitor(server, log_path)
        try:
            await eventually(lambda: b"OK" in log_path.read_bytes(), True)
            for n in range(20):
                assert await a.message(n) == n + 1
                assert (await b.expect("message"))["seq"] == n + 1
            await trio.sleep(0.2)
        finally:
            monitor.send_signal(signal.SIGTERM)
            monitor.wait(5)
    append = hashlib.sha1(SCRIPTS["append"].encode()).hexdigest()
    commands: list[str] = []
    appends = 0
    for line in log_path.read_text(errors="replace").splitlines():
        if '"' not in line or "lua]" in line:
            continue  # "OK", and the commands a script runs inside Redis
        words = line.split('"')
        commands.append(words[1].lower())
        appends += words[1].lower() == "evalsha" and words[3] == append
    # Besides the appends: pings, and the instance's heartbeat scripts (every 2 s).
    other = [c for c in commands if c not in ("evalsha", "ping")]
    assert appends == 20 and commands.count("evalsha") <= 20 + 4 and other == [], commands


# --- authentication and TLS ---------------------------------------------------------------------


async def test_password_in_the_url(private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path) -> None:
    server = private_redis(password="s3cret:/@pass")
    good = tandem_factory(data_dir=tmp_path / "good", REDIS_URL=server.url())
    async with connect(good) as a, connect(good) as b:
        created = await a.create()
        await b.join(created["code"])
        await paired_frames(b, a)
        assert await a.message("authenticated") == 1
        assert (await b.expect("message"))["data"] == "authenticated"
    assert await status_of(good, "/health/ready") == 200

    bad = tandem_factory(data_dir=tmp_path / "bad", REDIS_URL=server.url(password="wrong-password"))
    async with connect(bad) as c:
        assert_unavailable(await c.request("session:create"))
        assert (await c.request("ping"))["type"] == "pong"  # the socket stays open
    assert await status_of(bad, "/health/ready") == 503
    assert await status_of(bad, "/health/live") == 200
    assert bad.proc is not None and bad.proc.poll() is None
    assert "AuthenticationError" in bad.output()  # the log says why
    assert "wrong-password" not in bad.output() and "s3cret" not in good.output() + bad.output()


async def test_rediss_with_password(private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path) -> None:
    server = private_redis(password="tls-secret", tls=TlsFiles(tmp_path / "tls"))
    assert server.url().startswith("rediss://")
    s1 = tandem_factory(data_dir=tmp_path / "data", REDIS_URL=server.url())
    async with connect(s1) as a, connect(s1) as b:
        created = await a.create()
        await b.join(created["code"])
        await paired_frames(b, a)
        assert await a.message("over tls") == 1
        assert (await b.expect("message"))["data"] == "over tls"
    assert await status_of(s1, "/health/ready") == 200
