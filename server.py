"""Tandem's process: the app and its routes, the lifespan, the drain, `main()`.

`python server.py` builds the Config, opens every service in one lifespan
(the archive, the store, the background tasks) and serves the app with
Hypercorn on Trio: `/ws` as a raw ASGI endpoint that checks a socket against
the caps and limits and hands it to `relay.Connection`, the rest in Starlette.
SIGTERM/SIGINT start the drain: readiness fails, new sockets are refused, open
ones close with 1012.
"""

from __future__ import annotations

import signal

# Run as a program, a shutdown signal that arrives while the modules below
# load (about half a second) is kept for main(): the process then exits 0
# instead of dying of the signal.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EARLY_SIGNALS: list[int] = []
if __name__ == "__main__":
    for _signum in SHUTDOWN_SIGNALS:
        signal.signal(_signum, lambda received, _frame: EARLY_SIGNALS.append(received))

import errno
import gc
import ipaddress
import logging
import math
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import hypercorn.config
import hypercorn.trio
import redis
import trio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

import admin
import api
import auth
import config as config_module
import health
import hypercorn_fixes
import invites
import lifecycle
import logging_setup
import metrics
import protocol
import static_files
import tracing
from archive import Recorder, open_archive
from config import Config
from limiter import IPV6_SITE, Decision, Limiter, Limits, Pseudonyms, Rule, SocketCount, client_ip
from migrations import MigrationError, migrate_command, parse_migrate_args
from protocol import CloseCode, ErrorCode
from redis_store import RedisStore
from relay import Connection, Hub, Services, Written, now_ms
from session_store import SessionStore
from sqlite_store import SqliteStore

log = logging.getLogger("tandem")
STATIC_DIR = Path(__file__).resolve().parent / "static"


# --- the application ------------------------------------------------------------


class AsgiSocket:
    """relay.Socket straight over a `/ws` connection's ASGI callables.

    No framework wrapper per message: Hypercorn already enforces the ASGI
    WebSocket state machine (a send after the client left is dropped there).
    A burst of frames goes out in one write where the server takes it.
    """

    __slots__ = ("_burst", "_receive", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._burst = hypercorn_fixes.sends_frames(send)

    async def receive(self) -> str | bytes | None:
        message = await self._receive()
        if message["type"] != "websocket.receive":
            return None  # websocket.disconnect
        text: str | None = message.get("text")
        return text if text is not None else bytes(message.get("bytes") or b"")

    async def send(self, texts: list[str]) -> None:
        if self._burst:
            await self._send({"type": hypercorn_fixes.SEND_FRAMES, "texts": texts})
            return
        for text in texts:
            await self._send({"type": "websocket.send", "text": text})

    def write_now(self, texts: list[str]) -> Written:
        if not self._burst:
            return Written.NONE
        left = hypercorn_fixes.write_now(self._send, texts)
        if left is None:
            return Written.NONE
        return Written.PART if left else Written.ALL

    async def close(self, code: int) -> None:
        await self._send({"type": "websocket.close", "code": code})


class Routes:
    """The ASGI app: `/ws` sockets go straight to `websocket_endpoint`, everything else to Starlette.

    A socket lives for hours and passes thousands of frames: Starlette's
    per-connection wrapper would cost memory and a state check per frame.
    """

    def __init__(self, websocket: ASGIApp, app: ASGIApp, health: health.Health) -> None:
        self.websocket = websocket
        self.app = app
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws" and not self.health.on_listener(scope):
            await self.websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class Tandem:
    """What the app needs at run time, built once by `lifespan` from the open services."""

    def __init__(self, config: Config, hub: Hub, store: SessionStore, archive: Recorder) -> None:
        self.config = config
        self.hub = hub
        self.store = store
        self.archive = archive
        self.metrics = metrics.Metrics(lambda: len(hub.connections))
        store.observer = metrics.StoreMetrics(self.metrics, store.backend, store.location)
        store.register_metrics(self.metrics.registry)
        archive.register_metrics(self.metrics.registry)  # tandem_archive_*; nothing without DATABASE_URL
        # /metrics without METRICS_TOKEN: loopback clients only, resolved through TRUSTED_PROXIES.
        trusted = tuple(ipaddress.ip_network(n) for n in config.trusted_proxies)
        self.health = health.Health(config, self.metrics, store, client_ip=partial(client_ip, trusted=trusted))
        self.health.readiness.add(health.Check("store", store.check, component_id=store.backend))
        if config.database_url is not None:
            # Not critical: relaying does not need the archive (its rows wait, bounded, or are
            # dropped and counted), so PostgreSQL down must not take every instance out of service.
            check = health.Check("database", archive.check, component_id="postgresql", critical=False)
            self.health.readiness.add(check)
        self.report = lifecycle.Fanout(lifecycle.logged, lifecycle.archived(archive), lifecycle.counted(self.metrics))
        self.services = Services(
            config=config,
            store=store,
            hub=hub,
            limits=limits_from_config(config),
            # Limiter keys for addresses and codes; `share_hash_key` may replace the key.
            keys=Pseudonyms(config.hash_key.encode() or secrets.token_bytes(32)),
            report=self.report,
            auth=auth.Authenticator.from_config(config),  # None: authentication is off
        )
        self.sockets = SocketCount(config.max_sockets, config.max_sockets_ip)
        self.draining = False

    @property
    def limits(self) -> Limits:
        return self.services.limits

    @property
    def limiter(self) -> Limiter:
        return self.store.limiter

    @property
    def keys(self) -> Pseudonyms:
        return self.services.keys


def limits_from_config(config: Config) -> Limits:
    if not config.rate_limit_enabled:  # not allowed with SMTP_URL (config.py): e-mail is always limited
        return Limits()

    def rule(name: str, setting: tuple[int, float] | None) -> Rule | None:
        return None if setting is None else Rule(name, setting[0], setting[1])

    return Limits(
        messages_user=rule("messages_user", config.rate_limit_messages_user),
        messages_ip=rule("messages_ip", config.rate_limit_messages_ip),
        connections_ip=rule("connections_ip", config.rate_limit_connections_ip),
        join_failures_ip=rule("join_failures_ip", config.rate_limit_join_failures_ip),
        code_failures=rule("code_failures", config.rate_limit_code_failures),
        api_ip=rule("api_ip", config.rate_limit_api_ip),
        email_session=rule("email_session", config.rate_limit_email_session),
        email_recipient=rule("email_recipient", config.rate_limit_email_recipient),
    )


def _error_response(status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"code": str(code), "message": message}}, status, headers=headers)


def auth_refused(error: protocol.TandemError) -> Response:
    """An upgrade whose `Authorization` token failed: 401, or 503 when its key cannot be fetched."""
    if isinstance(error, protocol.ServerError):
        return _error_response(503, error.code, error.message, {"Retry-After": str(math.ceil(error.retry_after or 1))})
    challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    return _error_response(401, ErrorCode.UNAUTHORIZED, error.message, challenge)


def too_many(rule: Rule, decision: Decision) -> Response:
    return _error_response(429, ErrorCode.RATE_LIMITED, f"rate limit {rule.name} exceeded", decision.headers(rule))


def create_app(tandem: Tandem) -> ASGIApp:
    allowed = frozenset(tandem.config.allowed_origins)
    trusted = tuple(ipaddress.ip_network(n) for n in tandem.config.trusted_proxies)

    async def api_info(request: Request) -> Response:
        """What a client needs to know about this server's limits."""
        rule = tandem.limits.api_ip
        headers: dict[str, str] = {}
        if rule is not None:
            decision = await tandem.limiter.hit(rule, tandem.keys.address(client_ip(request.scope, trusted)))
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

    async def websocket_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # the client left during the handshake

        async def deny(response: Response) -> None:
            await response(scope, receive, send)  # Hypercorn answers it as the handshake's HTTP response

        if tandem.draining:
            tandem.metrics.refused(ErrorCode.UNAVAILABLE)
            await deny(_error_response(503, ErrorCode.UNAVAILABLE, "server is restarting", {"Retry-After": "1"}))
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if allowed and (origin is None or origin.rstrip("/").lower() not in allowed):
            tandem.metrics.refused(ErrorCode.UNAUTHORIZED)
            await deny(_error_response(403, ErrorCode.UNAUTHORIZED, "origin not allowed"))
            return
        ip = client_ip(scope, trusted)
        ipk = tandem.keys.address(ip)
        cap = tandem.sockets.open(ipk)
        if cap is not None:
            tandem.metrics.rate_limited(cap)
            await deny(
                _error_response(503, ErrorCode.UNAVAILABLE, f"too many open sockets ({cap})", {"Retry-After": "5"})
            )
            return
        try:
            connections = tandem.limits.connections_ip
            if connections is not None:
                decision = await tandem.limiter.hit(connections, ipk)
                if not decision.allowed:
                    tandem.metrics.rate_limited(connections.name)
                    await deny(too_many(connections, decision))
                    return
            identity = None
            authorization = headers.get("authorization")  # never a token in the URL
            if tandem.services.auth is not None and authorization is not None:
                try:
                    identity = await tandem.services.auth.verify(auth.bearer(authorization))
                except protocol.TandemError as exc:
                    tandem.metrics.refused(exc.code)
                    await deny(auth_refused(exc))
                    return
            offered = scope.get("subprotocols") or []
            chosen = protocol.SUBPROTOCOL if protocol.SUBPROTOCOL in offered else None
            await send({"type": "websocket.accept", "subprotocol": chosen})
            site_key = tandem.keys.address(ip, IPV6_SITE)
            await Connection(AsgiSocket(receive, send), tandem.services, ip, ipk, site_key, identity).run()
        finally:
            tandem.sockets.close(ipk)

    app = Starlette(
        routes=[
            *static_files.StaticFiles(STATIC_DIR).routes(),  # /, /tandem.js and the page's files
            Route("/api/info", api_info),
            *admin.routes(tandem),  # /api/debug/*
            *invites.routes(tandem),  # /api/send-email
            *tandem.health.routes(),  # /health/live, /health/ready, /metrics
        ],
        # Requests on the METRICS_ADDRESS listener reach /metrics and the probes only.
        middleware=[Middleware(health.MetricsListener, health=tandem.health)],
        exception_handlers={HTTPException: api.http_error},  # JSON 404 and 405 under /api/
    )
    return Routes(websocket_endpoint, app, tandem.health)


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    if config.metrics_address is not None:
        hc.bind.append(config.metrics_address)  # the /metrics listener: health.MetricsListener routes by its port
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
    outage = logging_setup.Outage(log, "sweep.failed", "sweep.recovered")  # not a line per tick
    while True:
        await trio.sleep(tandem.config.sweep_interval)
        try:
            expired = await tandem.store.sweep(now_ms())
        except protocol.TandemError as exc:
            outage.failed(exc.message)
            continue
        outage.recovered()
        for code, reason in expired:
            tandem.report(lifecycle.SessionExpired(code, reason))


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


async def _drain_on_signal(tandem: Tandem, signals: AsyncIterator[int]) -> None:
    """Hypercorn's shutdown trigger: returns once the drain is done.

    Readiness fails first; PRE_DRAIN_DELAY later (a second signal cuts it
    short), when load balancers have stopped sending clients, the drain starts.
    """
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
            fail_closed=config.rate_limit_fail_closed,
            ack_replicas=config.redis_ack_replicas,
            ack_timeout=config.redis_ack_timeout,
        ) as store:
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


async def share_hash_key(tandem: Tandem, store: SessionStore) -> None:
    """Without HASH_KEY, take the key the store's instances share (Redis), so
    their limiter keys and log pseudonyms agree; on failure keep this process's own."""
    try:
        with trio.fail_after(5):
            shared = await store.shared_secret()
    except (protocol.TandemError, trio.TooSlowError) as exc:
        log.warning("hash_key.local", extra={"fields": {"error": str(exc) or type(exc).__name__}})
        return
    if shared is not None:
        tandem.services.keys = Pseudonyms(shared)
        logging_setup.set_hash_key(shared)


@asynccontextmanager
async def lifespan(config: Config) -> AsyncIterator[Tandem]:
    """Open every service, in order; close them in reverse order.

    The archive (PostgreSQL, when DATABASE_URL is set) outlives the store and
    is flushed last; the store outlives the background tasks; the hub, which
    the store reports to, outlives them all.
    """
    async with Hub.open() as hub, open_archive(config) as archive, open_store(config, hub) as store:
        tandem = Tandem(config, hub, store, archive)
        if not config.hash_key:
            await share_hash_key(tandem, store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweeper, tandem)
            if config.gc_full_interval > 0:
                gc.disable()
                nursery.start_soon(_collector, config.gc_full_interval)
            nursery.start_soon(tandem.health.run)
            yield tandem
            nursery.cancel_scope.cancel()


async def run(config: Config, early: list[int] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain. `early`: signals that came
    before the event loop ran (`main` records them); the process then exits 0."""
    # Caught from the first moment: a signal while the services open or while
    # Hypercorn binds waits for the drain, instead of killing the process.
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        if early:
            log.info("shutdown.start", extra={"fields": {"signal": signal.Signals(early[0]).name, "early": True}})
            log.info("shutdown.complete")
            return
        await _serve(config, signals)
    log.info("shutdown.complete")


async def _serve(config: Config, signals: AsyncIterator[int]) -> None:
    file_limit = raise_file_limit(config)
    async with lifespan(config) as tandem:
        hypercorn_fixes.set_crash_callback(lambda exc: tandem.metrics.connection_crashes.inc())
        app = create_app(tandem)
        async with trio.open_nursery() as nursery:
            trigger = partial(_drain_on_signal, tandem, signals)
            serve = partial(hypercorn.trio.serve, app, hypercorn_config(config), shutdown_trigger=trigger)  # type: ignore[arg-type]
            binds = await nursery.start(serve)
            # Start-up garbage is permanent: move it out of the collector's
            # sight, and collect young objects less often (p99 latency).
            gc.collect()
            gc.freeze()
            metrics_address = binds.pop() if config.metrics_address else None  # the last bind (hypercorn_config)
            fields = {
                "url": _url_to_open(config),
                "addresses": binds,
                "metrics_address": metrics_address,
                "data_dir": str(config.data_dir),
                "tracing": tracing.tracer.exporters if tracing.tracer is not None else "off",
                "file_limit": file_limit,
            }
            log.info("server.listening", extra={"fields": fields})


# Files the process needs besides its sockets: the store, logs, Python's own.
FILES_BESIDE_SOCKETS = 256


def raise_file_limit(config: Config) -> int | None:
    """Raise the open-file limit to what the system allows (each WebSocket is a
    file); warn when it is below MAX_SOCKETS. Returns the limit in force (None:
    a system without one, Windows)."""
    if sys.platform == "win32":
        return None
    import resource  # POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit (macOS) cannot be the soft one: ask for what MAX_SOCKETS needs.
    wanted = hard if hard != resource.RLIM_INFINITY else config.max_sockets + FILES_BESIDE_SOCKETS
    if soft != resource.RLIM_INFINITY and wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):
            pass  # the limit stays; the check below says what that means
    if config.max_sockets and soft != resource.RLIM_INFINITY and soft < config.max_sockets:
        fields = {"file_limit": soft, "max_sockets": config.max_sockets, "holds_about": soft - FILES_BESIDE_SOCKETS}
        log.warning("server.file_limit", extra={"fields": fields})
    return soft


def _url_to_open(config: Config) -> str:
    """The page's URL for a person: a wildcard bind is reachable as localhost."""
    host = {"0.0.0.0": "localhost", "::": "localhost"}.get(config.host, config.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{config.port}/"


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


def _listening_settings(config: Config) -> list[tuple[str, str, str, int]]:
    """(setting, its value, host, port) of every address Tandem listens on."""
    binds = [("PORT", str(config.port), config.host, config.port)]
    if config.metrics_address is not None:
        host, _, port = config.metrics_address.rpartition(":")
        binds.append(("METRICS_ADDRESS", config.metrics_address, host.strip("[]"), int(port)))
    return binds


def _cannot_bind(host: str, port: int) -> OSError | None:
    """The error binding host:port now gives (as Hypercorn binds), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _failed_bind(exc: OSError, config: Config) -> tuple[str, str, str, int, OSError]:
    """Which of the addresses Tandem listens on gives `exc`'s error (the first if none does now)."""
    binds = _listening_settings(config)
    for name, value, host, port in binds:
        failed = _cannot_bind(host, port)
        if failed is not None and failed.errno == exc.errno:
            return name, value, host, port, failed
    return (*binds[0], exc)


def startup_failure(exc: BaseException, config: Config) -> str:
    """One line for a start-up failure: the setting involved, what happened, what to do."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno in LISTEN_ERRNOS:
        name, value, host, port, failed = _failed_bind(exc, config)
        if name == "PORT" and exc.errno == errno.EADDRNOTAVAIL:  # the host is what is wrong
            name, value = "HOST", config.host
        return f"{name}={value}: cannot listen on {host}:{port}: {failed.strerror}; {LISTEN_ERRNOS[exc.errno]}"
    data_dir = config.data_dir.resolve()
    if isinstance(exc, OSError) and exc.filename is not None:
        path = Path(str(exc.filename)).resolve()
        if path == data_dir or data_dir in path.parents:
            advice = "set DATA_DIR to a directory Tandem may write"
            return f"DATA_DIR={config.data_dir}: {exc.strerror}: {exc.filename}; {advice}"
        return f"{exc.strerror}: {exc.filename}"
    text = " ".join(str(exc).split())  # one line
    if isinstance(exc, RuntimeError) and "DATA_DIR" in text:
        return f"DATA_DIR={config.data_dir}: {text}; stop that process, or give this one another DATA_DIR"
    if isinstance(exc, MigrationError) and config.database_url is not None:
        url = config_module.POSTGRES_URL.mask(config.database_url)
        if "cannot connect" in text:
            return f"DATABASE_URL={url}: {text}; start PostgreSQL or correct DATABASE_URL (or set MIGRATE_ON_START=0)"
        advice = 'fix what it names (docs/setup.md, "Migrations"), or set MIGRATE_ON_START=0'
        return f"DATABASE_URL={url}: {text}; {advice}"
    return f"start-up failed: {text}"


# Why listening failed, and what to do about it.
LISTEN_ERRNOS = {
    errno.EADDRINUSE: "another process holds it: stop it, or choose another port",
    errno.EACCES: "ports below 1024 need privileges: choose a port above 1023",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address: set HOST to one that does (0.0.0.0: all)",
}

USAGE = """\
usage: python server.py [migrate [down [N] | status]]

  (no command)    serve: the relay on HOST:PORT (default 0.0.0.0:3001)
  migrate         apply sql/ to DATABASE_URL (PostgreSQL archive), then exit
  migrate down N  revert the N migrations applied last (default 1), then exit
  migrate status  list sql/'s migrations, applied or pending, then exit

Settings come from the environment and a .env file in the working directory:
every setting, its default and its range is in docs/configuration.md and in
.env.example; `python config.py --markdown` prints the table. A start-up error
and what to do about it: docs/troubleshooting.md.
"""


# The Python versions Tandem runs on (pyproject.toml's requires-python says the same).
SUPPORTED_PYTHON = ((3, 11), (3, 13))


def main() -> int:
    if not SUPPORTED_PYTHON[0] <= sys.version_info[:2] <= SUPPORTED_PYTHON[1]:
        (low, high), running = SUPPORTED_PYTHON, ".".join(map(str, sys.version_info[:2]))
        print(
            f"tandem: Python {running} is not supported: use Python {low[0]}.{low[1]} to {high[0]}.{high[1]}",
            file=sys.stderr,
        )
        return 2
    if sys.argv[1:] in (["--help"], ["-h"], ["help"]):
        print(USAGE, end="")
        return 0
    migrate_args = parse_migrate_args(sys.argv[2:]) if sys.argv[1:2] == ["migrate"] else None
    if sys.argv[1:] and migrate_args is None:
        print(USAGE, end="", file=sys.stderr)
        return 2
    try:
        config = config_module.load()
        tracing.setup()  # OpenTelemetry, when the OTEL_* variables ask for it (README "Tracing")
    except config_module.ConfigError as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    pipeline = logging_setup.setup(config)
    try:
        for line, key, closest in config_module.dotenv_warnings(Path(".env")):
            fields = {"file": ".env", "line": line, "key": key, "did_you_mean": closest or None}
            log.warning("config.unknown_setting", extra={"fields": fields})
        if migrate_args is not None:  # migrate DATABASE_URL up, down or show its status, and exit
            return migrate_command(config, migrate_args)
        for signum in SHUTDOWN_SIGNALS:  # until the event loop takes over (`run`)
            signal.signal(signum, lambda received, _frame: EARLY_SIGNALS.append(received))
        hypercorn_fixes.install(
            max_message_bytes=config.max_message_bytes,
            ws_compression=config.ws_compression,
            http2_cleartext=config.http2_cleartext,
            send_timeout=config.send_timeout,
        )
        gc.set_threshold(50_000, 20, 20)
        try:
            trio.run(run, config, EARLY_SIGNALS)
        except BaseException as exc:
            failure = _environment_failure(exc)
            if failure is None:
                raise
            cause = startup_failure(failure, config)
            log.critical("server.failed", extra={"fields": {"error": cause}})
            print(f"tandem: {cause}", file=sys.stderr)
            return 2
        return 0
    finally:
        tracing.shutdown()  # exports the spans left
        pipeline.stop()


if __name__ == "__main__":
    sys.exit(main())
