"""What the test modules share: a Tandem process, a JSON WebSocket client, and small helpers.

`Server` runs `python server.py` on a free port with a private DATA_DIR (the
`tandem_factory` fixture in conftest.py starts and stops them); `Client` wraps
a trio-websocket connection with JSON helpers, `connect` and `paired` open
them. `stored`, `traces` and `assert_no_trace` look into whichever store a
server uses. The rest are the requests, reads, polls and log and HTTP reads
that more than one test module makes. Fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import redis
import redis.cluster
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

import config

ROOT = Path(__file__).resolve().parent.parent
RECEIVE_TIMEOUT = 5.0
START_TIMEOUT = 15.0
PROCESS_TIMEOUT = 15.0  # longest wait for a process to exit
# The Redis and the PostgreSQL (user postgres, trust auth) the tests share: the
# machine's, or others named by TANDEM_TEST_REDIS_URL / TANDEM_TEST_PG_URL. Where
# none answers, conftest.py starts private ones for the run and points these (and
# the environment the xdist workers inherit) at them. Tests that stop, restart or
# cluster Redis, or stop PostgreSQL, start their own (redis_servers.py, pg_servers.py).
SHARED_REDIS_URL = os.environ.get("TANDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SHARED_PG_URL = os.environ.get("TANDEM_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
STORES = ["sqlite", "redis"]
# Runs a test once per session store (the `store` fixture in conftest.py).
BOTH_STORES = pytest.mark.parametrize("store", STORES, indirect=True)
# How long a store may take to drop what an ended session left: the sweeper
# updates the expiry index right after the members were told.
TRACE_WAIT = 3.0
UNKNOWN_CODE = "ZZZZ9999"  # well-formed; a real session with this code is a 1 in 10^12 chance
CODE_HASH = re.compile(r"code-[0-9a-f]{16}")  # a session code as the logs show it (a keyed hash)
MAX_FRAMES = 100_000  # frames read while waiting for a close: a bound, never reached in practice
CALL_FRAMES = 200  # events `call` skips at most before the reply
# Every setting config.py reads: stripped from the inherited environment
# (`base_env`) so that a process sees only what its test sets.
SETTING_NAMES = frozenset(setting.name for setting in config.SETTINGS)

Frame = dict[str, Any]
T = TypeVar("T")


# --- processes and ports ---------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = PROCESS_TIMEOUT) -> None:
    """Wait until `proc` listens on `port`; fail with its `log` if it exits or does not within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tandem exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if is_listening(port):
            return
        time.sleep(0.05)
    raise AssertionError(f"tandem did not listen on {port}:\n{log.read_text(errors='replace')}")


def base_env(**settings: str) -> dict[str, str]:
    """The inherited environment without any Tandem setting, plus `settings`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SETTING_NAMES and not k.startswith(("TANDEM_", "REDIS_URL", "DATABASE_URL"))
    }
    env.update(settings)
    return env


class Server:
    """One `python server.py` process."""

    def __init__(self, env: dict[str, str], data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = {**env, "PORT": str(self.port), "HOST": "127.0.0.1", "DATA_DIR": str(data_dir)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.preexec: Callable[[], object] | None = None  # run in the child before server.py (a limit, say)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "server.py")],
                cwd=self.data_dir.parent,  # not ROOT: a developer's .env must not leak in
                env=base_env(**self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tandem exited with {self.proc.returncode} at start-up:\n{self.output()}")
            if is_listening(self.port):
                return self
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

    def status_kib(self, key: str) -> int:
        """A memory figure of the process in KiB: `key` of /proc/PID/status (VmRSS, VmHWM, ...)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {key}")

    def rss_kib(self) -> int:
        return self.status_kib("VmRSS")

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process so far (/proc/PID/stat fields 14 and 15)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ServerFactory = Callable[..., Server]


async def wait_exit(server: Server, seconds: float = PROCESS_TIMEOUT) -> int:
    """The exit code, waited for (up to `seconds`) in a thread: `Server.wait` blocks."""
    return await trio.to_thread.run_sync(server.wait, seconds)


def redis_problem(url: str) -> str | None:
    """Why the Redis at `url` cannot serve the tests (it does not answer PING), or None."""
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        return str(exc) or repr(exc)
    finally:
        client.close()
    return None


def check_redis(url: str) -> None:
    """Fail the test (never skip it) unless the Redis at `url` answers PING."""
    if (problem := redis_problem(url)) is not None:
        pytest.fail(f"the Redis store tests need a Redis at {url} (start redis-server): {problem}")


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


# --- WebSocket clients -----------------------------------------------------------------


class Client:
    """A WebSocket client speaking JSON frames."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.patience = RECEIVE_TIMEOUT  # seconds recv() waits before failing the test
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        """A request id this client has not used yet."""
        return next(self._ids)

    async def send(self, frame: Frame | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def recv(self) -> Frame:
        with trio.fail_after(self.patience):
            frame = orjson.loads(await self.ws.get_message())
        assert isinstance(frame, dict)
        return frame

    async def expect(self, kind: str) -> Frame:
        frame = await self.recv()
        assert frame["type"] == kind, f"expected {kind}, got {frame}"
        return frame

    async def request(self, kind: str, **fields: Any) -> Frame:
        """Send a request with a fresh id and return the reply that carries it (the next frame)."""
        rid = self.next_id()
        await self.send({"type": kind, "id": rid, **fields})
        frame = await self.recv()
        assert frame.get("id") == rid, f"reply to {kind} id={rid} expected, got {frame}"
        return frame

    async def nothing(self, wait: float = 0.3) -> None:
        """Assert that no frame arrives within `wait` seconds."""
        with trio.move_on_after(wait):
            frame = await self.ws.get_message()
            raise AssertionError(f"unexpected frame {frame!r}")

    async def create(self) -> Frame:
        reply = await self.request("session:create")
        assert reply["type"] == "session:created", reply
        return reply

    async def join(self, code: str) -> Frame:
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
async def paired(server: Server) -> AsyncIterator[tuple[Client, Client, Frame, Frame]]:
    """Two clients in one session, both past `session:paired`: (a, b, created, joined)."""
    async with connect(server) as a, connect(server) as b:
        created = await a.create()
        joined = await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
        yield a, b, created, joined


def xff(address: str) -> list[tuple[bytes, bytes]]:
    """`extra_headers` for `connect` that say the client is `address` (X-Forwarded-For)."""
    return [(b"X-Forwarded-For", address.encode())]


# --- requests and reads ---------------------------------------------------------------


async def call(client: Client, kind: str, inbox: list[Frame] | None = None, **fields: Any) -> Frame:
    """Send a request with a fresh id and return its reply, skipping events meanwhile.

    Events (frames without an id: messages, presence) that come first are
    appended to `inbox` if one is given; a reply to another request fails the test.
    """
    rid = client.next_id()
    await client.send({"type": kind, "id": rid, **fields})
    for _ in range(CALL_FRAMES):
        frame = await client.recv()
        if frame.get("id") == rid:
            return frame
        assert "id" not in frame, f"reply to another request: {frame}"
        if inbox is not None:
            inbox.append(frame)
    raise AssertionError(f"no reply to {kind} among {CALL_FRAMES} frames")


async def resume(client: Client, creds: Mapping[str, Any], last_seq: int, *, expect_resumed: bool = True) -> Frame:
    """`session:resume` of the member `creds` names (code, client_id, token) from `last_seq`: the reply.

    The reply must be the next frame and, unless `expect_resumed` is False,
    `session:resumed` for that code and member.
    """
    reply = await client.request(
        "session:resume",
        code=creds["code"],
        client_id=creds["client_id"],
        token=creds["token"],
        last_seq=last_seq,
    )
    if expect_resumed:
        assert reply["type"] == "session:resumed", reply
        assert reply["code"] == creds["code"], reply
        assert reply["client_id"] == creds["client_id"], reply
    return reply


async def expect_messages(client: Client, count: int) -> list[Frame]:
    """The next `count` frames, each a `message`."""
    return [await client.expect("message") for _ in range(count)]


async def frames_until_close(
    client: Client, within: float = 5.0, max_frames: int = MAX_FRAMES
) -> tuple[list[Frame], int]:
    """Read until the server closes the socket: (the frames before the close, the close code)."""
    frames: list[Frame] = []
    with trio.fail_after(within):
        for _ in range(max_frames):
            try:
                frames.append(orjson.loads(await client.ws.get_message()))
            except ConnectionClosed as closed:
                assert closed.reason is not None
                return frames, int(closed.reason.code)
    raise AssertionError(f"socket still open after {max_frames} frames")


async def close_code(client: Client, within: float = 10.0) -> int:
    """Read until the server closes the socket; the close code."""
    return (await frames_until_close(client, within))[1]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def assert_ms_near_now(value: object, slack_ms: int = 60_000) -> None:
    """`value` is an integer timestamp in ms within `slack_ms` of now."""
    assert isinstance(value, int) and not isinstance(value, bool), value
    assert abs(value - now_ms()) < slack_ms, value


async def assert_alive(client: Client) -> None:
    """The connection still answers: ping gets pong with the same id and an integer ts."""
    reply = await client.request("ping")
    assert reply["type"] == "pong", reply
    assert_ms_near_now(reply["ts"])


# --- polls, logs and HTTP -----------------------------------------------------------------


async def eventually(
    check: Callable[[], T],
    expected: object = None,
    *,
    until: Callable[[T], bool] | None = None,
    within: float = 5.0,
    interval: float = 0.05,
) -> T:
    """Call `check()` (blocking, quick) every `interval` s until it returns `expected`
    (or, given `until`, until `until(value)` holds); return that value. Fail after `within` s."""

    def done(value: T) -> bool:
        return until(value) if until is not None else value == expected

    deadline = time.monotonic() + within
    value = check()
    for _ in range(int(within / interval) + 1):
        if done(value) or time.monotonic() > deadline:
            break
        await trio.sleep(interval)
        value = check()
    assert done(value), f"still {value!r} after {within} s"
    return value


def log_lines(server: Server, event: str | None = None, *, strict: bool = False) -> list[Frame]:
    """The JSON lines of the server's log, only those of `event` if given.

    Lines that do not start with "{" (tracebacks, plain text) are left out. A
    line that does but is no JSON (one the server is still writing) is left
    out too, or, if `strict`, fails the test.
    """
    found = []
    for text in server.output().splitlines():
        if not text.startswith("{"):
            continue
        try:
            line = orjson.loads(text)
        except orjson.JSONDecodeError:
            if strict:
                raise
            continue
        if isinstance(line, dict) and (event is None or line.get("event") == event):
            found.append(line)
    return found


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One GET (blocking): (status, headers with lower-case names, body), error statuses included."""
    return http_request("GET", url, headers=headers, timeout=timeout)


async def http(
    method: str, url: str, body: object = None, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """`http_request` in a worker thread, so that the test's sockets keep reading meanwhile."""
    return await trio.to_thread.run_sync(lambda: http_request(method, url, body, headers))


def http_request(
    method: str, url: str, body: object = None, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One request (blocking), `body` sent as is (bytes) or as JSON: (status, headers with
    lower-case names, body), error statuses included."""
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    sent = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers={**sent, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()
