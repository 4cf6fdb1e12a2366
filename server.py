"""Tandem: the app, its routes, connection handling, start-up and drain.

`python server.py` builds the Config, opens the store in one lifespan
(`run`), and serves the Starlette app with Hypercorn on Trio. Each WebSocket
is one `Connection`: a reader task handles requests one at a time, a single
writer drains a bounded queue; the `Hub` routes store events to connections.
SIGTERM/SIGINT start the drain: refuse new sockets, close all with 1012.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import ipaddress
import logging
import math
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import hypercorn.config
import hypercorn.trio
import redis
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Scope
from starlette.websockets import WebSocket

import config as config_module
import database
import health
import hypercorn_fixes
import logging_setup
import protocol
from config import Config
from limiter import Decision, Limiter, LimitKey, Limits, Rule, rate_limited
from protocol import CloseCode, ErrorCode
from redis_store import RedisStore
from session_store import Broadcast, Ended, Event, SessionStore, SqliteStore, StoredMessage, Takeover

log = logging.getLogger("tandem")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_code(length: int) -> str:
    return "".join(secrets.choice(protocol.CODE_ALPHABET) for _ in range(length))


def token_hash(token: str) -> bytes:
    # Tokens carry 256 random bits, so a fast hash is as safe as a slow one.
    return hashlib.sha256(token.encode()).digest()


# --- routing store events to connections -------------------------------------


class Hub:
    """This process's open connections, and the members among them by session."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.sessions: dict[str, list[Connection]] = {}
        self.unwatch: Callable[[str], None] = lambda code: None  # the store's, once open
        self.all_closed = trio.Event()
        self.all_closed.set()

    def add(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        self.all_closed = trio.Event()

    def remove(self, conn: Connection) -> None:
        self.detach(conn)
        self.connections.pop(conn.id, None)
        if not self.connections:
            self.all_closed.set()

    def attach(self, conn: Connection, code: str, client_id: str) -> None:
        conn.code, conn.client_id = code, client_id
        self.sessions.setdefault(code, []).append(conn)

    def detach(self, conn: Connection) -> None:
        if conn.code is None:
            return
        members = self.sessions.get(conn.code)
        if members is not None and conn in members:
            members.remove(conn)
            if not members:
                del self.sessions[conn.code]
                self.unwatch(conn.code)
        conn.code = conn.client_id = None

    def dispatch(self, event: Event) -> None:
        """Deliver one store event; called in commit order, never blocks."""
        match event:
            case Broadcast(code, text, exclude, seq):
                members = self.sessions.get(code)
                if not members:
                    return
                for conn in tuple(members):
                    if conn.client_id != exclude:
                        conn.deliver(text, seq)
            case Takeover(code, client_id, conn_id):
                previous = self.connections.get(conn_id)
                if previous is not None and previous.code == code and previous.client_id == client_id:
                    self.detach(previous)
                    previous.close(CloseCode.NORMAL)
            case Ended(code, notice):
                members = self.sessions.pop(code, [])
                for conn in members:
                    conn.end_session(notice)
                if members:
                    self.unwatch(code)

    def close_all(self, code: CloseCode) -> None:
        for conn in tuple(self.connections.values()):
            conn.close(code)


# --- one WebSocket --------------------------------------------------------------


class Connection:
    """A client socket: this task reads and handles, one writer task sends.

    Frames for the client go through `deliver`/`push` into a bounded queue; a
    client that lets it fill (in frames or bytes) is closed with 1013.
    While a join or resume is in flight the connection is `pending`: events
    wait in `held` so that the direct reply goes out first.
    """

    def __init__(self, ws: WebSocket, tandem: Tandem, ip_key: str) -> None:
        self.ws = ws
        self.tandem = tandem
        self.config = tandem.config
        self.store = tandem.store
        self.ip_key = ip_key  # the client address as limiter key (a hash)
        self.id = secrets.token_urlsafe(9)
        self.code: str | None = None
        self.client_id: str | None = None
        self.delivered_seq = 0  # newest message seq queued to this client
        self.held: list[tuple[str, int, bool]] | None = None  # (text, seq, ends session)
        self.close_code: CloseCode | None = None
        self.peer_gone = False
        self.messages_in = 0
        self.messages_out = 0
        self._queued_bytes = 0
        self._send, self._receive = trio.open_memory_channel[str](self.config.send_queue_frames)
        self._read_scope = trio.CancelScope()
        self._write_scope = trio.CancelScope()

    # -- called from anywhere; none of these blocks --

    def push(self, text: str) -> None:
        """Queue one frame for the client, or close it if it can't keep up.

        A connection asked to close still queues (the reply to the request in
        hand, events until its reader stops); the writer sends all of it before
        the close frame, except after 1013, when the queue is dropped.
        """
        if self.close_code == CloseCode.TRY_AGAIN_LATER:
            return
        self._queued_bytes += len(text)
        try:
            if self._queued_bytes > self.config.send_queue_bytes:
                raise trio.WouldBlock
            self._send.send_nowait(text)
        except trio.WouldBlock:
            self.close(CloseCode.TRY_AGAIN_LATER)
        except trio.ClosedResourceError:
            pass  # the reader is done: nothing more goes out

    def deliver(self, text: str, seq: int) -> None:
        if seq and seq <= self.delivered_seq:
            return  # already sent: history replay and live events overlap
        if self.held is not None:
            if len(self.held) >= self.config.send_queue_frames:
                self.close(CloseCode.TRY_AGAIN_LATER)
            self.held.append((text, seq, False))
            return
        if seq:
            self.delivered_seq = seq
        self.push(text)

    def end_session(self, text: str | None) -> None:
        if self.held is not None and text is not None:
            self.held.append((text, 0, True))
            return
        if text is not None:
            self.push(text)
        self.code = self.client_id = None

    def close(self, code: CloseCode) -> None:
        """Ask this connection to close with `code` once its current request is done."""
        if self.close_code is not None:
            return
        self.close_code = code
        self._read_scope.cancel()
        if code == CloseCode.TRY_AGAIN_LATER:  # too slow: drop what is queued
            self._write_scope.cancel()
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    self._receive.receive_nowait()
            self._queued_bytes = 0

    # -- the connection's own tasks --

    async def run(self) -> None:
        hub = self.tandem.hub
        hub.add(self)
        opened = time.monotonic()
        bound = logging_setup.bind(self)  # `conn` and `session` on every line this connection's work logs
        self.tandem.metrics.connections_opened.inc()
        peer = self.ws.client.host if self.ws.client else None
        log.info("connection.open", extra={"fields": {"conn": self.id, "ip": peer}})
        self.tandem.archive.event("connection.opened", None, now_ms())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    await self._reader()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._leave_hub()
                    self._send.close()
        finally:
            hub.remove(self)
            log.info(
                "connection.close",
                extra={
                    "fields": {
                        "conn": self.id,
                        "code": int(self.close_code or 1006),
                        "duration_s": round(time.monotonic() - opened, 3),
                        "messages_in": self.messages_in,
                        "messages_out": self.messages_out,
                    }
                },
            )
            self.tandem.metrics.closed(int(self.close_code or 1006))
            self.tandem.archive.event(
                "connection.closed",
                None,
                now_ms(),
                {
                    "code": int(self.close_code or 1006),
                    "duration_ms": round((time.monotonic() - opened) * 1000),
                    "messages_in": self.messages_in,
                    "messages_out": self.messages_out,
                },
            )
            logging_setup.unbind(bound)

    async def _leave_hub(self) -> None:
        code, client_id = self.code, self.client_id
        self.tandem.hub.detach(self)
        if code is not None and client_id is not None:
            # If the store is down the member stays online until it expires.
            with contextlib.suppress(protocol.TandemError):
                await self.store.disconnect(code, client_id, self.id, now_ms())

    async def _reader(self) -> None:
        max_bytes = self.config.max_message_bytes
        errors_in_row = 0
        with self._read_scope:
            while self.close_code is None:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.peer_gone = True
                    return
                text = message.get("text")
                request: protocol.Request | None = None
                try:
                    if text is None:
                        protocol.reject_binary()
                    request = protocol.parse_request(text, max_bytes)
                    with trio.CancelScope(shield=True):  # a request runs to its reply
                        await self._handle(request)
                    errors_in_row = 0
                except protocol.FrameRejected as exc:
                    self.close(exc.close_code)
                except protocol.TandemError as exc:
                    self.tandem.metrics.error(exc)
                    self.push(protocol.serialize(protocol.error_frame(exc, request.id if request else None)))
                    if isinstance(exc, protocol.ClientError):
                        errors_in_row += 1
                        if errors_in_row >= self.config.max_consecutive_errors:
                            self.close(CloseCode.POLICY_VIOLATION)

    async def _writer(self) -> None:
        with self._write_scope:
            async for first in self._receive:
                # Take what else is queued without a scheduler round per frame.
                batch = [first]
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while len(batch) < 64:
                        batch.append(self._receive.receive_nowait())
                for text in batch:
                    await self.ws.send({"type": "websocket.send", "text": text})
                    self._queued_bytes -= len(text)
                    self.messages_out += 1
        if not self.peer_gone:
            # A peer that reads nothing can hold this send; Hypercorn's
            # read_timeout ends the socket then, and with it this wait.
            with trio.move_on_after(self.config.shutdown_grace):
                await self.ws.send({"type": "websocket.close", "code": int(self.close_code or CloseCode.NORMAL)})

    # -- requests --

    async def _handle(self, request: protocol.Request) -> None:
        match request:
            case protocol.SendMessage():
                await self._send_message(request)
            case protocol.Ping():
                self.push(protocol.serialize(protocol.Pong(request.id, now_ms())))
            case protocol.CreateSession():
                await self._create(request)
            case protocol.JoinSession():
                await self._join(request)
            case protocol.ResumeSession():
                await self._resume(request)
            case protocol.LeaveSession():
                await self._leave(request)

    def _require_no_session(self) -> None:
        if self.code is not None:
            raise protocol.ClientError("this connection is already in a session", ErrorCode.ALREADY_IN_SESSION)

    def _membership(self) -> tuple[str, str]:
        if self.code is None or self.client_id is None:
            raise protocol.ClientError("this connection is not in a session", ErrorCode.NOT_IN_SESSION)
        return self.code, self.client_id

    async def _send_message(self, request: protocol.SendMessage) -> None:
        started = time.perf_counter()
        code, client_id = self._membership()
        limits = self.tandem.message_limits(client_id, self.ip_key)
        now = now_ms()
        seq = await self.store.append(code, client_id, self.id, request.data, now, limits)
        self.messages_in += 1
        self.push(protocol.serialize(protocol.MessageAck(request.id, seq)))
        self.tandem.archive.message(code, seq, client_id, request.data, now)
        metrics = self.tandem.metrics  # the hot path: one counter, one histogram
        metrics.messages.inc()
        metrics.message_seconds.observe(time.perf_counter() - started)

    async def _create(self, request: protocol.CreateSession) -> None:
        self._require_no_session()
        client_id, token = secrets.token_urlsafe(9), secrets.token_urlsafe(32)
        length = self.config.code_length
        now = now_ms()
        created = await self.store.create(partial(new_code, length), client_id, token_hash(token), self.id, now)
        self.tandem.hub.attach(self, created.code, client_id)
        try:
            await self.store.watch(created.code)  # before anyone can know the code
        except BaseException:
            self.tandem.hub.detach(self)
            raise
        self.push(
            protocol.serialize(protocol.SessionCreated(request.id, created.code, client_id, token, created.expires_at))
        )
        log.info("session.created", extra={"fields": {"conn": self.id, "session": created.code}})
        self.tandem.archive.session_created(created.code, now)
        self.tandem.metrics.session_events["created"].inc()

    async def _join(self, request: protocol.JoinSession) -> None:
        self._require_no_session()
        failures = self.tandem.limits.join_failures_ip
        if failures is not None:  # brute force on codes: refuse before trying
            decision = await self.tandem.limiter.peek(failures, self.ip_key)
            if not decision.allowed:
                raise rate_limited(failures.name, decision.retry_after)
        client_id, token = secrets.token_urlsafe(9), secrets.token_urlsafe(32)
        self._hold(request.code, client_id)
        try:
            await self.store.watch(request.code)
            joined = await self.store.join(request.code, client_id, token_hash(token), self.id, now_ms())
        except BaseException as exc:
            self.held = None
            self.tandem.hub.detach(self)
            if isinstance(exc, protocol.TandemError):
                self.tandem.archive.event("session.join_failed", request.code, now_ms(), {"error": str(exc.code)})
            if failures is not None and isinstance(exc, protocol.ClientError):
                await self.tandem.limiter.record(failures, self.ip_key)
            raise
        reply = protocol.SessionJoined(request.id, request.code, client_id, token, joined.clients, joined.last_seq)
        self._release(reply, joined.backlog, joined.last_seq)
        if len(joined.clients) == 2:
            log.info("session.paired", extra={"fields": {"conn": self.id, "session": request.code}})
            self.tandem.archive.session_paired(request.code, now_ms())
            self.tandem.metrics.session_events["paired"].inc()

    async def _resume(self, request: protocol.ResumeSession) -> None:
        self._require_no_session()
        self._hold(request.code, request.client_id)
        try:
            await self.store.watch(request.code)
            resumed = await self.store.resume(
                request.code, request.client_id, token_hash(request.token), self.id, request.last_seq, now_ms()
            )
        except BaseException as exc:
            self.held = None
            self.tandem.hub.detach(self)
            if isinstance(exc, protocol.TandemError):
                self.tandem.archive.event("session.resume_failed", request.code, now_ms(), {"error": str(exc.code)})
            raise
        self.tandem.archive.event("session.resumed", request.code, now_ms(), {"recovered": resumed.recovered})
        reply = protocol.SessionResumed(
            request.id, request.code, request.client_id, resumed.clients, resumed.last_seq, resumed.recovered
        )
        self._release(reply, resumed.replay, resumed.last_seq)

    def _hold(self, code: str, client_id: str) -> None:
        """Become a member before the store says so, holding its events back."""
        self.held = []
        self.tandem.hub.attach(self, code, client_id)

    def _release(self, reply: protocol.ServerFrame, history: tuple[StoredMessage, ...], last_seq: int) -> None:
        """Send the reply, then the stored messages, then the events held meanwhile."""
        held, self.held = self.held or [], None
        self.push(protocol.serialize(reply))
        code = self.code or ""
        for stored in history:
            self.push(protocol.serialize(protocol.Message(code, stored.seq, stored.sender, stored.data, stored.ts)))
        self.delivered_seq = max(self.delivered_seq, last_seq)
        for text, seq, ends in held:
            if ends:
                self.end_session(text)
            else:
                self.deliver(text, seq)

    async def _leave(self, request: protocol.LeaveSession) -> None:
        code, client_id = self._membership()
        ended = await self.store.leave(code, client_id, self.id, now_ms())
        self.tandem.hub.detach(self)
        self.push(protocol.serialize(protocol.SessionLeft(request.id, code)))
        if ended:
            log.info("session.ended", extra={"fields": {"conn": self.id, "session": code, "reason": "left"}})
            self.tandem.archive.session_ended(code, "left", now_ms())
            self.tandem.metrics.session_events["ended"].inc()
        else:
            self.tandem.archive.event("session.left", code, now_ms())


# --- the application ------------------------------------------------------------


class Tandem:
    """What the app needs at run time, built once by `run`."""

    def __init__(self, config: Config, hub: Hub, store: SessionStore) -> None:
        self.config = config
        self.hub = hub
        self.metrics = health.Metrics(lambda: len(hub.connections))
        # Timed in place: the store keeps its class and its other methods.
        backend = "redis" if config.redis_url else "sqlite"
        self.store = health.instrument_store(store, self.metrics, backend)
        self.health = health.Health(config, self.metrics, self.store)
        self.health.readiness.add(health.Check("store", self.store.check, component_id=backend))
        self.limiter: Limiter = store.limiter
        self.limits = limits_from_config(config)
        self.archive: database.Recorder = database.NO_ARCHIVE  # lifespan sets it when DATABASE_URL is set
        self.draining = False

    def message_limits(self, client_id: str, ip_key: str) -> list[LimitKey]:
        limits = []
        if self.limits.messages_user is not None:
            limits.append(LimitKey(self.limits.messages_user, client_id, per_session=True))
        if self.limits.messages_ip is not None:
            limits.append(LimitKey(self.limits.messages_ip, ip_key))
        return limits


def limits_from_config(config: Config) -> Limits:
    if not config.rate_limit_enabled:
        return Limits()

    def rule(name: str, setting: tuple[int, float] | None) -> Rule | None:
        return None if setting is None else Rule(name, setting[0], setting[1])

    return Limits(
        messages_user=rule("messages_user", config.rate_limit_messages_user),
        messages_ip=rule("messages_ip", config.rate_limit_messages_ip),
        connections_ip=rule("connections_ip", config.rate_limit_connections_ip),
        join_failures_ip=rule("join_failures_ip", config.rate_limit_join_failures_ip),
        api_ip=rule("api_ip", config.rate_limit_api_ip),
    )


def client_ip(scope: Scope, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
    """The socket's peer, or with a trusted proxy as peer, the nearest untrusted
    address of X-Forwarded-For (read from the right)."""
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded: list[str] = [
        value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"x-forwarded-for"
    ]
    hops: list[str] = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def ip_key(ip: str) -> str:
    # Limiter keys are shared by every instance, so the hash key is fixed:
    # Redis holds pseudonyms, not addresses.
    return hashlib.sha256(b"tandem-ip:" + ip.encode()).hexdigest()[:24]


def _error_response(status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"code": str(code), "message": message}}, status, headers=headers)


def too_many(rule: Rule, decision: Decision) -> Response:
    return _error_response(429, ErrorCode.RATE_LIMITED, f"rate limit {rule.name} exceeded", decision.headers(rule))


def create_app(tandem: Tandem) -> Starlette:
    allowed = frozenset(tandem.config.allowed_origins)
    trusted = tuple(ipaddress.ip_network(n) for n in tandem.config.trusted_proxies)

    async def api_info(request: Request) -> Response:
        """What a client needs to know about this server's limits."""
        rule = tandem.limits.api_ip
        headers: dict[str, str] = {}
        if rule is not None:
            decision = await tandem.limiter.hit(rule, ip_key(client_ip(request.scope, trusted)))
            if not decision.allowed:
                tandem.metrics.rate_limited(rule.name)
                return too_many(rule, decision)
            headers = decision.headers(rule)
        config = tandem.config
        limits = {
            rule.name: {"limit": rule.limit, "window": rule.window}
            for rule in (getattr(tandem.limits, f) for f in tandem.limits.__slots__)
            if rule is not None
        }
        body = {
            "protocol": protocol.SUBPROTOCOL,
            "max_message_bytes": config.max_message_bytes,
            "history_size": config.history_size,
            "session_idle_timeout": config.session_idle_timeout,
            "session_ttl": config.session_ttl,
            "rate_limits": limits,
        }
        return JSONResponse(body, headers=headers)

    async def websocket_endpoint(ws: WebSocket) -> None:
        if tandem.draining:
            tandem.metrics.refused(ErrorCode.UNAVAILABLE)
            await ws.send_denial_response(
                _error_response(503, ErrorCode.UNAVAILABLE, "server is restarting", {"Retry-After": "1"})
            )
            return
        origin = ws.headers.get("origin")
        if allowed and (origin is None or origin.rstrip("/").lower() not in allowed):
            tandem.metrics.refused(ErrorCode.UNAUTHORIZED)
            await ws.send_denial_response(_error_response(403, ErrorCode.UNAUTHORIZED, "origin not allowed"))
            return
        ipk = ip_key(client_ip(ws.scope, trusted))
        connections = tandem.limits.connections_ip
        if connections is not None:
            decision = await tandem.limiter.hit(connections, ipk)
            if not decision.allowed:
                tandem.metrics.rate_limited(connections.name)
                await ws.send_denial_response(too_many(connections, decision))
                return
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(protocol.SUBPROTOCOL if protocol.SUBPROTOCOL in offered else None)
        await Connection(ws, tandem, ipk).run()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    return Starlette(
        routes=[
            WebSocketRoute("/ws", websocket_endpoint),
            Route("/", index),
            Route("/api/info", api_info),
            *tandem.health.routes(),  # /health/live, /health/ready, /metrics
        ]
    )


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.websocket_ping_interval = config.ping_interval
    hc.read_timeout = config.read_timeout  # type: ignore[assignment]  # Hypercorn takes seconds
    # Hypercorn counts text frames in characters; a frame of more characters
    # than MAX_MESSAGE_BYTES has more bytes too, so this only catches frames
    # that are over the limit anyway. Tandem checks the exact byte count.
    hc.websocket_max_message_size = config.max_message_bytes
    hc.graceful_timeout = max(0.5, config.shutdown_grace * 0.1)
    # Hypercorn's default (100) overflows when thousands of clients reconnect at
    # once (after a restart); the kernel caps it at net.core.somaxconn.
    hc.backlog = 4096
    hc.accesslog = logging.getLogger("hypercorn.access")  # both through logging_setup's pipeline
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def _sweeper(tandem: Tandem) -> None:
    failing = False  # log a failing store once per outage, not once per tick
    while True:
        await trio.sleep(tandem.config.sweep_interval)
        try:
            expired = await tandem.store.sweep(now_ms())
        except protocol.TandemError as exc:
            if not failing:
                log.warning("sweep.failed", extra={"fields": {"error": exc.message}})
            failing = True
            continue
        if failing:
            log.info("sweep.recovered")
            failing = False
        for code, reason in expired:
            log.info("session.expired", extra={"fields": {"session": code, "reason": reason}})
            tandem.archive.session_ended(code, reason, now_ms())
            tandem.metrics.session_events["expired"].inc()


async def _collector(full_interval: float) -> None:
    """Garbage collection on Tandem's schedule instead of the allocator's.

    CPython's automatic collector starts a full collection whenever enough
    objects have piled up; with thousands of connections one takes 100 ms or
    more, all of it on the event loop: the p99 spikes. Here the young
    generations (small, cheap) are collected every second and the whole heap
    every GC_FULL_INTERVAL seconds.
    """
    last_full = trio.current_time()
    while True:
        await trio.sleep(1.0)
        if trio.current_time() - last_full >= full_interval:
            gc.collect()
            last_full = trio.current_time()
        else:
            gc.collect(1)


async def _drain_on_signal(tandem: Tandem) -> None:
    """Hypercorn's shutdown trigger: returns once the drain is done.

    Readiness fails first; PRE_DRAIN_DELAY later (a second signal cuts it
    short), when load balancers have stopped sending clients, the drain starts.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutdown.start", extra={"fields": {"signal": signal.Signals(signum).name}})
            break
        tandem.health.stop()
        started = time.monotonic()
        if tandem.config.pre_drain_delay > 0:
            with trio.move_on_after(tandem.config.pre_drain_delay):
                async for _ in signals:
                    break
    pre_drain = time.monotonic() - started
    tandem.draining = True
    tandem.hub.close_all(CloseCode.SERVICE_RESTART)
    with trio.move_on_after(max(0.1, tandem.config.shutdown_grace * 0.8 - pre_drain)) as scope:
        await tandem.hub.all_closed.wait()
    log.info(
        "shutdown.drained", extra={"fields": {"open": len(tandem.hub.connections), "timed_out": scope.cancelled_caught}}
    )


@asynccontextmanager
async def open_store(config: Config, hub: Hub) -> AsyncIterator[SessionStore]:
    """The configured store: Redis when REDIS_URL is set, else SQLite in DATA_DIR."""
    idle_ms = math.ceil(config.session_idle_timeout * 1000)
    ttl_ms = math.ceil(config.session_ttl * 1000)
    store: SessionStore
    if config.redis_url is not None:
        async with RedisStore.open(
            config.redis_url,
            hub.dispatch,
            cluster=config.redis_cluster,
            history_size=config.history_size,
            idle_ms=idle_ms,
            ttl_ms=ttl_ms,
            fail_closed=config.rate_limit_fail_closed,  # test fix: it was never passed on
        ) as store:
            hub.unwatch = store.unwatch
            yield store
    else:
        async with SqliteStore.open(
            config.data_dir,
            hub.dispatch,
            history_size=config.history_size,
            idle_ms=idle_ms,
            ttl_ms=ttl_ms,
            synchronous=config.sqlite_synchronous,
        ) as store:
            yield store


@asynccontextmanager
async def lifespan(config: Config) -> AsyncIterator[Tandem]:
    """Open the store and the background tasks; close them in reverse order."""
    hub = Hub()
    # The archive (PostgreSQL, when DATABASE_URL is set) outlives the store and is flushed last.
    async with database.open_archive(config) as archive, open_store(config, hub) as store:
        tandem = Tandem(config, hub, store)
        tandem.archive = archive
        archive.register_metrics(tandem.metrics.registry)  # tandem_archive_*; nothing without DATABASE_URL
        if isinstance(store, RedisStore):
            store.register_metrics(tandem.metrics.registry)  # tandem_redis_listener_restarts_total
        if config.database_url is not None:
            tandem.health.readiness.add(health.Check("database", archive.check, component_id="postgresql"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweeper, tandem)
            if config.gc_full_interval > 0:
                gc.disable()
                nursery.start_soon(_collector, config.gc_full_interval)
            nursery.start_soon(tandem.health.run)
            yield tandem
            nursery.cancel_scope.cancel()


async def run(config: Config) -> None:
    async with lifespan(config) as tandem:
        app = create_app(tandem)
        async with trio.open_nursery() as nursery:
            trigger = partial(_drain_on_signal, tandem)
            serve = partial(hypercorn.trio.serve, app, hypercorn_config(config), shutdown_trigger=trigger)  # type: ignore[arg-type]
            binds = await nursery.start(serve)
            # Start-up garbage is permanent: move it out of the collector's
            # sight, and collect young objects less often (p99 latency).
            gc.collect()
            gc.freeze()
            log.info("server.listening", extra={"fields": {"addresses": binds, "data_dir": str(config.data_dir)}})
    log.info("shutdown.complete")


def _environment_failure(exc: BaseException) -> BaseException | None:
    """The error, if `exc` is (a group of) what the environment caused: a port in
    use, a DATA_DIR held by another process, a backend refusing at start-up."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _environment_failure(inner)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, (OSError, RuntimeError, redis.RedisError)) else None


def main() -> int:
    try:
        config = config_module.load()
    except config_module.ConfigError as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    pipeline = logging_setup.setup(config)
    try:
        if sys.argv[1:] == ["migrate"]:  # apply sql/ to DATABASE_URL and exit
            return database.migrate_command(config)
        if sys.argv[1:]:
            print("usage: python server.py [migrate]", file=sys.stderr)
            return 2
        hypercorn_fixes.install()
        gc.set_threshold(50_000, 20, 20)
        try:
            trio.run(run, config)
        except BaseException as exc:
            failure = _environment_failure(exc)
            if failure is None:
                raise
            log.critical("server.failed", extra={"fields": {"error": str(failure)}})
            return 1
        return 0
    finally:
        pipeline.stop()


if __name__ == "__main__":
    sys.exit(main())
