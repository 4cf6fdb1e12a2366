"""Shared test fixtures: real Tandem processes on free ports, real WebSocket clients.

`tandem` starts `python server.py` as a subprocess with a private DATA_DIR and
waits until it listens; a server that does not come up fails the test with its
own output. `Client` wraps a trio-websocket connection with JSON helpers.

The session store is the `store` fixture: "sqlite" (DATA_DIR) unless a module
parametrises it: `pytestmark = pytest.mark.parametrize("store", STORES,
indirect=True)` runs each test once per store ("redis": the shared Redis at
SHARED_REDIS_URL, which must answer PING, else the test fails).
`stored` and `assert_no_trace` look into whichever store a server uses.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.cluster
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
RECEIVE_TIMEOUT = 5.0
START_TIMEOUT = 15.0
# The Redis every developer and CI runs; tests that stop, restart or cluster
# Redis start their own (tests/redis_servers.py).
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
STORES = ["sqlite", "redis"]
# How long a store may take to drop what an ended session left: the sweeper
# updates the expiry index right after the members were told.
TRACE_WAIT = 3.0


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


def check_redis(url: str) -> None:
    """Fail the test (never skip it) unless the Redis at `url` answers PING."""
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"the Redis store tests need a Redis at {url} (start redis-server): {exc!r}")
    finally:
        client.close()


@pytest.fixture
def store(request: pytest.FixtureRequest) -> str:
    """The session store of the servers a test starts: "sqlite" (default) or "redis"."""
    kind = str(getattr(request, "param", "sqlite"))
    assert kind in STORES, kind
    if kind == "redis":
        check_redis(SHARED_REDIS_URL)
    return kind


@pytest.fixture
def tandem_factory(tmp_path: Path, store: str) -> Iterator[ServerFactory]:
    """Start servers: `tandem_factory(SETTING="value", data_dir=...)`.

    With the "redis" store a server gets REDIS_URL=SHARED_REDIS_URL unless
    `settings` name another Redis.
    """
    servers: list[Server] = []
    counter = itertools.count()

    def start(data_dir: Path | None = None, **settings: str) -> Server:
        n = next(counter)
        # Rate limits are off unless a test turns them on: the suite sends more than 10 messages a minute.
        env = {"LOG_LEVEL": "INFO", "RATE_LIMIT_ENABLED": "0", **{k: str(v) for k, v in settings.items()}}
        if store == "redis":
            env.setdefault("REDIS_URL", SHARED_REDIS_URL)
        server = Server(env, data_dir or tmp_path / "data", tmp_path / f"server-{n}.log")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def tandem(tandem_factory: ServerFactory) -> Server:
    return tandem_factory()


# --- what a store holds of a session, whichever store it is --------------------------


def uses_redis_cluster(server: Server) -> bool:
    return server.env.get("REDIS_CLUSTER", "0").lower() in ("1", "true", "yes", "on")


def redis_client(server: Server) -> redis.Redis | redis.cluster.RedisCluster:
    """A client of the Redis (or Redis Cluster) that `server` uses."""
    url = server.env["REDIS_URL"]
    if uses_redis_cluster(server):
        return redis.cluster.RedisCluster.from_url(url, socket_timeout=2.0)
    return redis.Redis.from_url(url, socket_timeout=2.0)


def stored(server: Server, code: str) -> dict[str, int]:
    """What the server's store holds of session `code`: sessions, members, messages."""
    if "REDIS_URL" not in server.env:
        return _sqlite_rows(server, [code])
    from redis_scripts import session_keys

    session, history = session_keys(code)[:2]
    client = redis_client(server)
    try:
        fields: list[bytes] = client.hkeys(session)  # type: ignore[assignment]
        return {
            "sessions": int(client.exists(session)),
            "members": sum(1 for f in fields if f.startswith(b"m:")),
            "messages": int(client.llen(history)),
        }
    finally:
        client.close()


def traces(server: Server, codes: Iterable[str]) -> list[str]:
    """Everything the server's store still holds of the sessions `codes`; [] when nothing."""
    wanted = sorted(set(codes))
    if "REDIS_URL" not in server.env:
        return [f"{n} rows in {table}" for table, n in _sqlite_rows(server, wanted).items() if n]
    from redis_store import expiry_bucket

    found: list[str] = []
    client = redis_client(server)
    try:
        for code in wanted:
            # Every key of a session carries its hash tag: any such key left is a leak.
            keys = client.scan_iter(match=f"tandem:{{{code}}}:*", count=1000)
            found += [f"key {key.decode()}" for key in keys]
            if client.zscore(expiry_bucket(code), code) is not None:
                found.append(f"{code} in {expiry_bucket(code)}")
    finally:
        client.close()
    return found


def assert_no_trace(server: Server, codes: Iterable[str], within: float = TRACE_WAIT) -> None:
    """Nothing of the sessions `codes` is left in the server's store (waiting up to `within` s)."""
    wanted = list(codes)
    deadline = time.monotonic() + within
    left = traces(server, wanted)
    for _ in range(1000):
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        left = traces(server, wanted)
    assert left == [], f"still stored of {wanted}: {left}"


def _sqlite_rows(server: Server, codes: list[str]) -> dict[str, int]:
    """Rows per table that mention any of `codes`, read from DATA_DIR/tandem.sqlite3 read-only."""
    marks = ",".join("?" * len(codes))
    path = server.data_dir / "tandem.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {
            table: int(db.execute(f"SELECT count(*) FROM {table} WHERE code IN ({marks})", codes).fetchone()[0])
            for table in ("sessions", "members", "messages")
        }


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
