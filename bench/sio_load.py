"""One load-generator process for figure 5's peer: python-socketio AsyncClients on asyncio.

The same shape as bench/load.py, "throughput" mode only: `pairs` pairs, each
two clients in one room (`join`, acked); both members emit `msg` with the same
~100-byte `data` and emit the next one when the callback ack comes. Prints
`ready`, waits for `go <t0>` on stdin, counts deliveries and acks in
[t0 + warmup, t0 + warmup + duration), prints `result`. Bounded like load.py.

    python -m bench.sio_load '<json config>'
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import socketio

from bench.common import emit_line, payload_data, raise_nofile
from bench.load import GO_TIMEOUT, MAX_SENDS, PAIR_TIMEOUT, Config, Stats

ACK_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0


class Window:
    def __init__(self, t0: int, config: Config) -> None:
        self.t0 = t0
        self.start = t0 + int(config.warmup * 1e9)
        self.end = self.start + int(config.duration * 1e9)
        self.stop = self.end + int(config.drain * 1e9)


def member(stats: Stats, window: list[Window]) -> Any:
    client = socketio.AsyncClient(reconnection=False)

    def on_msg(data: Any) -> None:
        now = time.monotonic_ns()
        w = window[0] if window else None
        if w is not None and w.start <= now < w.end:
            stats.delivered += 1
            stats.latencies_us.append((now - int(data["t"])) // 1000)

    client.on("msg", on_msg)
    return client


async def open_pair(url: str, room: str, stats: Stats, window: list[Window]) -> tuple[Any, Any]:
    a, b = member(stats, window), member(stats, window)
    async with asyncio.timeout(PAIR_TIMEOUT):
        for client in (a, b):
            await client.connect(url, transports=["websocket"], wait_timeout=PAIR_TIMEOUT)
            await client.call("join", room, timeout=PAIR_TIMEOUT)
    return a, b


async def closed_loop(client: Any, window: Window, stats: Stats) -> None:
    await asyncio.sleep(max(0.0, (window.t0 - time.monotonic_ns()) / 1e9))
    for _ in range(MAX_SENDS):
        now = time.monotonic_ns()
        if now >= window.end:
            return
        stats.sent += 1
        try:
            await client.call("msg", payload_data(now), timeout=ACK_TIMEOUT)
        except socketio.exceptions.TimeoutError:
            stats.errors += 1
            return
        if window.start <= time.monotonic_ns() < window.end:
            stats.acked += 1


async def stdin_line(reader: asyncio.StreamReader, patience: float) -> str:
    return (await asyncio.wait_for(reader.readline(), patience)).decode().strip()


async def main(config: Config) -> None:
    stats = Stats()
    window: list[Window] = []
    opened = time.monotonic()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    limit = asyncio.Semaphore(config.concurrency)

    async def one(i: int) -> tuple[Any, Any]:
        async with limit:
            return await open_pair(config.urls[0], f"s{config.seed}-{i}", stats, window)

    async with asyncio.timeout(config.setup_timeout):
        pairs = await asyncio.gather(*(one(i) for i in range(config.pairs)))
    emit_line("ready", {"pairs": len(pairs), "setup_s": round(time.monotonic() - opened, 2)})
    kind, _, t0 = (await stdin_line(reader, GO_TIMEOUT)).partition(" ")
    if kind != "go":
        raise RuntimeError(f"expected go, got {kind!r}")
    w = Window(int(t0), config)
    window.append(w)
    cpu: dict[str, float] = {}

    async def cpu_clock() -> None:
        await asyncio.sleep(max(0.0, (w.start - time.monotonic_ns()) / 1e9))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, (w.end - time.monotonic_ns()) / 1e9))
        cpu["end"] = time.process_time()

    async with asyncio.timeout((w.stop - time.monotonic_ns()) / 1e9 + ACK_TIMEOUT):
        await asyncio.gather(cpu_clock(), *(closed_loop(c, w, stats) for pair in pairs for c in pair))
        await asyncio.sleep(max(0.0, (w.stop - time.monotonic_ns()) / 1e9))
    emit_line(
        "result",
        {
            "pairs": len(pairs),
            "delivered": stats.delivered,
            "acked": stats.acked,
            "sent": stats.sent,
            "errors": stats.errors,
            "closed": stats.closed,
            "late_sends": 0,
            "cpu_s": round(cpu.get("end", 0.0) - cpu.get("start", 0.0), 4),
            "latencies_us": stats.latencies_us,
        },
    )
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await asyncio.gather(*(c.disconnect() for pair in pairs for c in pair), return_exceptions=True)


def run() -> None:
    raise_nofile()
    asyncio.run(main(Config.from_json(sys.argv[1])))


if __name__ == "__main__":
    run()
