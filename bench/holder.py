"""Figure 4's holders: many cheap WebSocket connections, paired and held, answering pings.

Run by bench/run.py as `python -m bench.holder '<json config>'`. One thread, one
epoll, raw non-blocking sockets and a few hundred bytes of state a connection
(trio-websocket holding 50,000 connections would cost the client more memory
than the server), loopback only:

1. Opens `pairs` pairs from the loopback address `source` (127.0.0.2, ...: each
   source address has its own ~28,000 ephemeral ports) to `port` on 127.0.0.1,
   at most `concurrency` pairs being set up at once (the listen backlog): the
   creator does the HTTP upgrade and sends `session:create`; with the code, the
   joiner upgrades and sends `session:join`; the pair is held once both have
   `session:paired`. `deflate` adds `Sec-WebSocket-Extensions:
   permessage-deflate; client_max_window_bits` to the handshake; frames the
   server compresses (RSV1) are inflated while the pair is set up.
2. Prints `ready {...}` (pairs held and failed, set-up seconds, how many 101s
   accepted the extension), then holds: answers the server's pings with pongs
   (Tandem drops a peer silent for 1.5 * PING_INTERVAL + 1 s) until `stop` on
   stdin, EOF or HOLD_TIMEOUT.
3. Prints `result {...}` (connections closed by the server meanwhile, pongs,
   this process's CPU seconds while holding) and closes every socket.

Every loop is bounded in count and time; every wait has a timeout.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import socket
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from bench.common import LOOPBACK, emit_line, raise_nofile

PAIR_TIMEOUT = 30.0
PAIR_ATTEMPTS = 2
HOLD_TIMEOUT = 900.0
MAX_EVENTS = 100_000_000  # selector events a run handles, at most
MAX_FRAME = 1 << 20
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
DEFLATE_TAIL = b"\x00\x00\xff\xff"
# Connect without picking the port at bind(): the kernel picks it at connect()
# by the whole address 4-tuple (Linux's IP_BIND_ADDRESS_NO_PORT).
BIND_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass
class Config:
    port: int
    pairs: int
    source: str = "127.0.0.2"
    host: str = LOOPBACK
    path: str = "/ws"
    deflate: bool = False
    concurrency: int = 100  # pairs being set up at once
    setup_timeout: float = 300.0

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if not n:
        return head + mask
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class Conn:
    """One WebSocket: its socket, what is still to send, what is read and not parsed."""

    __slots__ = ("buf", "compressed", "fragments", "inflater", "open", "out", "pair", "role", "sock")

    def __init__(self, holder: Holder, pair: Pair, role: str) -> None:
        self.pair = pair
        self.role = role  # "a" creates, "b" joins
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_IP, BIND_NO_PORT, 1)
            self.sock.bind((holder.config.source, 0))
            self.sock.connect_ex((holder.config.host, holder.config.port))
        except OSError:
            self.sock.close()
            raise
        self.out = holder.handshake()
        self.buf = bytearray()
        self.open = False  # the 101 was read
        self.inflater: Any = None
        self.compressed = False
        self.fragments: list[bytes] = []
        holder.sel.register(self.sock, selectors.EVENT_WRITE, self)

    def close(self, holder: Holder) -> None:
        if self.sock.fileno() >= 0:
            holder.sel.unregister(self.sock)
            self.sock.close()


class Pair:
    __slots__ = ("a", "a_paired", "attempt", "b", "b_paired", "code", "deadline", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.attempt = 0
        self.a: Conn | None = None
        self.b: Conn | None = None
        self.code = ""
        self.a_paired = self.b_paired = False
        self.deadline = 0.0


class Holder:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sel = selectors.DefaultSelector()
        self.waiting = list(range(config.pairs))[::-1]  # pair indexes not started yet
        self.setting_up: set[Pair] = set()
        self.held: list[Pair] = []
        self.failed = 0
        self.extensions = 0  # 101s that named permessage-deflate
        self.closed = 0  # held connections the server closed
        self.pongs = 0
        self.errors: list[str] = []
        self.stop = False

    def handshake(self) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.config.path} HTTP/1.1",
            f"Host: {self.config.host}:{self.config.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if self.config.deflate:
            lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    # -- pairs --

    def start_pairs(self) -> None:
        while self.waiting and len(self.setting_up) < self.config.concurrency:
            pair = Pair(self.waiting.pop())
            self.begin(pair)

    def begin(self, pair: Pair) -> None:
        pair.attempt += 1
        pair.code, pair.a_paired, pair.b_paired, pair.b = "", False, False, None
        pair.deadline = time.monotonic() + PAIR_TIMEOUT
        self.setting_up.add(pair)
        try:
            pair.a = Conn(self, pair, "a")
        except OSError as exc:
            self.fail(pair, f"connect: {exc!r}")

    def fail(self, pair: Pair, why: str) -> None:
        for conn in (pair.a, pair.b):
            if conn is not None:
                conn.close(self)
        pair.a = pair.b = None
        self.setting_up.discard(pair)
        if len(self.errors) < 20:
            self.errors.append(f"pair {pair.index} attempt {pair.attempt}: {why}")
        if pair.attempt < PAIR_ATTEMPTS:
            self.begin(pair)
        else:
            self.failed += 1

    def on_text(self, conn: Conn, text: bytes) -> None:
        pair = conn.pair
        if pair not in self.setting_up:
            return  # held: nothing to do but answer pings
        frame = orjson.loads(text)
        kind = frame.get("type")
        if kind == "session:created" and conn.role == "a":
            pair.code = str(frame["code"])
            try:
                pair.b = Conn(self, pair, "b")
            except OSError as exc:
                self.fail(pair, f"connect: {exc!r}")
        elif kind == "session:paired":
            if conn.role == "a":
                pair.a_paired = True
            else:
                pair.b_paired = True
            if pair.a_paired and pair.b_paired:
                self.setting_up.discard(pair)
                self.held.append(pair)
                for c in (pair.a, pair.b):
                    if c is not None:
                        c.inflater = None  # held: frames are no longer read
        elif kind == "error":
            self.fail(pair, f"refused: {text[:200]!r}")

    def on_open(self, conn: Conn) -> None:
        if conn.role == "a":
            self.send(conn, client_frame(1, b'{"type":"session:create","id":"c"}'))
        else:
            join = {"type": "session:join", "id": "j", "code": conn.pair.code}
            self.send(conn, client_frame(1, orjson.dumps(join)))

    # -- sockets --

    def send(self, conn: Conn, data: bytes) -> None:
        conn.out += data
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
        except BlockingIOError:
            pass
        except OSError as exc:
            self.lost(conn, f"send: {exc!r}")
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if conn.sock.fileno() >= 0:
            self.sel.modify(conn.sock, events, conn)

    def lost(self, conn: Conn, why: str) -> None:
        pair = conn.pair
        if pair in self.setting_up:
            self.fail(pair, why)
        elif conn.sock.fileno() >= 0:
            conn.close(self)
            self.closed += 1

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lost(conn, f"recv: {exc!r}")
            return
        if not data:
            self.lost(conn, "closed by the server")
            return
        conn.buf += data
        if not conn.open:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.buf) > 16384:
                    self.lost(conn, "oversized handshake response")
                return
            head = bytes(conn.buf[:end]).decode("latin-1").split("\r\n")
            del conn.buf[: end + 4]
            if " 101 " not in head[0] + " ":
                self.lost(conn, f"handshake refused: {head[0]!r}")
                return
            conn.open = True
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                    self.extensions += 1
                    conn.inflater = zlib.decompressobj(-15)
            self.on_open(conn)
        self.frames(conn)

    def frames(self, conn: Conn) -> None:
        buf = conn.buf
        for _ in range(10_000):
            if len(buf) < 2 or conn.sock.fileno() < 0:
                return
            b0, b1 = buf[0], buf[1]
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if n > MAX_FRAME:
                self.lost(conn, f"frame of {n} bytes")
                return
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            self.frame(conn, b0, payload)

    def frame(self, conn: Conn, b0: int, payload: bytes) -> None:
        opcode, fin = b0 & 0x0F, bool(b0 & 0x80)
        if opcode == 0x9:  # ping
            self.pongs += 1
            self.send(conn, client_frame(0xA, payload))
        elif opcode == 0x8:  # close
            self.lost(conn, f"close frame {payload[:2].hex()}")
        elif opcode in (0x0, 0x1, 0x2):
            if opcode != 0x0:
                conn.compressed = bool(b0 & 0x40)
                conn.fragments = []
            conn.fragments.append(payload)
            if not fin:
                return
            message = b"".join(conn.fragments)
            conn.fragments = []
            if conn.compressed:
                if conn.inflater is None:
                    return  # held: not read
                message = conn.inflater.decompress(message + DEFLATE_TAIL)
            self.on_text(conn, message)

    # -- the run --

    def poll(self, timeout: float, stdin: bool) -> None:
        for key, events in self.sel.select(timeout):
            if key.data is None:
                if stdin:
                    self.read_stdin()
                continue
            conn: Conn = key.data
            if conn.sock.fileno() < 0:
                continue
            if events & selectors.EVENT_WRITE:
                error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    self.lost(conn, f"connect: {os.strerror(error)}")
                    continue
                self.flush(conn)
            if events & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                self.readable(conn)

    def read_stdin(self) -> None:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data or b"stop" in data:
            self.stop = True

    def setup(self) -> None:
        deadline = time.monotonic() + self.config.setup_timeout
        self.start_pairs()
        for _ in range(MAX_EVENTS):
            if not self.setting_up and not self.waiting:
                return
            now = time.monotonic()
            if now >= deadline:
                break
            self.poll(min(0.5, deadline - now), stdin=False)
            for pair in [p for p in self.setting_up if p.deadline <= now]:
                self.fail(pair, "timed out")
            self.start_pairs()
        for pair in list(self.setting_up):  # out of time: give up on the rest
            pair.attempt = PAIR_ATTEMPTS
            self.fail(pair, "set-up ran out of time")
        self.failed += len(self.waiting)
        self.waiting.clear()

    def hold(self) -> float:
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
        cpu0 = time.process_time()
        deadline = time.monotonic() + HOLD_TIMEOUT
        for _ in range(MAX_EVENTS):
            now = time.monotonic()
            if self.stop or now >= deadline:
                break
            self.poll(min(1.0, deadline - now), stdin=True)
        return time.process_time() - cpu0

    def close(self) -> None:
        for pair in self.held:
            for conn in (pair.a, pair.b):
                if conn is not None:
                    conn.close(self)
        self.sel.close()


def main(config: Config) -> None:
    raise_nofile(2 * config.pairs + 100)
    holder = Holder(config)
    opened = time.monotonic()
    holder.setup()
    for error in holder.errors:
        print(error, file=sys.stderr)
    emit_line(
        "ready",
        {
            "pairs": len(holder.held),
            "failed": holder.failed,
            "setup_s": round(time.monotonic() - opened, 2),
            "extensions": holder.extensions,
        },
    )
    cpu = holder.hold()
    emit_line(
        "result",
        {
            "pairs": len(holder.held),
            "closed": holder.closed,
            "pongs": holder.pongs,
            "cpu_s": round(cpu, 3),
        },
    )
    holder.close()


def run() -> None:
    main(Config.from_json(sys.argv[1]))


if __name__ == "__main__":
    run()
