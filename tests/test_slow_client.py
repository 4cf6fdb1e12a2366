"""A client that stops reading mid-stream: bounded in time and memory, and its peer is not slowed.

The server's write to a peer that reads nothing blocks once the kernel's
buffers are full; Hypercorn shields that write from cancellation, so without a
timeout of its own the connection, its task and its queue lived until the
read timeout. With SEND_TIMEOUT the stalled write gives up and the connection
closes; the peer keeps getting its acks at full speed meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import trio
from helpers import STORES, ServerFactory, connect

BOTH = pytest.mark.parametrize("store", STORES, indirect=True)

PAYLOAD = "x" * 20_000
MAX_MESSAGES = 4000  # 80 MB at most, far more than loopback buffers hold
MAX_SECONDS = 20.0


async def metrics(http: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        import urllib.request

        request = urllib.request.Request(f"{http}/metrics", headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            body: dict[str, Any] = orjson.loads(response.read())
            return body

    return await trio.to_thread.run_sync(get)


@BOTH
async def test_a_client_that_stops_reading_is_closed_after_the_send_timeout(tandem_factory: ServerFactory) -> None:
    # The read timeout (PING_INTERVAL * 1.5 + 1 = 91 s) and the queue limits are
    # far away: only the send timeout can end the stalled connection in time.
    server = tandem_factory(
        SEND_TIMEOUT="1", PING_INTERVAL="60", SEND_QUEUE_FRAMES="100000", SEND_QUEUE_BYTES=str(512 * 2**20)
    )
    async with connect(server) as a, connect(server) as b:  # b: trio-websocket's default queue of 1
        created = await a.create()
        joined = await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
        rss_start = server.rss_kib()
        started = time.monotonic()
        slowest_ack = 0.0
        offline_after: float | None = None
        sent = 0
        while sent < MAX_MESSAGES and time.monotonic() - started < MAX_SECONDS:  # from here on B reads nothing
            asked = time.monotonic()
            await a.send({"type": "message:send", "id": sent, "data": PAYLOAD})
            frame = await a.recv()
            while frame["type"] == "session:presence":
                assert frame == {"type": "session:presence", "client_id": joined["client_id"], "online": False}
                offline_after = time.monotonic() - started
                frame = await a.recv()
            assert frame["type"] == "message:ack" and frame["id"] == sent, frame
            slowest_ack = max(slowest_ack, time.monotonic() - asked)
            sent += 1
            if offline_after is not None:
                break
        assert offline_after is not None, f"B was not dropped within {MAX_SECONDS} s ({sent} messages sent)"
        assert offline_after < 10, offline_after
        assert slowest_ack < 2.0, f"A waited {slowest_ack:.2f} s for an ack while B stalled"
        # The stalled connection is gone from the server, not only offline (/metrics
        # is rendered at most once a second: ask until it says so, within bounds).
        for _ in range(40):
            if (await metrics(server.http))["connections"]["open"] == 1:
                break
            await trio.sleep(0.25)
        else:
            raise AssertionError("the stalled connection is still open on the server")
        growth_mib = (server.rss_kib() - rss_start) / 1024
        assert growth_mib < 100, f"server RSS grew by {growth_mib:.1f} MiB"
        assert await a.message("still served") == sent + 1
