"""Prometheus metrics: one registry of the server's own, every label set fixed.

`Metrics` holds every metric, the process, platform and GC collectors, and the
JSON summary; `StoreMetrics` times a store's operations; `RenderCache` shares
each rendered form of /metrics among all scrapes for METRICS_CACHE_S.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from logging_setup import Throttle
from protocol import CloseCode, ErrorCode, ServerError, TandemError

# Rate-limit and store-error lines keep the logger name they have always had.
log = logging.getLogger("tandem.health")

# A rendered /metrics (each form: text, OpenMetrics, JSON) is served for this
# long: a flood of scrapes costs one render per second, not one each.
METRICS_CACHE_S = 1.0
# Times a scrape waits for another's render before rendering itself (bounds the wait).
MAX_RENDER_WAITS = 3
# The lag gauge reports the worst lag this long (health.LoopMonitor keeps the window).
LAG_WINDOW_S = 5.0

# Store operations that are timed; `append` only counts its errors: its latency
# is tandem_message_handling_seconds (one histogram per message, not two).
TIMED_STORE_OPS = ("create", "join", "resume", "leave", "disconnect", "sweep", "check", "count_sessions")
STORE_OPS = (*TIMED_STORE_OPS, "append")
# Label values are fixed sets: nothing a client sends becomes a label.
SESSION_STATES = ("waiting", "paired")
SESSION_EVENTS = ("created", "paired", "ended", "expired")
RATE_LIMITS = (
    "messages_user",
    "messages_ip",
    "connections_ip",
    "join_failures_ip",
    "code_failures",
    "api_ip",
    "email_session",
    "email_recipient",
    "max_sockets",
    "max_sockets_ip",
)
CLOSE_CODES = (*(str(int(code)) for code in CloseCode), "1006")
OTHER = "other"

MESSAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.connection_crashes = Counter(
            "tandem_connection_crashes",
            "Connections ended by an unexpected server error (logged as connection.crashed)",
            registry=registry,
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

        self._throttle = Throttle(log)

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

    def store_error(self, backend: str, op: str, exc: ServerError, location: str = "") -> None:
        self.store_errors.labels(backend, op).inc()
        fields = {"backend": backend, "store": location, "op": op, "code": str(exc.code), "error": exc.message}
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


class StoreMetrics:
    """A store's observer (session_store.timed): its operations' latency and failures."""

    def __init__(self, metrics: Metrics, backend: str, location: str = "") -> None:
        self._metrics = metrics
        self._backend = backend
        self._location = location
        self._seconds = {op: metrics.store_seconds.labels(backend, op) for op in TIMED_STORE_OPS}

    def observe(self, op: str, seconds: float) -> None:
        histogram = self._seconds.get(op)
        if histogram is not None:
            histogram.observe(seconds)

    def failed(self, op: str, error: ServerError) -> None:
        self._metrics.store_error(self._backend, op, error, self._location)


# --- the render cache ----------------------------------------------------------------


class RenderCache:
    """Rendered bodies by form, each reused for `ttl` s; concurrent callers share one render."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.renders = 0  # how many times `render` ran: what the cache saves is scrapes minus this
        self._done: dict[str, tuple[float, bytes]] = {}  # form: (rendered at, body)
        self._running: dict[str, trio.Event] = {}

    async def get(self, form: str, render: Callable[[], Awaitable[bytes]]) -> bytes:
        for _ in range(MAX_RENDER_WAITS):
            done = self._done.get(form)
            if done is not None and self.clock() - done[0] < self.ttl:
                return done[1]
            running = self._running.get(form)
            if running is None:
                break
            await running.wait()  # another scrape is rendering this form: share its body
        self._running[form] = running = trio.Event()
        try:
            started = self.clock()
            self.renders += 1
            # Shielded so that a scraper that goes away cannot strand the ones
            # waiting; a render is bounded (the session count by READY_TIMEOUT).
            with trio.CancelScope(shield=True):
                body = await render()
            self._done[form] = (started, body)
        finally:
            if self._running.get(form) is running:
                del self._running[form]
            running.set()
        return body
