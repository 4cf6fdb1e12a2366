"""Probes and metrics: `/health/live`, `/health/ready` and `/metrics`.

Liveness reads a task that measures event-loop lag; readiness runs named checks
(store, database, ...) concurrently under READY_TIMEOUT, cached 1 s, failing
while draining. Metrics: one prometheus_client registry, fixed label sets.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

import orjson
import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

import logging_setup
from config import Config
from protocol import CloseCode, ErrorCode, ServerError, TandemError

log = logging.getLogger("tandem.health")

HEALTH_JSON = "application/health+json"
# A readiness report is reused for this long: probes cannot hammer the backends.
READY_CACHE_S = 1.0
# Session counts (a store query) are reused for this long by /metrics.
SESSIONS_CACHE_S = 5.0
# The lag monitor wakes this often and remembers its worst lag this long.
LAG_TICK_S = 0.2
LAG_WINDOW_S = 5.0
# Longest failure output a probe returns.
MAX_OUTPUT = 300

# Store operations that are timed; `append` only counts its errors: its latency
# is tandem_message_handling_seconds (one histogram per message, not two).
TIMED_STORE_OPS = ("create", "join", "resume", "leave", "disconnect", "sweep", "check", "count_sessions")
STORE_OPS = (*TIMED_STORE_OPS, "append")
# Label values are fixed sets: nothing a client sends becomes a label.
SESSION_STATES = ("waiting", "paired")
SESSION_EVENTS = ("created", "paired", "ended", "expired")
RATE_LIMITS = ("messages_user", "messages_ip", "connections_ip", "join_failures_ip", "api_ip")
CLOSE_CODES = (*(str(int(code)) for code in CloseCode), "1006")
OTHER = "other"

MESSAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

S = TypeVar("S")


# --- metrics -----------------------------------------------------------------------


class Metrics:
    """The server's metrics, in a registry of its own, with every label set fixed."""

    def __init__(self, connections: Callable[[], int] = lambda: 0) -> None:
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series
        self.started = time.monotonic()
        self.registry = registry = CollectorRegistry()
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)

        self.connections = Gauge("tandem_connections", "Open WebSocket connections", registry=registry)
        self.connections.set_function(lambda: float(connections()))
        self.connections_opened = Counter(
            "tandem_connections_opened", "WebSocket connections accepted", registry=registry
        )
        closed = Counter(
            "tandem_connections_closed", "WebSocket connections closed, by close code", ["code"], registry=registry
        )
        self._closed = {code: closed.labels(code) for code in (*CLOSE_CODES, OTHER)}

        sessions = Gauge("tandem_sessions", "Live sessions, by state", ["state"], registry=registry)
        self._sessions = {state: sessions.labels(state) for state in SESSION_STATES}
        events = Counter("tandem_session_events", "Session lifecycle events", ["event"], registry=registry)
        self.session_events = {event: events.labels(event) for event in SESSION_EVENTS}

        self.messages = Counter("tandem_messages", "Messages stored and acknowledged", registry=registry)
        self.message_seconds = Histogram(
            "tandem_message_handling_seconds",
            "From a message:send read to its message:ack queued (the store commit included)",
            buckets=MESSAGE_BUCKETS,
            registry=registry,
        )
        errors = Counter("tandem_errors", "Error frames and refusals sent, by error code", ["code"], registry=registry)
        self._errors = {str(code): errors.labels(str(code)) for code in ErrorCode}
        limited = Counter(
            "tandem_rate_limited", "Requests refused by a rate limit, by limit", ["limit"], registry=registry
        )
        self._limited = {name: limited.labels(name) for name in (*RATE_LIMITS, OTHER)}

        self.store_seconds = Histogram(
            "tandem_store_operation_seconds",
            "Store operation latency, by backend and operation",
            ["backend", "op"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "tandem_store_errors",
            "Store operations that failed, by backend and operation",
            ["backend", "op"],
            registry=registry,
        )

        self.loop_lag = Gauge(
            "tandem_event_loop_lag_seconds", f"Worst event-loop lag in the last {LAG_WINDOW_S:g} s", registry=registry
        )
        self.ready = Gauge("tandem_ready", "1 while /health/ready passes or warns", registry=registry)
        self.draining = Gauge("tandem_draining", "1 once shutdown has begun", registry=registry)

        self._throttle = logging_setup.Throttle(log)

    def closed(self, code: int) -> None:
        self._closed.get(str(code), self._closed[OTHER]).inc()

    def error(self, exc: TandemError) -> None:
        """Count an error sent to a client; a rate-limit error also counts against its limit."""
        self._errors[str(exc.code)].inc()
        if exc.code == ErrorCode.RATE_LIMITED:
            self.rate_limited(_limit_named_in(exc.message), counted=True)

    def refused(self, code: ErrorCode) -> None:
        """Count a WebSocket handshake refused with an HTTP error."""
        self._errors[str(code)].inc()

    def rate_limited(self, limit: str, counted: bool = False) -> None:
        """A request refused by `limit`: counted every time, logged at most every 10 s per limit."""
        if not counted:
            self._errors[str(ErrorCode.RATE_LIMITED)].inc()
        name = limit if limit in self._limited else OTHER
        self._limited[name].inc()
        self._throttle.log(logging.WARNING, "rate_limit.refused", name, {"limit": name})

    def store_error(self, backend: str, op: str, exc: ServerError) -> None:
        self.store_errors.labels(backend, op).inc()
        fields = {"backend": backend, "op": op, "code": str(exc.code), "error": exc.message}
        self._throttle.log(logging.WARNING, "store.error", f"{backend}:{op}:{exc.code}", fields)

    def set_sessions(self, counts: dict[str, int]) -> None:
        for state, child in self._sessions.items():
            child.set(counts.get(state, 0))

    def values(self) -> dict[str, float]:
        """Tandem's unlabelled samples and label sums, by sample name (one collection)."""
        totals: dict[str, float] = {}
        for family in self.registry.collect():
            if family.name.startswith("tandem_"):
                for sample in family.samples:
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def summary(self, sessions: dict[str, int]) -> dict[str, Any]:
        """The JSON view of /metrics: uptime, memory, cpu, connections, sessions, messages."""
        values = self.values()
        handled = values.get("tandem_message_handling_seconds_count", 0.0)
        seconds = values.get("tandem_message_handling_seconds_sum", 0.0)
        return {
            "uptime": round(time.monotonic() - self.started, 3),
            "memory": {"rss_bytes": _rss_bytes()},
            "cpu": {"seconds": round(time.process_time(), 3)},
            "connections": {
                "open": int(values.get("tandem_connections", 0)),
                "opened": int(values.get("tandem_connections_opened_total", 0)),
            },
            "sessions": sessions,
            "messages": {
                "total": int(values.get("tandem_messages_total", 0)),
                "mean_handling_ms": round(seconds / handled * 1000, 3) if handled else None,
                "errors": int(values.get("tandem_errors_total", 0)),
                "rate_limited": int(values.get("tandem_rate_limited_total", 0)),
            },
        }


def _limit_named_in(message: str) -> str:
    match = re.search(r"rate limit (\w+)", message)
    return match.group(1) if match else OTHER


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def instrument_store(store: S, metrics: Metrics, backend: str) -> S:
    """Time this store's operations and count their errors, in place.

    The store keeps its class and every other attribute: only the bound
    methods named in STORE_OPS of this one instance are wrapped, so a store
    with more methods (or fewer) needs no change here.
    """
    for op in STORE_OPS:
        method = getattr(store, op, None)
        if method is not None:
            setattr(store, op, _instrumented(method, metrics, backend, op))
    return store


def _instrumented(
    method: Callable[..., Awaitable[Any]], metrics: Metrics, backend: str, op: str
) -> Callable[..., Awaitable[Any]]:
    observe = metrics.store_seconds.labels(backend, op).observe if op in TIMED_STORE_OPS else None

    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        except ServerError as exc:  # the backend failed (a client's mistake is a ClientError)
            metrics.store_error(backend, op, exc)
            raise
        finally:
            if observe is not None:
                observe(time.perf_counter() - start)

    return call


@runtime_checkable
class SessionCounter(Protocol):
    async def count_sessions(self, now: int) -> dict[str, int]: ...


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
                output = logging_setup.hide_credentials(f"{type(exc).__name__}: {message}")[:MAX_OUTPUT]
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


class Health:
    """The probes and /metrics of one server, and the lag monitor task they read."""

    def __init__(self, config: Config, metrics: Metrics, store: object) -> None:
        self.config = config
        self.metrics = metrics
        self.monitor = LoopMonitor()
        self.readiness = Readiness(config.ready_timeout, metrics)
        self.stopping = False  # SIGTERM seen: readiness fails from now on
        self._counter = store if isinstance(store, SessionCounter) else None
        self._sessions: dict[str, int] = {}
        self._sessions_at = -SESSIONS_CACHE_S
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
        return [
            Route("/health/live", self.live),
            Route("/health/ready", self.ready),
            Route("/metrics", self.metrics_endpoint),
        ]

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
        if self._counter is None or time.monotonic() - self._sessions_at < SESSIONS_CACHE_S:
            return self._sessions
        self._sessions_at = time.monotonic()  # a failing store is asked again only after the cache time
        # A store error is counted and logged by instrument_store; the last counts stay.
        with trio.move_on_after(self.config.ready_timeout), contextlib.suppress(TandemError):
            self._sessions = await self._counter.count_sessions(time.time_ns() // 1_000_000)
        self.metrics.set_sessions(self._sessions)
        return self._sessions

    async def metrics_endpoint(self, request: Request) -> Response:
        sessions = await self.sessions()
        accept = request.headers.get("accept", "")
        if "application/json" in accept:
            return Response(orjson.dumps(self.metrics.summary(sessions)), media_type="application/json")
        encode, content_type = choose_encoder(accept)
        return Response(encode(self.metrics.registry), headers={"Content-Type": content_type})
