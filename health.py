"""Probes: `/health/live`, `/health/ready`, and who may read `/metrics`.

Liveness reads a task that measures event-loop lag; readiness runs named checks
(store, database, ...) concurrently under READY_TIMEOUT, cached 1 s, failing while
draining. /metrics needs METRICS_TOKEN or a loopback client, except on the
METRICS_ADDRESS listener (`MetricsListener`); its forms come from metrics.py.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import orjson
import trio
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Config
from metrics import LAG_WINDOW_S, METRICS_CACHE_S, Metrics, RenderCache
from protocol import ErrorCode, TandemError
from redaction import hide_credentials

log = logging.getLogger("tandem.health")

HEALTH_JSON = "application/health+json"
# A readiness report is reused for this long: probes cannot hammer the backends.
READY_CACHE_S = 1.0
# Session counts (a store query) are reused for this long by /metrics.
SESSIONS_CACHE_S = 5.0
JSON_FORM = "application/json"
# The lag monitor wakes this often (and remembers its worst lag LAG_WINDOW_S).
LAG_TICK_S = 0.2
# Longest failure output a probe returns.
MAX_OUTPUT = 300


class SessionCounter(Protocol):
    async def count_sessions(self, now: int) -> dict[str, int] | None:
        """Live sessions by state, or None where counting is not cheap (Redis)."""
        ...


# --- liveness ----------------------------------------------------------------------


class LoopMonitor:
    """Measures how late the event loop wakes a sleeping task.

    `lag()` is the worst lag in the last LAG_WINDOW_S, or how long the loop
    has not ticked at all, whichever is larger.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.beat = clock()
        self._samples: deque[tuple[float, float]] = deque(maxlen=int(LAG_WINDOW_S / LAG_TICK_S) + 1)

    async def run(self, max_lag: float) -> None:
        while True:
            start = self.clock()
            await trio.sleep(LAG_TICK_S)
            now = self.clock()
            lag = max(0.0, now - start - LAG_TICK_S)
            self.beat = now
            self._samples.append((now, lag))
            if lag > max_lag:
                log.warning("event_loop.stalled", extra={"fields": {"lag_s": round(lag, 3), "max_lag_s": max_lag}})

    def lag(self) -> float:
        now = self.clock()
        worst = max(0.0, now - self.beat - LAG_TICK_S)  # still stalled, seen from a request that got in first
        for at, lag in self._samples:
            if now - at <= LAG_WINDOW_S:
                worst = max(worst, lag)
        return worst


# --- readiness ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One dependency readiness asks: `probe` raises (or hangs) when it does not answer.

    A check that is not `critical` makes readiness warn (200), not fail.
    """

    name: str
    probe: Callable[[], Awaitable[object]]
    component_type: str = "datastore"
    critical: bool = True
    component_id: str | None = None  # e.g. the backend: "sqlite", "redis"


@dataclass(frozen=True, slots=True)
class Report:
    status: str  # pass, warn or fail
    checks: dict[str, list[dict[str, object]]]
    failing: tuple[str, ...]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Readiness:
    """Runs the checks concurrently, once for all concurrent probes, at most once per READY_CACHE_S."""

    def __init__(self, timeout: float, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.metrics = metrics
        self.clock = clock
        self.checks: list[Check] = []
        self._report: Report | None = None
        self._report_at = 0.0
        self._running: trio.Event | None = None

    def add(self, check: Check) -> None:
        self.checks.append(check)

    async def report(self) -> Report:
        while True:
            if self._report is not None and self.clock() - self._report_at < READY_CACHE_S:
                return self._report
            if self._running is None:
                break
            await self._running.wait()  # another probe is asking the backends: share its answer
        self._running = running = trio.Event()
        try:
            # Shielded so that a probe that goes away cannot strand the others
            # waiting; every check is bounded by the timeout.
            with trio.CancelScope(shield=True):
                report = await self._run()
        finally:
            self._running = None
            running.set()
        previous, self._report, self._report_at = self._report, report, self.clock()
        self.metrics.ready.set(0 if report.status == "fail" else 1)
        if (previous.status if previous else "pass") != report.status:
            level = logging.WARNING if report.status != "pass" else logging.INFO
            log.log(level, "ready.changed", extra={"fields": {"status": report.status, "failing": report.failing}})
        return report

    async def _run(self) -> Report:
        results: dict[str, tuple[Check, dict[str, object]]] = {}
        async with trio.open_nursery() as nursery:
            for check in self.checks:
                nursery.start_soon(self._run_one, check, results)
        failing = tuple(name for name, (_, entry) in results.items() if entry["status"] == "fail")
        status = "pass"
        if any(entry["status"] != "pass" for _, entry in results.values()):
            status = "warn"
        if any(results[name][0].critical for name in failing):
            status = "fail"
        checks = {f"{name}:responseTime": [entry] for name, (_, entry) in results.items()}
        return Report(status, checks, failing)

    async def _run_one(self, check: Check, results: dict[str, tuple[Check, dict[str, object]]]) -> None:
        start = self.clock()
        output: str | None = None
        with trio.move_on_after(self.timeout) as scope:
            try:
                await check.probe()
            except Exception as exc:  # a backend that fails is a result, not a crash
                message = exc.message if isinstance(exc, TandemError) else str(exc)
                output = hide_credentials(f"{type(exc).__name__}: {message}")[:MAX_OUTPUT]
        elapsed = self.clock() - start
        if scope.cancelled_caught:
            output = f"no answer within {self.timeout:g} s (READY_TIMEOUT)"
        status = "fail" if output is not None else "warn" if elapsed > self.timeout / 2 else "pass"
        entry: dict[str, object] = {
            "componentId": check.component_id or check.name,
            "componentType": check.component_type,
            "observedValue": round(elapsed * 1000, 3),
            "observedUnit": "ms",
            "status": status,
            "time": _now_iso(),
        }
        if output is not None:
            entry["output"] = output
        results[check.name] = (check, entry)


# --- the endpoints -----------------------------------------------------------------


def _health_response(body: Mapping[str, object], ok: bool) -> Response:
    return Response(
        orjson.dumps(body), 200 if ok else 503, media_type=HEALTH_JSON, headers={"Cache-Control": "no-store"}
    )


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def is_loopback(address: str) -> bool:
    """`address` is an IP address of this host's loopback (IPv4-mapped IPv6 included)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def from_loopback(scope: Scope, client_ip: Callable[[Scope], str]) -> bool:
    """A request from this host: its socket's peer is loopback and, through a
    trusted proxy, so is the client the proxy names. The peer is checked too,
    because a peer in TRUSTED_PROXIES (a pod in a private range) could name
    127.0.0.1 in X-Forwarded-For."""
    return is_loopback(_peer(scope)) and is_loopback(client_ip(scope))


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.lower() == b.lower()


class Health:
    """The probes and /metrics of one server, and the lag monitor task they read.

    `client_ip` resolves a request's client address (through TRUSTED_PROXIES);
    without METRICS_TOKEN, /metrics on the main port is served to loopback only.
    """

    def __init__(
        self, config: Config, metrics: Metrics, store: SessionCounter, client_ip: Callable[[Scope], str] = _peer
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.client_ip = client_ip
        self.monitor = LoopMonitor()
        self.readiness = Readiness(config.ready_timeout, metrics)
        self.rendered = RenderCache(METRICS_CACHE_S)
        self.stopping = False  # SIGTERM seen: readiness fails from now on
        self._counter = store
        self._sessions: dict[str, int] = {}
        self._sessions_at = -SESSIONS_CACHE_S
        self._token = config.metrics_token.encode()
        # The METRICS_ADDRESS listener as (host, port); requests arriving there are told apart by port.
        self.listener: tuple[str, int] | None = None
        if config.metrics_address is not None:
            host, _, port = config.metrics_address.rpartition(":")
            self.listener = (host.strip("[]"), int(port))
        metrics.loop_lag.set_function(self.monitor.lag)

    async def run(self) -> None:
        """The lag monitor; runs until cancelled."""
        await self.monitor.run(self.config.liveness_max_lag)

    def stop(self) -> None:
        """Shutdown has begun: readiness fails at once (load balancers stop sending clients)."""
        self.stopping = True
        self.metrics.draining.set(1)
        self.metrics.ready.set(0)

    def routes(self) -> list[BaseRoute]:
        """The main port's routes: /metrics asks for credentials."""
        return [
            Route("/health/live", self.live),
            Route("/health/ready", self.ready),
            Route("/metrics", self.metrics_endpoint),
        ]

    def listener_routes(self) -> list[BaseRoute]:
        """The METRICS_ADDRESS listener's routes: the probes and /metrics, no credentials."""
        return [
            Route("/health/live", self.live),
            Route("/health/ready", self.ready),
            Route("/metrics", self.scrape),
        ]

    def on_listener(self, scope: Scope) -> bool:
        """The request came in on the METRICS_ADDRESS listener (by the local port it reached)."""
        server = scope.get("server")
        if self.listener is None or not server or server[1] != self.listener[1]:
            return False
        if self.listener[1] != self.config.port:
            return True
        # The main listener has the same port on another address: the local
        # address decides; one that cannot be matched falls to the main port's rules.
        return _same_host(str(server[0]), self.listener[0])

    async def live(self, request: Request) -> Response:
        lag = self.monitor.lag()
        if lag <= self.config.liveness_max_lag:
            return _health_response({"status": "pass"}, True)
        check = {
            "componentType": "system",
            "observedValue": round(lag, 3),
            "observedUnit": "s",
            "status": "fail",
            "output": f"event loop lag over LIVENESS_MAX_LAG ({self.config.liveness_max_lag:g} s)",
        }
        return _health_response({"status": "fail", "checks": {"eventLoop:lag": [check]}}, False)

    async def ready(self, request: Request) -> Response:
        if self.stopping:
            draining = {"componentType": "system", "status": "fail", "output": "shutting down"}
            body = {"status": "fail", "output": "draining", "checks": {"server:draining": [draining]}}
            return _health_response(body, False)
        report = await self.readiness.report()
        body = {"status": report.status, "checks": report.checks}
        if report.failing:
            body["output"] = "failing: " + ", ".join(report.failing)
        return _health_response(body, report.status != "fail")

    async def sessions(self) -> dict[str, int]:
        """Live sessions by state from the store, reused for SESSIONS_CACHE_S; {} if unknown."""
        if time.monotonic() - self._sessions_at < SESSIONS_CACHE_S:
            return self._sessions
        self._sessions_at = time.monotonic()  # a failing store is asked again only after the cache time
        # A store error is counted and logged by the store's observer; the last counts stay.
        with trio.move_on_after(self.config.ready_timeout), contextlib.suppress(TandemError):
            self._sessions = await self._counter.count_sessions(time.time_ns() // 1_000_000) or {}
        self.metrics.set_sessions(self._sessions)
        return self._sessions

    async def metrics_endpoint(self, request: Request) -> Response:
        """/metrics on the main port: with METRICS_TOKEN its bearer token, else a loopback client."""
        refusal = self._refusal(request)
        if refusal is not None:
            self.metrics.refused(ErrorCode.UNAUTHORIZED)
            return refusal
        return await self.scrape(request)

    def _refusal(self, request: Request) -> Response | None:
        if self._token:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # Header values are latin-1 (Starlette decodes them so): these are the bytes
            # sent. compare_digest takes as long however much of the token matches.
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self._token):
                return None
            return _unauthorized(
                401, "/metrics needs Authorization: Bearer METRICS_TOKEN", {"WWW-Authenticate": "Bearer"}
            )
        if from_loopback(request.scope, self.client_ip):
            return None
        return _unauthorized(403, "/metrics is served to loopback clients only (see METRICS_TOKEN, METRICS_ADDRESS)")

    async def scrape(self, request: Request) -> Response:
        """The metrics, as JSON or the exposition format the scraper accepts, from the render cache."""
        accept = request.headers.get("accept", "")
        if JSON_FORM in accept:
            body = await self.rendered.get(JSON_FORM, self._render_json)
            return Response(body, media_type=JSON_FORM)
        encode, content_type = choose_encoder(accept)

        async def render() -> bytes:
            await self.sessions()  # sets the tandem_sessions gauges
            return bytes(encode(self.metrics.registry))

        body = await self.rendered.get(content_type, render)
        return Response(body, headers={"Content-Type": content_type})

    async def _render_json(self) -> bytes:
        return orjson.dumps(self.metrics.summary(await self.sessions()))


def _unauthorized(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = {"error": {"code": str(ErrorCode.UNAUTHORIZED), "message": message}}
    return JSONResponse(body, status, headers={"Cache-Control": "no-store", **(headers or {})})


class MetricsListener:
    """ASGI middleware: a request that reached the METRICS_ADDRESS listener gets the probes
    and /metrics (no credentials) and nothing else (404); others pass to the app."""

    def __init__(self, app: ASGIApp, health: Health) -> None:
        self.app = app
        self.health = health
        self.router = Router(routes=health.listener_routes(), redirect_slashes=False, default=_not_found)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.health.on_listener(scope):
            await self.router(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    body = {"error": {"code": str(ErrorCode.NOT_FOUND), "message": "METRICS_ADDRESS serves /metrics and /health/*"}}
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})  # no HTTP denial possible: refuse the handshake
        return
    await JSONResponse(body, 404)(scope, receive, send)
