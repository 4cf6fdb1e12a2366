"""Hostile WebSocket and HTTP clients against a real server (hypercorn_fixes.py).

Malformed frames, sent from raw sockets with a hand-made upgrade and hand-made
masked frames, must close only their own connection with the RFC 6455 code;
permessage-deflate is off by default and, when on, inflation is bounded;
cleartext HTTP/2 is off by default and, when on, stream resets are bounded.
Cost figures (CPU seconds, RSS) are printed: run with -s to see them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gc
import itertools
import logging
import os
import random
import struct
import time
import types
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.errors
import h11
import hpack
import hypercorn.config
import hypercorn.trio
import hyperframe.frame
import orjson
import pytest
import trio
import trio.testing
from helpers import BOTH_STORES, Server, ServerFactory, connect, paired
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

import hypercorn_fixes

TIMEOUT = 5.0  # longest wait for any one reply from the server
MAX_FRAMES = 1000  # frames read while waiting for a close: a bound, never reached in practice
TEXT, CONT, CLOSE, PING, PONG = 0x1, 0x0, 0x8, 0x9, 0xA
FLOOD_SOCKETS = 60  # sockets per malformed frame in the crash test
FLOOD_PARALLEL = 16  # below MAX_SOCKETS_IP (64)
BOMB_INFLATED = 1000 * 2**20  # what the bomb inflates to: 1000 MiB from about 1 MiB
MIB = 2**20


# --- raw WebSocket by hand --------------------------------------------------------


def mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One client frame (masked, as RFC 6455 5.3 requires)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        header = bytes([first, 0x80 | n])
    elif n < 2**16:
        header = bytes([first, 0x80 | 126]) + struct.pack("!H", n)
    else:
        header = bytes([first, 0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return header + key + mask(payload, key)


# Each frame a server must refuse, with the close code RFC 6455 7.4.1 gives it.
MALFORMED: dict[str, tuple[bytes, int]] = {
    "invalid UTF-8": (masked_frame(TEXT, b'{"type":"\xff\xfe"}'), 1007),
    "reserved opcode 0x3": (masked_frame(0x3, b"x"), 1002),
    "reserved opcode 0xB": (masked_frame(0xB, b""), 1002),
    "RSV1 without compression": (masked_frame(TEXT, b"hello", rsv1=True), 1002),
    "continuation without a start": (masked_frame(CONT, b"x"), 1002),
}


class RawSocket:
    """A socket that did a hand-made WebSocket upgrade and reads server frames by hand."""

    def __init__(self, stream: trio.SocketStream, status: int, headers: dict[str, str], rest: bytes) -> None:
        self.stream = stream
        self.status = status
        self.headers = headers
        self.buffer = bytearray(rest)

    @classmethod
    async def open(cls, server: Server, extra: str = "") -> RawSocket:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        await stream.send_all(request.encode())
        head = bytearray()
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed during the handshake: {bytes(head)!r}"
                head += chunk
        text, _, rest = bytes(head).partition(b"\r\n\r\n")
        status_line, *lines = text.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        return cls(stream, int(status_line.split()[1]), headers, rest)

    async def _fill(self, n: int) -> bool:
        while len(self.buffer) < n:
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset: the server closed with our data unread
                return False
            if not chunk:
                return False
            self.buffer += chunk
        return True

    async def frame(self) -> tuple[int, bytes] | None:
        """The next server frame as (opcode, payload), None at the end of the stream."""
        if not await self._fill(2):
            return None
        opcode, n = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        start = 2
        if n >= 126:
            size = 2 if n == 126 else 8
            if not await self._fill(2 + size):
                return None
            n = int.from_bytes(self.buffer[2 : 2 + size], "big")
            start += size
        if not await self._fill(start + n):
            return None
        payload = bytes(self.buffer[start : start + n])
        del self.buffer[: start + n]
        return opcode, payload

    async def close_code(self) -> int | None:
        """The code of the server's close frame; None if the socket ends without one."""
        with trio.fail_after(TIMEOUT):
            for _ in range(MAX_FRAMES):
                got = await self.frame()
                if got is None:
                    return None
                opcode, payload = got
                if opcode == CLOSE:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        raise AssertionError(f"no close within {MAX_FRAMES} frames")

    async def send(self, data: bytes) -> bool:
        """Send `data`; False if the server closed first (it may stop reading mid-frame)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class DeflateClient:
    """A wsproto client that negotiated permessage-deflate: every frame it sends and reads is compressed."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[str] = []
        self.text = ""

    @classmethod
    async def open(cls, server: Server) -> DeflateClient:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws", extensions=[PerMessageDeflate()])))
        with trio.fail_after(TIMEOUT):
            while True:
                ws.receive_data(await stream.receive_some(65536))
                accepted = [e for e in ws.events() if isinstance(e, AcceptConnection)]
                if accepted:
                    assert [x.name for x in accepted[0].extensions] == ["permessage-deflate"], accepted
                    return cls(stream, ws)

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=orjson.dumps(message).decode())))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(TIMEOUT):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                assert data, "server closed the connection"
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, Ping):
                        await self.stream.send_all(self.ws.send(event.response()))
                    elif isinstance(event, TextMessage):
                        self.text += event.data
                        if event.message_finished:
                            self.pending.append(self.text)
                            self.text = ""
        frame = orjson.loads(self.pending.pop(0))
        assert isinstance(frame, dict)
        return frame

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# --- process figures ----------------------------------------------------------------


def reset_peak_rss(server: Server) -> None:
    """Make VmHWM (peak RSS) start again from the current RSS (proc(5), clear_refs)."""
    assert server.proc is not None
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")


def assert_healthy_log(server: Server) -> None:
    output = server.output()
    assert "Traceback" not in output, output[-4000:]
    assert "connection.crashed" not in output, output[-4000:]


async def raw_get(server: Server, path: str, extra: str = "") -> tuple[bytes, float]:
    """An HTTP/1.1 GET from a raw socket, `extra` header lines as they are: (what came back
    until the server closed, seconds it took)."""
    started = time.perf_counter()
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n".encode())
        reply = bytearray()
        with trio.fail_after(TIMEOUT):
            while len(reply) < 2**20:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                reply += chunk
    return bytes(reply), time.perf_counter() - started


# --- 0: one frame must not kill the server ---------------------------------------------


class Progress:
    """When each message of the pair arrived; `until(n)` waits for the n-th."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._next = trio.Event()

    def mark(self) -> None:
        self.times.append(time.monotonic())
        self._next.set()
        self._next = trio.Event()

    async def until(self, count: int) -> None:
        while len(self.times) < count:
            await self._next.wait()


async def chatter(server: Server, stop: trio.Event, progress: Progress) -> None:
    """A paired pair exchanging messages until `stop`: each message acknowledged and delivered."""
    async with paired(server) as (a, b, _created, _joined):
        for n in range(100_000):
            if stop.is_set():
                break
            sender, receiver = (a, b) if n % 2 == 0 else (b, a)
            await sender.message({"n": n})
            event = await receiver.expect("message")
            assert event["data"] == {"n": n}
            progress.mark()
            await trio.sleep(0.01)


async def attack(server: Server, data: bytes, delay: float) -> int | None:
    """Send one malformed frame `delay` s after the 101; the close code the server answers with."""
    sock = await RawSocket.open(server)
    try:
        assert sock.status == 101
        await trio.sleep(delay)
        await sock.send(data)
        return await sock.close_code()
    finally:
        await sock.aclose()


@BOTH_STORES
async def test_malformed_frames_never_kill_the_server(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(PING_INTERVAL="0.1")  # the lowest allowed: a ping races every close
    stop, progress = trio.Event(), Progress()
    rng = random.Random(6455)
    limit = trio.CapacityLimiter(FLOOD_PARALLEL)
    wrong: list[tuple[int, int | None]] = []

    async def one(data: bytes, code: int, delay: float) -> None:
        async with limit:
            got = await attack(server, data, delay)
        if got != code:
            wrong.append((code, got))

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter, server, stop, progress)
        with trio.fail_after(60):
            await progress.until(1)  # the pair is paired and talking before the attack starts
            async with trio.open_nursery() as flood:
                for data, code in MALFORMED.values():
                    for n in range(FLOOD_SOCKETS):
                        # The frame right after the 101 (when the first ping goes out) or
                        # anywhere within the ping interval: either way a ping races the close.
                        flood.start_soon(one, data, code, 0.0 if n % 2 else rng.random() * 0.1)
            finished = time.monotonic()
            count = len(progress.times)
            await progress.until(count + 5)  # and still afterwards
        stop.set()

    assert server.proc is not None and server.proc.poll() is None, server.output()[-4000:]
    # Served throughout: no pause in the pair's exchange of more than a second.
    assert max(b - a for a, b in itertools.pairwise([started, *progress.times])) < 1.0
    assert wrong == []  # each malformed socket got its close frame, race or not
    print(f"\n{len(MALFORMED) * FLOOD_SOCKETS} malformed sockets in {finished - started:.1f}s, {count} messages")
    assert_healthy_log(server)


# --- 1: RFC 6455 close codes -------------------------------------------------------------


@BOTH_STORES
async def test_a_malformed_frame_gets_its_close_code(tandem_factory: ServerFactory) -> None:
    server = tandem_factory()
    got: dict[str, int | None] = {}
    for kind, (data, _code) in MALFORMED.items():
        sock = await RawSocket.open(server)
        try:
            assert sock.status == 101
            await sock.send(data)
            got[kind] = await sock.close_code()
        finally:
            await sock.aclose()
    assert got == {kind: code for kind, (_data, code) in MALFORMED.items()}
    async with paired(server) as (a, b, _created, _joined):  # others are served as before
        await a.message("after")
        assert (await b.expect("message"))["data"] == "after"
    assert_healthy_log(server)


# --- 2: permessage-deflate ------------------------------------------------------------------


@functools.cache
def bomb() -> bytes:
    """One permessage-deflate message (RFC 7692: raw deflate, the 00 00 ff ff tail stripped)
    of about 1 MiB that inflates to BOMB_INFLATED bytes of zeros."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_RLE)  # RLE: as small, and quicker to build
    zeros = bytes(MIB)
    parts = [deflate.compress(zeros) for _ in range(BOMB_INFLATED // MIB)]
    parts.append(deflate.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(parts)
    assert data.endswith(hypercorn_fixes.DEFLATE_TAIL)
    return data[: -len(hypercorn_fixes.DEFLATE_TAIL)]


def deflated(text: str) -> bytes:
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    return (deflate.compress(text.encode()) + deflate.flush(zlib.Z_SYNC_FLUSH))[:-4]


OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


async def test_deflate_is_not_negotiated_by_default(tandem_factory: ServerFactory) -> None:
    server = tandem_factory()
    sock = await RawSocket.open(server, OFFER)
    try:
        assert sock.status == 101
        assert "sec-websocket-extensions" not in sock.headers, sock.headers
        # A compressed frame is a protocol error, not something to inflate.
        await sock.send(masked_frame(TEXT, deflated('{"type":"ping","id":1}'), rsv1=True))
        assert await sock.close_code() == 1002
    finally:
        await sock.aclose()
    assert_healthy_log(server)


@BOTH_STORES
async def test_compressed_messages_round_trip_when_enabled(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(WS_COMPRESSION="1")
    a = await DeflateClient.open(server)
    try:
        async with connect(server) as b:
            await a.send({"type": "session:create", "id": 1})
            created = await a.recv()
            assert created["type"] == "session:created", created
            await b.join(created["code"])
            await b.expect("session:paired")
            assert (await a.recv())["type"] == "session:paired"
            text = "compressible " * 500  # 6.5 kB, well under MAX_MESSAGE_BYTES inflated
            await a.send({"type": "message:send", "id": 2, "data": {"text": text}})
            assert (await a.recv())["type"] == "message:ack"
            assert (await b.expect("message"))["data"] == {"text": text}
            seq = await b.message({"back": text})
            assert (await a.recv())["seq"] == seq  # compressed by the server, inflated by wsproto
    finally:
        await a.aclose()
    assert_healthy_log(server)


async def send_bomb(server: Server) -> int | None:
    """Send one bomb frame while reading; the close code the server answers with."""
    sock = await RawSocket.open(server, OFFER)
    try:
        assert sock.status == 101
        assert sock.headers.get("sec-websocket-extensions", "").startswith("permessage-deflate")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sock.send, masked_frame(TEXT, bomb(), rsv1=True))
            code = await sock.close_code()
            nursery.cancel_scope.cancel()  # the server stops reading at once: the rest is never sent
        return code
    finally:
        await sock.aclose()


async def cost(server: Server, action: Callable[[], Awaitable[None]]) -> tuple[float, float, float]:
    """(CPU seconds, RSS growth MiB, peak RSS growth MiB) of the server during `action`."""
    bomb()  # built before measuring
    await trio.sleep(0.3)  # start-up work done
    rss, cpu = server.status_kib("VmRSS"), server.cpu_seconds()
    reset_peak_rss(server)
    await action()
    await trio.sleep(0.2)  # anything the server still does after answering counts too
    used = server.cpu_seconds() - cpu
    return used, (server.status_kib("VmRSS") - rss) / 1024, (server.status_kib("VmHWM") - rss) / 1024


async def test_a_compression_bomb_is_refused_cheaply(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(WS_COMPRESSION="1")
    codes: list[int | None] = []

    async def one_bomb() -> None:
        codes.append(await send_bomb(server))

    cpu, rss, peak = await cost(server, one_bomb)
    print(f"\none bomb ({len(bomb())} B, {BOMB_INFLATED // MIB} MiB inflated): cpu {cpu:.3f}s", end="")
    print(f" rss +{rss:.1f} MiB peak +{peak:.1f} MiB")
    assert codes == [1009]
    assert cpu < 0.1
    assert peak < 20

    latencies: list[float] = []

    async def five_bombs() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one_bomb)
            for n in range(100):  # probes every 10 ms, at least 5, until the bombs are answered
                reply, seconds = await raw_get(server, "/health/live")
                assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
                latencies.append(seconds)
                if len(codes) == 6 and n >= 4:
                    break
                await trio.sleep(0.01)

    cpu, rss, peak = await cost(server, five_bombs)
    print(f"five bombs at once: cpu {cpu:.3f}s rss +{rss:.1f} MiB peak +{peak:.1f} MiB", end="")
    print(f"; /health/live slowest {max(latencies):.3f}s of {len(latencies)}")
    assert codes == [1009] * 6
    assert cpu < 0.5
    assert peak < 40
    assert max(latencies) < 0.5

    # Compressed data that inflates to nothing is bounded too: empty stored blocks.
    empty_blocks = b"\x00\x00\x00\xff\xff" * (2 * 65536 // 5 + 1000)
    sock = await RawSocket.open(server, OFFER)
    try:
        await sock.send(masked_frame(TEXT, empty_blocks, rsv1=True))
        assert await sock.close_code() == 1009
    finally:
        await sock.aclose()
    assert_healthy_log(server)


# --- 3: cleartext HTTP/2 ------------------------------------------------------------------------


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_request(stream_id: int, path: str = "/health/live", port: int = 0) -> bytes:
    """A HEADERS frame of a GET with END_STREAM; the header block uses no dynamic table, so it can repeat."""
    block = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", f"127.0.0.1:{port}")],
        huffman=False,
    )
    return hyperframe.frame.HeadersFrame(stream_id, block, flags=["END_STREAM", "END_HEADERS"]).serialize()


def parse_h2(data: bytes) -> list[hyperframe.frame.Frame]:
    frames: list[hyperframe.frame.Frame] = []
    view = memoryview(data)
    while len(view) >= 9:
        parsed, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        parsed.parse_body(view[9 : 9 + length])
        frames.append(parsed)
        view = view[9 + length :]
    return frames


async def exchange(server: Server, data: bytes, until_eof: bool = True, wait: float = TIMEOUT) -> bytes:
    """Send `data` (concurrently) and return what comes back until EOF or reset, or until `wait` passes."""
    reply = bytearray()
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:

        async def send() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(data)  # the server may close before it read everything

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.move_on_after(wait) as scope:
                while len(reply) < 2**24:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    reply += chunk
            if until_eof:
                assert not scope.cancelled_caught, f"connection still open after {wait}s"
            nursery.cancel_scope.cancel()
    return bytes(reply)


async def test_cleartext_http2_is_refused_by_default(tandem_factory: ServerFactory) -> None:
    server = tandem_factory()
    settings = base64.urlsafe_b64encode(hyperframe.frame.SettingsFrame(0).serialize_body()).decode()
    reply, _ = await raw_get(
        server, "/health/live", f"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: {settings}\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]  # answered as HTTP/1.1, no 101

    preface = H2_PREFACE + hyperframe.frame.SettingsFrame(0).serialize() + h2_request(1, port=server.port)
    reply = await exchange(server, preface)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]  # and the connection closed
    assert_healthy_log(server)


async def test_http2_rapid_reset_gets_goaway(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(HTTP2_CLEARTEXT="1")
    start = H2_PREFACE + hyperframe.frame.SettingsFrame(0).serialize()

    # Enabled, HTTP/2 with prior knowledge works, and a client that cancels
    # fewer streams than the bound keeps its connection.
    cancel = h2.errors.ErrorCodes.CANCEL
    polite = b"".join(
        h2_request(i, port=server.port) + hyperframe.frame.RstStreamFrame(i, cancel).serialize()
        for i in range(1, 2 * (hypercorn_fixes.MAX_RESET_BURST // 2), 2)
    )
    last = hypercorn_fixes.MAX_RESET_BURST + 1
    reply = await exchange(server, start + polite + h2_request(last, port=server.port), until_eof=False, wait=1.0)
    frames = parse_h2(reply)
    assert not any(isinstance(f, hyperframe.frame.GoAwayFrame) for f in frames), frames
    headers = [f for f in frames if isinstance(f, hyperframe.frame.HeadersFrame) and f.stream_id == last]
    assert headers and dict(hpack.Decoder().decode(headers[0].data, raw=True))[b":status"] == b"200", reply[:300]

    streams = 20_000
    flood = start + b"".join(
        h2_request(i, port=server.port) + hyperframe.frame.RstStreamFrame(i, cancel).serialize()
        for i in range(1, 2 * streams, 2)
    )
    received: list[bytes] = []

    async def attack() -> None:
        received.append(await exchange(server, flood))

    cpu, _rss, _peak = await cost(server, attack)
    frames = parse_h2(received[0])
    goaway = [f for f in frames if isinstance(f, hyperframe.frame.GoAwayFrame)]
    print(f"\n{streams} open-and-cancel streams ({len(flood)} B): cpu {cpu:.3f}s, {goaway[-1:]}")
    assert goaway and goaway[-1].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # and closed (`exchange`)
    assert cpu < 0.3
    reply, _ = await raw_get(server, "/health/live")
    assert reply.startswith(b"HTTP/1.1 200")
    assert "Traceback" not in server.output()


# --- the boundary: one connection's error ends that connection only ---------------------------


async def test_an_error_in_one_connection_is_logged_counted_and_contained(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    crashes: list[BaseException] = []
    monkeypatch.setattr(hypercorn_fixes, "_on_crash", crashes.append)
    left, right = trio.testing.memory_stream_pair()

    class FakeServer:
        stream = left

    async def crashing_run(self: Any) -> None:
        raise trio.BusyResourceError("another task is currently sending data on this SocketStream")

    monkeypatch.setattr(hypercorn_fixes, "_original_run", crashing_run)
    with caplog.at_level(logging.ERROR, logger="tandem"):
        await hypercorn_fixes._tcp_run(FakeServer())  # does not raise
    assert [type(e) for e in crashes] == [ExceptionGroup]
    assert [r.getMessage() for r in caplog.records] == ["connection.crashed"]
    assert caplog.records[0].exc_info is not None
    assert await right.receive_some() == b""  # that connection was closed

    async def cancelled_run(self: Any) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(hypercorn_fixes, "_original_run", cancelled_run)
    with trio.move_on_after(0.01) as scope:
        await hypercorn_fixes._tcp_run(FakeServer())
    assert scope.cancelled_caught  # Cancelled passes on, not counted
    assert len(crashes) == 1


# --- memory per held connection: the lighter parts keep Hypercorn's behaviour ------------


class ChannelQueue:
    """A trio memory channel as Hypercorn used it for the app's queue: the reference for `_AppQueue`."""

    def __init__(self, size: int) -> None:
        sender, receiver = trio.open_memory_channel[int](size)
        self.send, self.receive = sender.send, receiver.receive


@pytest.mark.parametrize("make", [ChannelQueue, hypercorn_fixes._AppQueue])
async def test_the_app_queue_is_a_bounded_fifo_like_a_memory_channel(make: Callable[[int], Any]) -> None:
    queue = make(2)
    await queue.send(1)
    await queue.send(2)  # the buffer is full now
    sent: list[int] = []

    async def send(item: int) -> None:
        await queue.send(item)
        sent.append(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == []  # waits for room
        assert await queue.receive() == 1
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [3]
    assert [await queue.receive() for _ in range(2)] == [2, 3]

    with trio.move_on_after(0.01) as waited:
        await queue.receive()  # nothing queued: waits, and a cancelled wait takes nothing
    assert waited.cancelled_caught
    for item in (4, 5):
        await queue.send(item)
    with trio.move_on_after(0.01) as waited:
        await queue.send(6)  # full: a cancelled send leaves its item out
    assert waited.cancelled_caught
    assert [await queue.receive() for _ in range(2)] == [4, 5]

    received: list[int] = []

    async def receive() -> None:
        received.append(await queue.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        await queue.send(7)  # handed to the waiting receiver
    assert received == [7]


@pytest.mark.parametrize("make", [trio.Lock, hypercorn_fixes._Lock])
async def test_the_connection_lock_hands_over_in_arrival_order(make: Callable[[], Any]) -> None:
    lock = make()
    order: list[str] = []

    async def hold(name: str, scope: trio.CancelScope) -> None:
        with scope:
            async with lock:
                order.append(name)

    gives_up = trio.CancelScope()
    assert not lock.locked()
    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        assert lock.locked()
        with pytest.raises(RuntimeError):
            await lock.__aenter__()  # not twice by the same task
        for name, scope in (("a", trio.CancelScope()), ("x", gives_up), ("b", trio.CancelScope())):
            nursery.start_soon(hold, name, scope)
            await trio.testing.wait_all_tasks_blocked()
        gives_up.cancel()  # a waiter that gives up is skipped
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        await lock.__aexit__(None, None, None)
    assert order == ["a", "b"]
    assert not lock.locked()


async def test_a_held_websocket_is_two_tasks_still_pinged_and_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypercorn in this process with the fixes: a held WebSocket is its reader task and its
    app task, with no h11 connection left after the 101; pings still come every interval,
    and a client that answers none is dropped after the read timeout."""
    for owner, name, _ in hypercorn_fixes.REPLACEMENTS:
        monkeypatch.setattr(owner, name, getattr(owner, name))  # put back after this test
    monkeypatch.setattr(hypercorn_fixes, "_settings", hypercorn_fixes._settings)
    hypercorn_fixes.install(max_message_bytes=65536, ws_compression=False, http2_cleartext=False)

    async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    def tasks() -> int:
        root = trio.lowlevel.current_root_task()
        assert root is not None
        found, nurseries = 0, list(root.child_nurseries)
        while nurseries:
            for task in nurseries.pop().child_tasks:
                found += 1
                nurseries.extend(task.child_nurseries)
        return found

    def h11_connections() -> int:
        return sum(isinstance(o, h11.Connection) for o in gc.get_objects())

    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.websocket_ping_interval = 0.2
    hc.read_timeout = 1
    async with trio.open_nursery() as nursery:
        serve = functools.partial(hypercorn.trio.serve, app, hc, mode="asgi")  # type: ignore[arg-type]
        binds = await nursery.start(serve)
        server = types.SimpleNamespace(port=int(binds[0].rsplit(":", 1)[1]))
        await trio.testing.wait_all_tasks_blocked()
        idle_tasks, idle_h11 = tasks(), h11_connections()
        sockets = [await RawSocket.open(server) for _ in range(10)]  # type: ignore[arg-type]
        for sock in sockets:
            assert sock.status == 101
            assert await sock.frame() == (PING, b"")  # at once, as Hypercorn did
        await trio.testing.wait_all_tasks_blocked()
        assert tasks() - idle_tasks == 2 * len(sockets) + 1  # and the run's one `_Pinger`
        assert h11_connections() == idle_h11

        silent, *answering = sockets
        pings = [0] * len(answering)

        async def answer(i: int, sock: RawSocket) -> None:
            while (got := await sock.frame()) is not None:
                if got[0] == PING:
                    pings[i] += 1
                    await sock.send(masked_frame(PONG, got[1]))
            raise AssertionError("a socket that answers pings was dropped")

        async with trio.open_nursery() as clients:
            for i, sock in enumerate(answering):
                clients.start_soon(answer, i, sock)
            with trio.fail_after(3 * hc.read_timeout):
                while await silent.frame() is not None:
                    pass  # the pings it leaves unanswered, then the end of the stream
            await trio.sleep(hc.read_timeout)  # the others outlive the read timeout by answering
            clients.cancel_scope.cancel()
        assert min(pings) >= hc.read_timeout / hc.websocket_ping_interval  # over two read timeouts: ample
        for sock in sockets:
            await sock.aclose()
        nursery.cancel_scope.cancel()
