"""Shared test fixtures: real Tandem processes on free ports, real WebSocket clients.

`tandem` starts `python server.py` as a subprocess with a private DATA_DIR and
waits until it listens; a server that does not come up fails the test with its
own output. `Client` wraps a trio-websocket connection with JSON helpers.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
RECEIVE_TIMEOUT = 5.0
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One `python server.py` process."""

    def __init__(self, env: dict[str, str], data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = {**env, "PORT": str(self.port), "HOST": "127.0.0.1", "DATA_DIR": str(data_dir)}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "REDIS_URL", "DATABASE_URL"))}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "server.py")],
                cwd=self.data_dir.parent,  # not ROOT: a developer's .env must not leak in
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tandem exited with {self.proc.returncode} at start-up:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        pytest.fail(f"tandem did not listen on port {self.port} within {START_TIMEOUT}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


ServerFactory = Callable[..., Server]


@pytest.fixture
def tandem_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers: `tandem_factory(SETTING="value", data_dir=...)`."""
    servers: list[Server] = []
    counter = itertools.count()

    def start(data_dir: Path | None = None, **settings: str) -> Server:
        n = next(counter)
        # Rate limits are off unless a test turns them on: the suite sends more than 10 messages a minute.
        env = {"LOG_LEVEL": "INFO", "RATE_LIMIT_ENABLED": "0", **{k: str(v) for k, v in settings.items()}}
        server = Server(env, data_dir or tmp_path / "data", tmp_path / f"server-{n}.log")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def tandem(tandem_factory: ServerFactory) -> Server:
    return tandem_factory()


class Client:
    """A WebSocket client speaking JSON frames."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.patience = RECEIVE_TIMEOUT  # seconds recv() waits before failing the test
        self._ids = itertools.count(1)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(self.patience):
            frame = orjson.loads(await self.ws.get_message())
        assert isinstance(frame, dict)
        return frame

    async def expect(self, kind: str) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["type"] == kind, f"expected {kind}, got {frame}"
        return frame

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a request with a fresh id and return the reply that carries it."""
        rid = next(self._ids)
        await self.send({"type": kind, "id": rid, **fields})
        frame = await self.recv()
        assert frame.get("id") == rid, f"reply to {kind} id={rid} expected, got {frame}"
        return frame

    async def nothing(self, wait: float = 0.3) -> None:
        """Assert that no frame arrives within `wait` seconds."""
        with trio.move_on_after(wait):
            frame = await self.ws.get_message()
            raise AssertionError(f"unexpected frame {frame!r}")

    async def create(self) -> dict[str, Any]:
        reply = await self.request("session:create")
        assert reply["type"] == "session:created", reply
        return reply

    async def join(self, code: str) -> dict[str, Any]:
        reply = await self.request("session:join", code=code)
        assert reply["type"] == "session:joined", reply
        return reply

    async def message(self, data: Any) -> int:
        reply = await self.request("message:send", data=data)
        assert reply["type"] == "message:ack", reply
        return int(reply["seq"])


@asynccontextmanager
async def connect(server: Server | str, **kwargs: Any) -> AsyncIterator[Client]:
    url = server if isinstance(server, str) else server.url
    async with open_websocket_url(url, **kwargs) as ws:
        yield Client(ws)


@asynccontextmanager
async def paired(server: Server) -> AsyncIterator[tuple[Client, Client, dict[str, Any], dict[str, Any]]]:
    """Two clients in one session, both past `session:paired`: (a, b, created, joined)."""
    async with connect(server) as a, connect(server) as b:
        created = await a.create()
        joined = await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
        yield a, b, created, joined
