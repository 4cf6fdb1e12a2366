"""What happens to connections and sessions, reported once and fanned out.

The relay and the sweeper report each happening as one frozen event; the log,
the archive and the metrics subscribe. This module is the one place that says
what each of them does with each event, so a new event or a new subscriber is
one change here. Subscribers run on the event loop and never block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from archive import Recorder
from metrics import Metrics
from protocol import TandemError

log = logging.getLogger("tandem")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    conn: str
    ip: str | None  # logged as a keyed hash, never as is


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    conn: str
    code: int  # the close code sent; 1006 when the peer went away first
    duration_s: float
    messages_in: int
    messages_out: int


@dataclass(frozen=True, slots=True)
class ConnectionIdle:
    """A socket in no session for IDLE_SOCKET_TIMEOUT; it is closed."""

    conn: str


@dataclass(frozen=True, slots=True)
class SessionCreated:
    code: str
    conn: str


@dataclass(frozen=True, slots=True)
class SessionPaired:
    code: str
    conn: str  # the member that joined


@dataclass(frozen=True, slots=True)
class SessionResumed:
    code: str
    recovered: bool


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """A join or resume failed (`kind` "join" or "resume")."""

    kind: str
    code: str
    error: str  # the error code


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member left with `session:leave`; `ended` when it was the last one."""

    code: str
    conn: str
    ended: bool


@dataclass(frozen=True, slots=True)
class SessionExpired:
    code: str
    reason: str  # "idle" or "ttl"


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """An operator ended the session (admin API): its members got `session:expired` "ended"."""

    code: str


@dataclass(frozen=True, slots=True)
class MessageAcked:
    """A message was stored and acknowledged; `seconds` from reading it to the ack."""

    code: str
    seq: int
    sender: str
    data: bytes
    ts: int
    seconds: float


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """A request got an `error` frame."""

    error: TandemError


LifecycleEvent = (
    ConnectionOpened
    | ConnectionClosed
    | ConnectionIdle
    | SessionCreated
    | SessionPaired
    | SessionResumed
    | AttemptFailed
    | MemberLeft
    | SessionExpired
    | SessionEnded
    | MessageAcked
    | RequestFailed
)
Report = Callable[[LifecycleEvent], None]


class Fanout:
    """Hands each event to every subscriber, in order."""

    def __init__(self, *subscribers: Report) -> None:
        self._subscribers = subscribers

    def __call__(self, event: LifecycleEvent) -> None:
        for subscriber in self._subscribers:
            subscriber(event)


def logged(event: LifecycleEvent) -> None:
    """Log lines: events, never traffic (nothing per message at INFO)."""
    match event:
        case ConnectionOpened(conn, ip):
            log.info("connection.open", extra={"fields": {"conn": conn, "ip": ip}})
        case ConnectionClosed(conn, code, duration_s, messages_in, messages_out):
            fields = {
                "conn": conn,
                "code": code,
                "duration_s": round(duration_s, 3),
                "messages_in": messages_in,
                "messages_out": messages_out,
            }
            log.info("connection.close", extra={"fields": fields})
        case ConnectionIdle(conn):
            log.info("connection.idle", extra={"fields": {"conn": conn}})
        case SessionCreated(code, conn):
            log.info("session.created", extra={"fields": {"conn": conn, "session": code}})
        case SessionPaired(code, conn):
            log.info("session.paired", extra={"fields": {"conn": conn, "session": code}})
        case MemberLeft(code, conn, True):
            log.info("session.ended", extra={"fields": {"conn": conn, "session": code, "reason": "left"}})
        case SessionExpired(code, reason):
            log.info("session.expired", extra={"fields": {"session": code, "reason": reason}})
        case SessionEnded(code):
            log.info("session.ended", extra={"fields": {"session": code, "reason": "ended"}})


def archived(archive: Recorder) -> Report:
    """Rows for the PostgreSQL archive (nothing without DATABASE_URL)."""

    def report(event: LifecycleEvent) -> None:
        match event:
            case MessageAcked(code, seq, sender, data, ts, _):
                archive.message(code, seq, sender, data, ts)
            case ConnectionOpened():
                archive.event("connection.opened", None, now_ms())
            case ConnectionClosed(_, code, duration_s, messages_in, messages_out):
                props = {
                    "code": code,
                    "duration_ms": round(duration_s * 1000),
                    "messages_in": messages_in,
                    "messages_out": messages_out,
                }
                archive.event("connection.closed", None, now_ms(), props)
            case SessionCreated(code):
                archive.session_created(code, now_ms())
            case SessionPaired(code):
                archive.session_paired(code, now_ms())
            case SessionResumed(code, recovered):
                archive.event("session.resumed", code, now_ms(), {"recovered": recovered})
            case AttemptFailed(kind, code, error):
                archive.event(f"session.{kind}_failed", code, now_ms(), {"error": error})
            case MemberLeft(code, _, True):
                archive.session_ended(code, "left", now_ms())
            case MemberLeft(code, _, False):
                archive.event("session.left", code, now_ms())
            case SessionExpired(code, reason):
                archive.session_ended(code, reason, now_ms())
            case SessionEnded(code):
                archive.session_ended(code, "ended", now_ms())

    return report


def counted(metrics: Metrics) -> Report:
    """Prometheus metrics (/metrics)."""

    def report(event: LifecycleEvent) -> None:
        match event:
            case MessageAcked(seconds=seconds):  # the hot path: one counter, one histogram
                metrics.messages.inc()
                metrics.message_seconds.observe(seconds)
            case RequestFailed(error):
                metrics.error(error)
            case ConnectionOpened():
                metrics.connections_opened.inc()
            case ConnectionClosed(code=code):
                metrics.closed(code)
            case SessionCreated():
                metrics.session_events["created"].inc()
            case SessionPaired():
                metrics.session_events["paired"].inc()
            case MemberLeft(ended=True) | SessionEnded():
                metrics.session_events["ended"].inc()
            case SessionExpired():
                metrics.session_events["expired"].inc()

    return report
