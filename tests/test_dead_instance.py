"""A dead (or paused) instance on a shared Redis: its members go offline for their peers.

Two instances share a private Redis. When one is killed with `kill -9`, the
other notices within the documented bound (redis_instances: DEAD_AFTER_S plus
a heartbeat) and tells each peer `session:presence` offline; the member then
resumes on the live instance. An instance paused past the bound finds itself
reaped when it wakes and closes its sockets with 1012, so its clients resume.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers import Client, ServerFactory, connect, resume
from redis_servers import RedisServer
from trio_websocket import ConnectionClosed

from redis_instances import DEAD_AFTER_S, HEARTBEAT_S, INSTANCES_KEY

pytestmark = pytest.mark.parametrize("store", ["redis"], indirect=True)

# The documented bound on noticing a dead instance, with a margin for a busy machine.
NOTICED_WITHIN_S = 10.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


async def pair_across(a: Client, b: Client) -> tuple[dict[str, object], dict[str, object]]:
    created = await a.create()
    joined = await b.join(str(created["code"]))
    await b.expect("session:paired")
    await a.expect("session:paired")
    return created, joined


async def test_the_peer_of_a_killed_instance_is_told_within_the_bound(
    tandem_factory: ServerFactory, tmp_path: Path, redis_server: RedisServer
) -> None:
    s1 = tandem_factory(data_dir=tmp_path / "one", REDIS_URL=redis_server.url())
    s2 = tandem_factory(data_dir=tmp_path / "two", REDIS_URL=redis_server.url())
    async with connect(s1) as a, connect(s2) as b:
        created, _joined = await pair_across(a, b)
        s1.kill()  # kill -9: no disconnect reaches Redis
        killed_at = time.monotonic()
        b.patience = NOTICED_WITHIN_S + 2
        presence = await b.expect("session:presence")
        noticed = time.monotonic() - killed_at
        assert presence == {"type": "session:presence", "client_id": created["client_id"], "online": False}
        assert noticed <= NOTICED_WITHIN_S, noticed
        assert noticed >= DEAD_AFTER_S - HEARTBEAT_S - 0.5, noticed  # not before the instance could be late
        async with connect(s2) as a2:  # A comes back on the live instance
            await resume(a2, created, 0)
            assert (await b.expect("session:presence"))["online"] is True
            assert await a2.message("back") == 1
            assert (await b.expect("message"))["data"] == "back"
    client = redis_server.client()
    try:  # the dead instance's entry was claimed; only s2's remains
        assert client.zcard(INSTANCES_KEY) == 1
    finally:
        client.close()


async def test_an_instance_paused_past_the_bound_closes_its_sockets_when_it_wakes(
    tandem_factory: ServerFactory, tmp_path: Path, redis_server: RedisServer
) -> None:
    s1 = tandem_factory(data_dir=tmp_path / "one", REDIS_URL=redis_server.url())
    s2 = tandem_factory(data_dir=tmp_path / "two", REDIS_URL=redis_server.url())
    async with connect(s1) as a, connect(s2) as b:
        created, _joined = await pair_across(a, b)
        s1.signal(signal.SIGSTOP)
        try:
            b.patience = NOTICED_WITHIN_S + 2
            presence = await b.expect("session:presence")
            assert presence["online"] is False
        finally:
            s1.signal(signal.SIGCONT)
        # Awake, s1 finds itself reaped at its next heartbeat and closes with 1012.
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(HEARTBEAT_S * 3 + 5):
            while True:
                await a.ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1012
        async with connect(s1) as a2:
            await resume(a2, created, 0)
            assert (await b.expect("session:presence"))["online"] is True


async def test_a_clean_shutdown_leaves_no_instance_entry(
    tandem_factory: ServerFactory, tmp_path: Path, redis_server: RedisServer
) -> None:
    s1 = tandem_factory(data_dir=tmp_path / "one", REDIS_URL=redis_server.url())
    async with connect(s1) as a:
        await a.create()
    client = redis_server.client()
    try:
        for _ in range(100):  # the first beat comes at start-up
            if client.zcard(INSTANCES_KEY) == 1:
                break
            await trio.sleep(0.05)
        assert client.zcard(INSTANCES_KEY) == 1
        assert s1.terminate() == 0
        assert client.zcard(INSTANCES_KEY) == 0
        assert not list(client.scan_iter(match="tandem:instance:*"))
    finally:
        client.close()
