"""One load-generator process: trio-websocket clients, several pairs, loopback only.

Run by bench/run.py as `python -m bench.load '<json config>'`:

1. Opens `pairs` pairs: the creator connects to urls[i % n], sends
   `session:create`; the joiner connects to urls[(i + 1) % n] and joins; both
   wait for `session:paired`. (Tandem and bench/bare_relay.py speak these frames.)
2. Prints `ready {...}` and waits for `go <t0>` on stdin (t0: CLOCK_MONOTONIC ns).
3. From t0, by mode:
   - "throughput": both members of every pair send `message:send` (a ~100-byte
     `data`) and send the next one when the ack comes: as fast as acks allow.
   - "rate": each member sends `rate` messages a second on a fixed schedule
     (random phase), without waiting for acks.
   The window counted is [t0 + warmup, t0 + warmup + duration); sending stops at
   its end, and frames still in flight get `drain` seconds to arrive.
4. Prints `result {...}`: messages delivered and acked in the window, delivery
   latencies (µs, send to receipt on the peer, from the send time carried in
   `data`), errors, and this process's CPU seconds in the window.

Every loop is bounded in count and time; every wait has a timeout.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from bench.common import emit_line, payload_text, raise_nofile

# Bounds of every loop: frames one connection handles, and messages one member sends.
MAX_FRAMES = 5_000_000
MAX_SENDS = 2_000_000
# How long the worker waits for `go` once ready.
GO_TIMEOUT = 900.0
PAIR_TIMEOUT = 30.0
PAIR_ATTEMPTS = 3


@dataclass
class Config:
    mode: str
    urls: list[str]
    pairs: int
    warmup: float = 2.0
    duration: float = 8.0
    drain: float = 1.0
    rate: float = 10.0  # per member, "rate" mode
    setup_timeout: float = 120.0
    concurrency: int = 40  # pairs being set up at once (Hypercorn's listen backlog is 100)
    seed: int = 0

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))


@dataclass
class Stats:
    delivered: int = 0  # `message` frames received in the window
    acked: int = 0  # acks received in the window
    sent: int = 0  # message:send frames sent (whole run)
    errors: int = 0
    closed: int = 0  # connections that closed during the run
    late_sends: int = 0  # "rate": sends more than 5 ms behind schedule
    latencies_us: list[int] = field(default_factory=list)


class Window:
    """The run's instants, in CLOCK_MONOTONIC ns, and their trio-clock equivalents."""

    def __init__(self, t0: int, config: Config) -> None:
        self.t0 = t0
        self.start = t0 + int(config.warmup * 1e9)
        self.end = self.start + int(config.duration * 1e9)
        self.stop = self.end + int(config.drain * 1e9)

    @staticmethod
    def trio_time(ns: int) -> float:
        return trio.current_time() + (ns - time.monotonic_ns()) / 1e9


async def open_pair(nursery: trio.Nursery, url_a: str, url_b: str) -> tuple[WebSocketConnection, WebSocketConnection]:
    """Create a session on A, join it on B, and wait until both are paired."""
    with trio.fail_after(PAIR_TIMEOUT):
        a = await connect_websocket_url(nursery, url_a)
        await a.send_message('{"type":"session:create","id":"c"}')
        created = orjson.loads(await a.get_message())
        if created.get("type") != "session:created":
            raise RuntimeError(f"create failed: {created}")
        b = await connect_websocket_url(nursery, url_b)
        await b.send_message(orjson.dumps({"type": "session:join", "id": "j", "code": created["code"]}).decode())
        for ws in (b, b, a):  # joined, paired on B; paired on A
            frame = orjson.loads(await ws.get_message())
            if frame.get("type") not in ("session:joined", "session:paired"):
                raise RuntimeError(f"join failed: {frame}")
        return a, b


async def setup(
    nursery: trio.Nursery, config: Config
) -> tuple[list[tuple[WebSocketConnection, WebSocketConnection]], int]:
    """Open the pairs, each tried up to PAIR_ATTEMPTS times; return them and how many failed.

    Each pair lives in a nursery of its own (in `nursery`), so that a failed
    attempt is dropped by cancelling it (closing a socket mid-handshake from
    another task trips trio-websocket), and the pair is held until `nursery` ends.
    """
    pairs: list[tuple[WebSocketConnection, WebSocketConnection] | None] = [None] * config.pairs
    failed = 0
    left = config.pairs
    all_done = trio.Event()
    limit = trio.CapacityLimiter(config.concurrency)
    n = len(config.urls)

    def settle() -> None:
        nonlocal left
        left -= 1
        if left <= 0:
            all_done.set()

    async def holder(i: int) -> None:
        nonlocal failed
        for attempt in range(PAIR_ATTEMPTS):
            try:
                async with trio.open_nursery() as own:
                    async with limit:
                        pairs[i] = await open_pair(own, config.urls[i % n], config.urls[(i + 1) % n])
                    settle()
                    await trio.sleep_forever()
            except Exception as exc:
                if pairs[i] is not None:
                    return  # broke after set-up: the run sees it closed
                print(f"pair {i} attempt {attempt + 1} failed: {exc!r}", file=sys.stderr)
        failed += 1
        settle()

    if config.pairs <= 0:
        all_done.set()
    for i in range(config.pairs):
        nursery.start_soon(holder, i)
    with trio.move_on_after(config.setup_timeout):
        await all_done.wait()
    done = [p for p in pairs if p is not None]
    return done, config.pairs - len(done)


def handle_frame(text: str | bytes, window: Window, stats: Stats) -> bool:
    """Account for one received frame; True when it answers this member's send."""
    frame = orjson.loads(text)
    kind = frame.get("type")
    if kind == "message":
        now = time.monotonic_ns()
        if window.start <= now < window.end:
            stats.delivered += 1
            stats.latencies_us.append((now - frame["data"]["t"]) // 1000)
        return False
    if kind == "message:ack":
        now = time.monotonic_ns()
        if window.start <= now < window.end:
            stats.acked += 1
        return True
    if kind == "error":
        stats.errors += 1
        return "id" in frame
    return False


async def closed_loop_member(ws: WebSocketConnection, window: Window, stats: Stats, ids: int) -> None:
    """ "throughput": send, wait for the ack, send the next; receive the peer's messages meanwhile."""
    await trio.sleep_until(window.trio_time(window.t0))
    with trio.move_on_at(window.trio_time(window.stop)):
        try:
            stats.sent += 1
            await ws.send_message(payload_text(ids, time.monotonic_ns()))
            for _ in range(MAX_FRAMES):
                if handle_frame(await ws.get_message(), window, stats) and time.monotonic_ns() < window.end:
                    ids += 1
                    stats.sent += 1
                    await ws.send_message(payload_text(ids, time.monotonic_ns()))
        except ConnectionClosed:
            stats.closed += 1


async def scheduled_member(ws: WebSocketConnection, window: Window, stats: Stats, rate: float, ids: int) -> None:
    """ "rate": send on a fixed schedule, and receive acks and the peer's messages."""
    period = int(1e9 / rate)
    first = window.t0 + random.randrange(period)

    async def sender() -> None:
        nonlocal ids
        for k in range(MAX_SENDS):
            due = first + k * period
            if due >= window.end:
                return
            await trio.sleep_until(window.trio_time(due))
            now = time.monotonic_ns()
            if now - due > 5_000_000:
                stats.late_sends += 1
            ids += 1
            stats.sent += 1
            await ws.send_message(payload_text(ids, now))

    with trio.move_on_at(window.trio_time(window.stop)):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                for _ in range(MAX_FRAMES):
                    handle_frame(await ws.get_message(), window, stats)
        except ConnectionClosed:
            stats.closed += 1


async def read_stdin_line(patience: float) -> str:
    with trio.fail_after(patience):
        line: str = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    return line.strip()


async def main(config: Config) -> None:
    random.seed(config.seed)
    stats = Stats()
    opened = time.monotonic()
    async with trio.open_nursery() as connections:
        pairs, failed = await setup(connections, config)
        emit_line("ready", {"pairs": len(pairs), "failed": failed, "setup_s": round(time.monotonic() - opened, 2)})
        command = await read_stdin_line(GO_TIMEOUT)
        cpu = {"start": 0.0, "end": 0.0}
        kind, _, t0 = command.partition(" ")
        if kind != "go":
            raise RuntimeError(f"expected go, got {command!r}")
        window = Window(int(t0), config)

        async def cpu_clock() -> None:
            await trio.sleep_until(window.trio_time(window.start))
            cpu["start"] = time.process_time()
            await trio.sleep_until(window.trio_time(window.end))
            cpu["end"] = time.process_time()

        async with trio.open_nursery() as run:
            run.start_soon(cpu_clock)
            for i, (a, b) in enumerate(pairs):
                for j, ws in enumerate((a, b)):
                    ids = (i * 2 + j) * 10_000_000
                    if config.mode == "throughput":
                        run.start_soon(closed_loop_member, ws, window, stats, ids)
                    else:
                        run.start_soon(scheduled_member, ws, window, stats, config.rate, ids)
        emit_line(
            "result",
            {
                "pairs": len(pairs),
                "delivered": stats.delivered,
                "acked": stats.acked,
                "sent": stats.sent,
                "errors": stats.errors,
                "closed": stats.closed,
                "late_sends": stats.late_sends,
                "cpu_s": round(cpu["end"] - cpu["start"], 4),
                "latencies_us": stats.latencies_us,
            },
        )
        connections.cancel_scope.cancel()  # drop the sockets; the servers are stopped next


def run() -> None:
    raise_nofile()
    trio.run(main, Config.from_json(sys.argv[1]))


if __name__ == "__main__":
    run()
