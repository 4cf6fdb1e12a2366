"""Structured logging: one redacted line per event, written off the event loop.

One QueueHandler on the root logger serves Tandem and Hypercorn alike: the
calling thread builds the line (fields bound with `bind`, one redaction step);
one QueueListener thread writes it as JSON or console text to stdout and LOG_FILE.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import queue
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from datetime import UTC, date, datetime
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import Any, Protocol, TextIO

import orjson

from config import Config

# Records waiting for the writer thread; when full, records are dropped and counted.
QUEUE_SIZE = 10_000
# How long `Pipeline.stop` waits for the writer thread to write what is queued.
STOP_TIMEOUT_S = 5.0
# Longest string kept in a line; tracebacks get more room.
MAX_STRING = 2_000
MAX_EXCEPTION = 16_000
# Items kept from a list and depth kept in nested fields.
MAX_ITEMS = 50
MAX_DEPTH = 4
# Requests Hypercorn's access log reports at DEBUG only: probes, scrapes, upgrades.
QUIET_PATHS = ("/health/", "/metrics")

LINE_KEYS = frozenset({"timestamp", "level", "event", "logger", "exception"})
# Field names whose values never appear, whatever they hold.
SECRET_KEY_PARTS = ("token", "secret", "password", "passwd", "authorization", "cookie", "credential", "api_key")
BODY_KEYS = frozenset({"data", "body", "payload", "text", "content"})
# Field names that hold a client address.
IP_KEYS = frozenset({"ip", "client_ip", "remote_addr", "peer_ip"})
# The server's own listening addresses: configuration, not client addresses.
VERBATIM_KEYS = frozenset({"addresses"})
REDACTED = "[redacted]"

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s/@:]*):([^\s/@]*)@")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:access_token|token|api_key|key|secret|password|auth|signature|sig)=)[^&\s#]*")
_EMAIL = re.compile(
    r"(?<![\w.+-])([A-Za-z0-9])[A-Za-z0-9._%+-]*@([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+)"
)
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# A run of 32+ URL-safe characters in both cases looks like a secret (Tandem's
# tokens are 43): hidden even where no field name says so.
_SECRET_RUN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])")
# Characters that end a line for some reader; JSON escapes those below 0x20.
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PLAIN = re.compile(r"[\w.:/@+\-\[\]]+")
_PORT = re.compile(r":\d+$")


class LogSubject(Protocol):
    """What a connection exposes to its log lines: its id and its session code."""

    id: str
    code: str | None


_subject: ContextVar[LogSubject | None] = ContextVar("tandem_log_subject", default=None)


def bind(subject: LogSubject) -> Token[LogSubject | None]:
    """Add `conn` and `session` (read when a line is logged) to every line of this task and its children."""
    return _subject.set(subject)


def unbind(token: Token[LogSubject | None]) -> None:
    _subject.reset(token)


# --- redaction ----------------------------------------------------------------


class Redactor:
    """The one redaction step every line goes through.

    Values of secret-named fields and message bodies are replaced; in every
    other string, IP addresses become a keyed hash (or their /24 or /48
    network), e-mail addresses are masked, URL passwords, auth headers, secret
    query parameters and token-like runs are hidden, and long strings are cut.
    """

    def __init__(self, ip_mode: str, key: bytes) -> None:
        self.ip_mode = ip_mode
        self._key = key

    def ip(self, address: str) -> str:
        """A client address as it may appear in a log."""
        try:
            parsed = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            return REDACTED
        if parsed.is_unspecified:
            return str(parsed)
        if self.ip_mode == "truncate":
            prefix = 24 if parsed.version == 4 else 48
            return str(ipaddress.ip_network(f"{parsed}/{prefix}", strict=False))
        digest = hmac.new(self._key, parsed.packed, hashlib.sha256).hexdigest()
        return f"ip-{digest[:16]}"

    def _ip_match(self, match: re.Match[str]) -> str:
        return self.ip(match.group(0)) if _is_ip(match.group(0)) else match.group(0)

    def text(self, value: str, limit: int = MAX_STRING) -> str:
        if len(value) > limit:
            value = value[:limit] + f"...[{len(value) - limit} more]"
        value = hide_credentials(value)
        value = _EMAIL.sub(r"\1***@\2", value)
        value = _IPV4.sub(self._ip_match, value)
        if value.count(":") >= 2:
            value = _IPV6.sub(self._ip_match, value)
        return _SECRET_RUN.sub(_hide_secret_run, value)

    def field(self, key: str, value: object, depth: int = 0) -> object:
        lowered = key.lower()
        if any(part in lowered for part in SECRET_KEY_PARTS) or lowered in BODY_KEYS:
            return REDACTED
        if lowered in IP_KEYS and isinstance(value, str):
            return self.ip(value)
        return self.value(value, depth)

    def value(self, value: object, depth: int = 0) -> object:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return f"[{len(value)} bytes]"  # message bodies travel as bytes: never shown
        if depth >= MAX_DEPTH:
            return "[nested]"
        if isinstance(value, Mapping):
            return {str(k): self.field(str(k), v, depth + 1) for k, v in list(value.items())[:MAX_ITEMS]}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v, depth + 1) for v in list(value)[:MAX_ITEMS]]
        return self.text(str(value))

    def line(self, record: logging.LogRecord, subject: LogSubject | None = None) -> dict[str, object]:
        """The line for `record`: timestamp, level, event, logger, context, fields, exception."""
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "timestamp": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": self.text(record.getMessage()),
            "logger": record.name,
        }
        if subject is not None:
            line["conn"] = self.text(subject.id)
            if subject.code is not None:
                line["session"] = self.text(subject.code)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for raw_key, value in fields.items():
                key = str(raw_key)
                if key in VERBATIM_KEYS:
                    line[key] = value
                else:
                    line[f"{key}_" if key in LINE_KEYS else key] = self.field(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            line["exception"] = self.text(text, MAX_EXCEPTION)
        elif record.exc_text:
            line["exception"] = self.text(record.exc_text, MAX_EXCEPTION)
        return line


def hide_credentials(text: str) -> str:
    """URL passwords, auth headers and secret query parameters hidden: for text that is not a log line."""
    text = _URL_USERINFO.sub(r"\1\2:***@", text)
    text = _AUTH_SCHEME.sub(r"\1 " + REDACTED, text)
    return _QUERY_SECRET.sub(r"\1" + REDACTED, text)


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _hide_secret_run(match: re.Match[str]) -> str:
    run = match.group(0)
    return REDACTED if run.lower() != run and run.upper() != run else run


# --- formatting ------------------------------------------------------------------


def _line_of(record: logging.LogRecord, fallback: Redactor) -> dict[str, object]:
    line = getattr(record, "line", None)
    if isinstance(line, dict):
        return line
    return fallback.line(record, _subject.get())


class JsonFormatter(logging.Formatter):
    """One JSON object per line; no string can break the line."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        text = orjson.dumps(_line_of(record, self.redactor), default=str).decode()
        # orjson escapes control characters; these three end a line for some readers.
        return _LINE_BREAKS.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


_LEVEL_COLOURS = {"debug": "2", "info": "32", "warning": "33", "error": "31", "critical": "1;31"}


class ConsoleFormatter(logging.Formatter):
    """`time LEVEL event key=value ...` for a developer's terminal, coloured unless NO_COLOR is set."""

    def __init__(self, redactor: Redactor, colour: bool) -> None:
        super().__init__()
        self.redactor = redactor
        self.colour = colour

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def format(self, record: logging.LogRecord) -> str:
        line = dict(_line_of(record, self.redactor))
        level = str(line.pop("level"))
        parts = [
            self._paint("2", str(line.pop("timestamp"))),
            self._paint(_LEVEL_COLOURS.get(level, "0"), f"{level.upper():<8}"),
            self._paint("1", _escape(str(line.pop("event")))),
        ]
        line.pop("logger")
        exception = line.pop("exception", None)
        parts.extend(f"{self._paint('36', key)}={_render(value)}" for key, value in line.items())
        text = " ".join(parts)
        if exception is not None:
            # Every traceback line is prefixed: nothing in it can pass for a log line.
            text += "".join(f"\n    | {_escape(row)}" for row in str(exception).splitlines())
        return text


def _escape(text: str) -> str:
    return _CONTROLS.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def _render(value: object) -> str:
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return value
    return _escape(orjson.dumps(value, default=str).decode())


# --- the log file --------------------------------------------------------------------


def _utc_day(timestamp: float) -> date:
    return datetime.fromtimestamp(timestamp, UTC).date()


class DailyFileHandler(logging.FileHandler):
    """Appends to `path`; the first record of a new UTC day renames it `path.YYYY-MM-DD`.

    Each rotated file holds one UTC day; the newest `retention` of them are
    kept. `clock` (seconds since the epoch) decides the day, so tests can
    drive midnight.
    """

    def __init__(self, path: Path, retention: int, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, encoding="utf-8")
        self.path = Path(self.baseFilename)
        self.retention = retention
        self.clock = clock
        written = path.stat().st_mtime if path.stat().st_size else clock()
        self.day = _utc_day(written)

    def emit(self, record: logging.LogRecord) -> None:
        today = _utc_day(self.clock())
        if today > self.day:
            try:
                self.rotate()
            except OSError:
                self.handleError(record)
            self.day = today
        super().emit(record)

    def rotate(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # reopened by FileHandler.emit
        if self.path.exists() and self.path.stat().st_size:
            target = self.path.with_name(f"{self.path.name}.{self.day.isoformat()}")
            n = 0
            while target.exists():  # the clock went back: keep both
                n += 1
                target = self.path.with_name(f"{self.path.name}.{self.day.isoformat()}.{n}")
            os.replace(self.path, target)
        for old in self.rotated()[: -self.retention]:
            old.unlink(missing_ok=True)

    def rotated(self) -> list[Path]:
        """The rotated files, oldest first."""
        pattern = re.compile(re.escape(self.path.name) + r"\.(\d{4}-\d{2}-\d{2})(?:\.(\d+))?")
        found: list[tuple[str, int, Path]] = []
        for path in self.path.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.append((match.group(1), int(match.group(2) or 0), path))
        return [path for _, _, path in sorted(found)]


# --- the pipeline ---------------------------------------------------------------------


class _ContextQueueHandler(QueueHandler):
    """In the logging thread: build the redacted line; the writer thread formats it."""

    def __init__(self, log_queue: queue.Queue[Any], redactor: Redactor) -> None:
        super().__init__(log_queue)
        self.redactor = redactor
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        line = self.redactor.line(record, _subject.get())
        prepared = logging.makeLogRecord({"name": record.name, "levelno": record.levelno})
        prepared.levelname = record.levelname
        prepared.created = record.created
        prepared.msg = line["event"]
        prepared.line = line
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                notice = logging.makeLogRecord({"name": "tandem.log", "levelno": logging.WARNING})
                notice.levelname = "WARNING"
                notice.msg = "log.dropped"
                notice.fields = {"lines": self.dropped}
                self.queue.put_nowait(self.prepare(notice))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1  # never block the event loop on a slow log reader


class _Listener(QueueListener):
    def stop(self) -> None:
        """Write what is queued, waiting at most STOP_TIMEOUT_S."""
        thread = self._thread
        if thread is None:
            return
        try:
            self.queue.put(self._sentinel, timeout=STOP_TIMEOUT_S)  # type: ignore[attr-defined]
        except queue.Full:
            return
        thread.join(STOP_TIMEOUT_S)
        self._thread = None


class _AccessLog(logging.Filter):
    """Hypercorn's access record to `http.request` with fields; probes, scrapes and upgrades at DEBUG.

    Hypercorn's record carries every request header and the whole environment
    as arguments: only the fields below are kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        atoms: Any = record.args
        if not isinstance(atoms, Mapping):
            return True
        status, path = str(atoms["s"]), str(atoms["U"])
        host = _PORT.sub("", str(atoms["h"]))  # "host:port"
        agent = str(atoms["a"])
        record.msg, record.args = "http.request", None
        record.fields = {
            "method": str(atoms["m"]),
            "path": path,
            "status": int(status) if status.isdigit() else None,
            "duration_ms": round(int(atoms["D"]) / 1000, 3),
            "ip": host if host != "-" else None,
            "user_agent": agent[:200] if agent != "-" else None,
        }
        # 101: the socket's own lines follow; "-": the client went before the response.
        if status in ("101", "-") or path.startswith(QUIET_PATHS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _HypercornStartup(logging.Filter):
    """Drop Hypercorn's `Running on ...` line: `server.listening` says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Running on "))


class Pipeline:
    """The queue, its handler for loggers, and the writer thread with its outputs."""

    def __init__(self, config: Config, stream: TextIO, clock: Callable[[], float] = time.time) -> None:
        key = config.log_ip_key.encode() if config.log_ip_key else secrets.token_bytes(32)
        self.redactor = Redactor(config.log_ip_mode, key)
        fmt = config.log_format
        if fmt == "auto":
            fmt = "console" if _isatty(stream) else "json"
        console = ConsoleFormatter(self.redactor, colour="NO_COLOR" not in os.environ)
        main = logging.StreamHandler(stream)
        main.setFormatter(console if fmt == "console" else JsonFormatter(self.redactor))
        self.outputs: list[logging.Handler] = [main]
        if config.log_file is not None:
            self.file = DailyFileHandler(config.log_file, config.log_retention_days, clock)
            self.file.setFormatter(JsonFormatter(self.redactor))
            self.outputs.append(self.file)
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self.handler = _ContextQueueHandler(self.queue, self.redactor)
        self.handler.setLevel(config.log_level)
        self.listener = _Listener(self.queue, *self.outputs)

    def start(self) -> Pipeline:
        self.listener.start()
        return self

    def stop(self) -> None:
        self.listener.stop()
        for output in self.outputs:
            output.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def setup(config: Config, stream: TextIO | None = None) -> Pipeline:
    """Route every logger through one pipeline; call `stop()` on the result before exit."""
    pipeline = Pipeline(config, stream or sys.stdout).start()
    root = logging.getLogger()
    root.handlers[:] = [pipeline.handler]
    root.setLevel(config.log_level)
    access = logging.getLogger("hypercorn.access")
    access.filters[:] = [_AccessLog()]
    access.propagate = True
    logging.getLogger("hypercorn.error").filters[:] = [_HypercornStartup()]
    return pipeline


class Throttle:
    """Logs an event at most once per `interval` per key; the line counts the ones suppressed.

    For events that can come once per request (rate limiting, backend
    errors): the first is logged at once, repeats within the interval are
    only counted. Metrics count every one.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key: (last logged at, suppressed since)

    def log(self, level: int, event: str, key: str, fields: Mapping[str, object]) -> bool:
        """Log now or count; True if a line was logged."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()  # bounded: forgetting only lets one extra line through
        self._last[key] = (now, 0)
        self.logger.log(level, event, extra={"fields": {**fields, "suppressed": last[1] if last else 0}})
        return True
