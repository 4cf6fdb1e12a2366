"""Structured logging: one redacted line per event, written off the event loop.

One QueueHandler on the root logger serves Tandem and Hypercorn alike: the calling
thread builds the line (fields bound with `bind`, redaction.py's one step); one
QueueListener thread writes it as JSON or console text to stdout and LOG_FILE.
"""

from __future__ import annotations

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
from typing import Any, TextIO

import orjson

from config import Config
from redaction import LogSubject, Redactor

# Records waiting for the writer thread; when full, records are dropped and counted.
QUEUE_SIZE = 10_000
# How long `Pipeline.stop` waits for the writer thread to write what is queued.
STOP_TIMEOUT_S = 5.0
# Requests Hypercorn's access log reports at DEBUG only: probes, scrapes, upgrades.
QUIET_PATHS = ("/health/", "/metrics")
# The shortest key `set_hash_key` takes (HASH_KEY's own minimum).
MIN_KEY_BYTES = 16
# Characters that end a line for some reader; JSON escapes those below 0x20.
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PLAIN = re.compile(r"[\w.:/@+\-\[\]]+")
_PORT = re.compile(r":\d+$")

_subject: ContextVar[LogSubject | None] = ContextVar("tandem_log_subject", default=None)


def bind(subject: LogSubject) -> Token[LogSubject | None]:
    """Add `conn` and `session` (read when a line is logged; the code hashed) to every line
    of this task and its children."""
    return _subject.set(subject)


def unbind(token: Token[LogSubject | None]) -> None:
    _subject.reset(token)


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


# The admin API's paths that name a session (its code), as the access log writes them.
_ADMIN_SESSION_PATH = re.compile(r"^(/api/debug/sessions/)[^/]+")


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
            "path": _ADMIN_SESSION_PATH.sub(r"\1{code}", path),  # a code in a path is not logged
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
        # HASH_KEY, else a random key: hashes then match within this process only
        # (until `set_hash_key` installs a key shared by every instance).
        key = config.hash_key.encode() if config.hash_key else secrets.token_bytes(32)
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

    def set_hash_key(self, key: bytes) -> None:
        """Hash addresses and codes with `key` from the next line on."""
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a hash key needs at least {MIN_KEY_BYTES} bytes")
        self.redactor.key = key

    def stop(self) -> None:
        self.listener.stop()
        for output in self.outputs:
            output.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_installed: Pipeline | None = None  # the pipeline `setup` routed every logger through


def setup(config: Config, stream: TextIO | None = None) -> Pipeline:
    """Route every logger through one pipeline; call `stop()` on the result before exit."""
    global _installed
    pipeline = _installed = Pipeline(config, stream or sys.stdout).start()
    root = logging.getLogger()
    root.handlers[:] = [pipeline.handler]
    root.setLevel(config.log_level)
    access = logging.getLogger("hypercorn.access")
    access.filters[:] = [_AccessLog()]
    access.propagate = True
    logging.getLogger("hypercorn.error").filters[:] = [_HypercornStartup()]
    return pipeline


def code_pseudonym(code: str) -> str:
    """A session code as every log line shows it (`code-` and 16 hex digits of its keyed hash), for
    other outputs that must not show codes either (traces). Without a pipeline (tests), a process key."""
    return (_installed.redactor if _installed is not None else _unpiped).code(code)


_unpiped = Redactor("hash", secrets.token_bytes(32))  # code_pseudonym's hashes before `setup`


def set_hash_key(key: bytes) -> None:
    """Key the hashes of the pipeline `setup` installed with `key` (e.g. one shared by
    every instance through Redis, when HASH_KEY is unset); lines already written keep theirs.
    Without an installed pipeline there is nothing to key; a key under 16 bytes: ValueError."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a hash key needs at least {MIN_KEY_BYTES} bytes")
    if _installed is not None:
        _installed.set_hash_key(key)


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


class Outage:
    """A dependency's outage, logged once when it begins and once when it ends.

    Callers report every failure and every success; only the changes are
    logged (`down_event` at WARNING with the first error, `up_event` at INFO
    with how long it lasted and how many failures it saw).
    """

    def __init__(
        self, logger: logging.Logger, down_event: str, up_event: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.down_event = down_event
        self.up_event = up_event
        self.clock = clock
        self.since: float | None = None  # when the current outage began
        self.error: str | None = None  # its first error
        self.failures = 0  # failures seen in the current outage

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, error: str, **fields: object) -> None:
        self.failures += 1
        if self.since is None:
            self.since, self.error = self.clock(), error
            self.logger.warning(self.down_event, extra={"fields": {"error": error, **fields}})

    def recovered(self, **fields: object) -> None:
        if self.since is None:
            return
        lasted = round(self.clock() - self.since, 3)
        self.logger.info(self.up_event, extra={"fields": {"after_s": lasted, "failures": self.failures, **fields}})
        self.since, self.error, self.failures = None, None, 0
