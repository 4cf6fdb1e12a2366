"""PostgreSQL: the migrator for sql/NNN_name.sql and the archive of sessions, messages and events.

`migrate` applies the files in order under a polled advisory lock, each in a transaction unless
marked non-transactional, and rebuilds or refuses invalid indexes. `Archive` takes rows from the
relay without blocking (a bounded queue; overflow is dropped and counted) and a writer task stores
them in batches from a worker thread (psycopg 3 sync + psycopg_pool), retrying with backoff.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import psycopg
import psycopg.conninfo
import psycopg.errors
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import sql
from psycopg_pool import ConnectionPool

if TYPE_CHECKING:
    from config import Config

T = TypeVar("T")
log = logging.getLogger("tandem.database")

SQL_DIR = Path(__file__).resolve().parent / "sql"
NO_TRANSACTION_MARK = "-- tandem: no-transaction"
# pg_try_advisory_lock key of the migrator ("tandem" in ASCII); advisory locks are per database.
MIGRATION_LOCK_KEY = 0x74616E64656D

CONNECT_TIMEOUT_S = 5  # libpq connect_timeout
TCP_USER_TIMEOUT_MS = 15_000  # a silent server is given up after this long (Linux)
MIGRATION_STATEMENT_TIMEOUT_MS = 60 * 60 * 1000  # an index build on a big table takes a while
MIGRATION_LOCK_TIMEOUT_MS = 30_000  # never queue behind the relay's traffic for longer
ARCHIVE_STATEMENT_TIMEOUT_MS = 10_000
POOL_WAIT_S = 2.0  # how long a write waits for a pooled connection (then: retry with backoff)
POOL_RECONNECT_S = 10.0  # a reconnect chain gives up after this; the next request starts a fresh one
WRITE_TIMEOUT_S = 30.0  # one batch, at the call site
CHECK_TIMEOUT_S = 1.0  # readiness (READY_TIMEOUT defaults to 1 s too)
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
MAX_QUEUE_BYTES = 64 * 2**20  # the archive queue's bytes, besides its rows
ROW_OVERHEAD_BYTES = 200


def describe(url: str) -> str:
    """host:port/dbname of a URL, never its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable DATABASE_URL)"
    return f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def connect_kwargs(application: str, statement_timeout_ms: int, lock_timeout_ms: int = 5_000) -> dict[str, Any]:
    """Timeouts on every connection: connect, socket (keepalives, TCP_USER_TIMEOUT), statement, lock."""
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": application,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        "options": (
            f"-c statement_timeout={statement_timeout_ms} -c lock_timeout={lock_timeout_ms}"
            " -c idle_in_transaction_session_timeout=60000"
        ),
    }


# --- running blocking psycopg calls from Trio -----------------------------------


class Canceller:
    """Lets Trio stop the query of a worker thread it abandoned (conn.cancel_safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self.abandoned = False

    @contextmanager
    def using(self, conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
        """In the worker thread: `conn` runs this call's queries until the block ends."""
        with self._lock:
            if self.abandoned:
                raise psycopg.errors.QueryCanceled("abandoned before it started")
            self._conn = conn
        try:
            yield conn
        finally:
            with self._lock:  # waits for a cancel in progress: the next user is never hit
                self._conn = None

    def cancel(self) -> None:
        with self._lock:
            self.abandoned = True
            if self._conn is not None:
                with suppress(psycopg.Error):
                    self._conn.cancel_safe(timeout=2.0)


async def in_thread(fn: Callable[[Canceller], T]) -> T:
    """Run `fn` in a worker thread; if this task is cancelled, abandon it and cancel its query."""
    token = Canceller()
    try:
        return await trio.to_thread.run_sync(fn, token, abandon_on_cancel=True)
    except trio.Cancelled:
        trio.lowlevel.start_thread_soon(token.cancel, lambda _outcome: None)
        raise


# --- migrations ---------------------------------------------------------------------


class MigrationError(RuntimeError):
    """The migrator stopped; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    path: Path
    text: str
    checksum: str
    transactional: bool
    index: str | None  # the index a non-transactional CREATE INDEX CONCURRENTLY builds

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(slots=True)
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    waited_s: float = 0.0  # for the advisory lock
    rebuilt: list[str] = field(default_factory=list)  # invalid indexes dropped and built again
    seconds: dict[str, float] = field(default_factory=dict)  # per applied file


_FILE_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_CONCURRENTLY = re.compile(r"\bCONCURRENTLY\b", re.IGNORECASE)
_CREATE_INDEX_CONCURRENTLY = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE
)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def _statements(text: str) -> list[str]:
    """The statements of a migration file (comments dropped; files keep ';' out of literals)."""
    no_comments = re.sub(r"--[^\n]*", "", text)
    return [part.strip() for part in no_comments.split(";") if part.strip()]


def discover(directory: Path = SQL_DIR) -> list[Migration]:
    """The migration files in version order, checked for the rules of the format."""
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql (lower case)")
        version = int(match.group(1))
        if version in migrations:
            raise MigrationError(f"{path.name}: version {version:03d} is also {migrations[version].name}")
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        transactional = text.splitlines()[0].strip() != NO_TRANSACTION_MARK if text else True
        statements = _statements(text)
        index = None
        if transactional:
            if _CONCURRENTLY.search("\n".join(statements)):
                raise MigrationError(
                    f"{path.name}: CONCURRENTLY cannot run in a transaction; put it alone in a file"
                    f" whose first line is '{NO_TRANSACTION_MARK}'"
                )
        else:
            if len(statements) != 1:
                raise MigrationError(f"{path.name}: a non-transactional file holds exactly one statement")
            cic = _CREATE_INDEX_CONCURRENTLY.match(statements[0])
            if cic is not None:
                if cic.group(1) is None:
                    raise MigrationError(
                        f"{path.name}: write CREATE INDEX CONCURRENTLY IF NOT EXISTS, so that a run"
                        " interrupted after the build can be repeated"
                    )
                index = cic.group(2)
        checksum = hashlib.sha256(raw).hexdigest()
        migrations[version] = Migration(version, path, text, checksum, transactional, index)
    return [migrations[v] for v in sorted(migrations)]


def latest_version(directory: Path = SQL_DIR) -> int:
    migrations = discover(directory)
    return migrations[-1].version if migrations else 0


def _acquire_lock(lock: psycopg.Connection[Any], wait_s: float, cancel: Canceller | None) -> float:
    """Poll pg_try_advisory_lock with backoff; return the seconds waited.

    Never pg_advisory_lock: a session blocked in it keeps a snapshot open, and the holder's
    CREATE INDEX CONCURRENTLY waits for that snapshot to go: a deadlock.
    """
    started = time.monotonic()
    delay = 0.05
    while True:
        row = lock.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()
        if row is not None and row[0]:
            return time.monotonic() - started
        waited = time.monotonic() - started
        if delay == 0.05:
            log.info("migrate.waiting", extra={"fields": {"reason": "another migrator holds the lock"}})
        if waited + delay > wait_s:
            raise MigrationError(f"another migrator held the migration lock for over {wait_s:g}s; try again later")
        if cancel is not None and cancel.abandoned:
            raise MigrationError("migration cancelled while waiting for the lock")
        time.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 1.6, 1.0)


def _index_valid(conn: psycopg.Connection[Any], name: str) -> bool | None:
    """pg_index.indisvalid of index `name` in the current schema; None if there is none."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
        (name,),
    ).fetchone()
    return None if row is None else bool(row[0])


def _drop_index(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))


def _apply(work: psycopg.Connection[Any], m: Migration, report: MigrationReport) -> None:
    record = "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"
    if m.transactional:
        with work.transaction():
            work.execute(m.text.encode())
            work.execute(record, (m.version, m.name, m.checksum))
        return
    # Non-transactional: one statement in autocommit. A CREATE INDEX CONCURRENTLY that fails (or
    # an earlier run that was killed) leaves an INVALID index, which IF NOT EXISTS would keep: drop
    # it and build again, once; still invalid is an error.
    index = m.index
    for attempt in (1, 2):
        if index is not None and _index_valid(work, index) is False:
            log.warning("migrate.invalid_index", extra={"fields": {"file": m.name, "index": index}})
            _drop_index(work, index)
            report.rebuilt.append(index)
        error: psycopg.Error | None = None
        try:
            work.execute(m.text.encode())
        except psycopg.Error as exc:
            error = exc
        valid = None if index is None else _index_valid(work, index)
        if valid is None and error is not None:  # no index was left behind: just an error
            raise MigrationError(f"{m.name} failed: {error}") from error
        if index is None or valid:
            break
        if valid is None:
            raise MigrationError(f"{m.name} ran, but index {index} is not in the current schema")
        if attempt == 2:
            _drop_index(work, index)
            raise MigrationError(
                f"{m.name}: index {index} is invalid (pg_index.indisvalid = false) after a rebuild"
                f"{f': {error}' if error else ''}; dropped it, fix the cause and run the migration again"
            ) from error
    work.execute(record, (m.version, m.name, m.checksum))


def migrate(
    url: str,
    *,
    directory: Path = SQL_DIR,
    target: int | None = None,
    lock_wait_s: float = 600.0,
    cancel: Canceller | None = None,
) -> MigrationReport:
    """Apply the pending migrations (up to `target`), one migrator at a time. Blocking."""
    migrations = [m for m in discover(directory) if target is None or m.version <= target]
    report = MigrationReport()
    where = describe(url)
    try:
        lock = psycopg.connect(url, autocommit=True, **connect_kwargs("tandem-migrate-lock", 10_000))
    except psycopg.Error as exc:
        raise MigrationError(f"cannot connect to PostgreSQL at {where}: {str(exc).strip()}") from exc
    with lock:
        report.waited_s = _acquire_lock(lock, lock_wait_s, cancel)
        try:
            work = psycopg.connect(
                url,
                autocommit=True,
                **connect_kwargs("tandem-migrate", MIGRATION_STATEMENT_TIMEOUT_MS, MIGRATION_LOCK_TIMEOUT_MS),
            )
            with work, cancel.using(work) if cancel is not None else _nothing(work):
                work.execute(MIGRATIONS_TABLE)
                applied = {
                    version: (name, checksum, applied_at)
                    for version, name, checksum, applied_at in work.execute(
                        "SELECT version, name, checksum, applied_at FROM schema_migrations"
                    ).fetchall()
                }
                known = {m.version: m for m in discover(directory)}
                for version, (name, checksum, applied_at) in sorted(applied.items()):
                    m = known.get(version)
                    if m is None:
                        raise MigrationError(
                            f"the database has migration {name}, which this Tandem does not have: it was"
                            " migrated by a newer version"
                        )
                    if m.checksum != checksum:
                        raise MigrationError(
                            f"{m.name} was changed after it was applied on {applied_at:%Y-%m-%d %H:%M}"
                            f" (checksum {checksum[:12]} then, {m.checksum[:12]} now): restore it and put"
                            " the change in a new file"
                        )
                for m in migrations:
                    if m.version in applied:
                        continue
                    started = time.monotonic()
                    _apply(work, m, report)
                    report.applied.append(m.name)
                    report.seconds[m.name] = time.monotonic() - started
                    log.info(
                        "migrate.applied",
                        extra={"fields": {"file": m.name, "duration_s": round(report.seconds[m.name], 3)}},
                    )
        except psycopg.Error as exc:
            raise MigrationError(f"migration failed at {where}: {str(exc).strip()}") from exc
        finally:
            with suppress(psycopg.Error):
                lock.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    log.info(
        "migrate.done",
        extra={
            "fields": {
                "database": where,
                "applied": report.applied,
                "waited_s": round(report.waited_s, 3),
                "rebuilt": report.rebuilt,
            }
        },
    )
    return report


@contextmanager
def _nothing(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    yield conn


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The newest applied migration; 0 when none (or no schema_migrations table)."""
    try:
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


# --- the queries Tandem and its admin paths run, each with the index that serves it -------


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    sql: str  # %(name)s parameters
    index: str  # the index its plan must use (tests/test_database.py, bench/pg_indexes.py)
    purpose: str


# Which session a row belongs to: the newest with that code created at or before the row. The
# archive writer embeds this as a correlated subquery, with `v` the batch's rows.
RESOLVE_SESSION = (
    "SELECT s.id FROM sessions s WHERE s.code = v.code AND s.created_at <= v.at ORDER BY s.created_at DESC LIMIT 1"
)
_SESSION_COLUMNS = "id, code, created_at, paired_at, ended_at, end_reason, message_count, last_message_at"

QUERIES: dict[str, Query] = {
    q.name: q
    for q in (
        Query(
            "archive.resolve_session",
            "SELECT s.id FROM (SELECT %(code)s::text AS code, %(at)s::timestamptz AS at) v,"
            f" LATERAL ({RESOLVE_SESSION}) s",
            "sessions_code_created_at",
            "the writer: the session a message, pairing, end or event belongs to",
        ),
        Query(
            "admin.session_by_code",
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE code = %(code)s ORDER BY created_at DESC LIMIT 20",
            "sessions_code_created_at",
            "look a session up by the code a user reports",
        ),
        Query(
            "admin.transcript",
            "SELECT seq, sender, body, created_at FROM messages"
            " WHERE session_id = %(session_id)s AND seq > %(after_seq)s ORDER BY seq LIMIT 100",
            "messages_pkey",
            "one session's messages in order, a page at a time",
        ),
        Query(
            "admin.session_events",
            "SELECT type, created_at, props FROM analytics_events"
            " WHERE session_id = %(session_id)s ORDER BY created_at LIMIT 200",
            "analytics_events_session_created_at",
            "one session's analytics events in order",
        ),
        Query(
            "admin.recent_sessions",
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE created_at >= %(since)s ORDER BY created_at DESC LIMIT 50",
            "sessions_created_at",
            "the newest sessions, a page",
        ),
        Query(
            "admin.open_sessions",
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE ended_at IS NULL ORDER BY created_at LIMIT 100",
            "sessions_open_created_at",
            "sessions still open, oldest first",
        ),
        Query(
            "admin.ended_sessions",
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE ended_at >= %(since)s AND ended_at < %(until)s"
            " ORDER BY ended_at DESC LIMIT 100",
            "sessions_ended_at",
            "sessions that ended in a window, newest first",
        ),
        Query(
            "admin.user_sessions",
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE created_by = %(user_id)s ORDER BY created_at DESC LIMIT 50",
            "sessions_created_by_created_at",
            "one user's sessions, newest first (and the FK's ON DELETE SET NULL)",
        ),
        Query(
            "admin.user_by_email",
            "SELECT id, email, created_at FROM users WHERE lower(email) = lower(%(email)s)",
            "users_email_lower",
            "find an account by address",
        ),
        Query(
            "analytics.event_counts",
            "SELECT date_trunc('hour', created_at) AS hour, count(*) AS events FROM analytics_events"
            " WHERE type = %(type)s AND created_at >= %(since)s AND created_at < %(until)s GROUP BY 1 ORDER BY 1",
            "analytics_events_type_created_at",
            "one event type per hour over a window",
        ),
        Query(
            "analytics.events_window",
            "SELECT type, count(*) AS events FROM analytics_events"
            " WHERE created_at >= %(since)s AND created_at < %(until)s GROUP BY type",
            "analytics_events_created_at_brin",
            "every event type's count in a window",
        ),
        Query(
            "analytics.message_volume",
            "SELECT date_trunc('minute', created_at) AS minute, count(*) AS messages, sum(size_bytes) AS bytes"
            " FROM messages WHERE created_at >= %(since)s AND created_at < %(until)s GROUP BY 1 ORDER BY 1",
            "messages_created_at_brin",
            "messages and bytes per minute in a window",
        ),
    )
}


# --- the archive -------------------------------------------------------------------------

# Row kinds, written in this order within a batch.
CREATED, PAIRED, MESSAGE, EVENT, ENDED = range(5)

_AT = "timestamptz 'epoch' + v.ms * interval '1 millisecond'"

INSERT_SESSIONS = f"""
INSERT INTO sessions (code, created_at)
SELECT v.code, {_AT} FROM unnest(%(code)s::text[], %(ms)s::bigint[]) AS v(code, ms)
ON CONFLICT (code, created_at) DO NOTHING
"""

# A row whose session has no row (created before the archive was configured, or its row was
# dropped on overflow) gets one, dated by its earliest row, so that nothing is lost.
ENSURE_SESSIONS = f"""
INSERT INTO sessions (code, created_at)
SELECT v.code, min({_AT}) FROM unnest(%(code)s::text[], %(ms)s::bigint[]) AS v(code, ms)
GROUP BY v.code
HAVING NOT EXISTS (SELECT 1 FROM sessions s WHERE s.code = v.code AND s.created_at <= min({_AT}))
ON CONFLICT (code, created_at) DO NOTHING
"""

UPDATE_PAIRED = f"""
WITH v AS (SELECT code, {_AT} AS at FROM unnest(%(code)s::text[], %(ms)s::bigint[]) AS v(code, ms)),
r AS (SELECT ({RESOLVE_SESSION}) AS id, min(v.at) AS at FROM v GROUP BY 1)
UPDATE sessions SET paired_at = r.at FROM r WHERE sessions.id = r.id AND sessions.paired_at IS NULL
"""

# ON CONFLICT: a batch retried after a commit whose answer was lost adds nothing twice; the
# counts come from the rows actually inserted.
INSERT_MESSAGES = f"""
WITH v AS (
    SELECT code, seq, sender, body, size, {_AT} AS at
    FROM unnest(%(code)s::text[], %(seq)s::bigint[], %(sender)s::text[], %(body)s::text[], %(size)s::int[],
                %(ms)s::bigint[]) AS v(code, seq, sender, body, size, ms)
), ins AS (
    INSERT INTO messages (session_id, seq, sender, body, size_bytes, created_at)
    SELECT ({RESOLVE_SESSION}), v.seq, v.sender, v.body::jsonb, v.size, v.at FROM v
    ON CONFLICT (session_id, seq) DO NOTHING
    RETURNING session_id, created_at
)
UPDATE sessions SET message_count = sessions.message_count + n.count,
                    last_message_at = greatest(sessions.last_message_at, n.last)
FROM (SELECT session_id, count(*) AS count, max(created_at) AS last FROM ins GROUP BY session_id) n
WHERE sessions.id = n.session_id
"""

INSERT_EVENTS = f"""
WITH v AS (
    SELECT type, code, props, {_AT} AS at
    FROM unnest(%(type)s::text[], %(code)s::text[], %(props)s::text[], %(ms)s::bigint[]) AS v(type, code, props, ms)
)
INSERT INTO analytics_events (type, session_id, created_at, props)
SELECT v.type, ({RESOLVE_SESSION}), v.at, v.props::jsonb FROM v
"""

UPDATE_ENDED = f"""
WITH v AS (
    SELECT code, reason, {_AT} AS at FROM unnest(%(code)s::text[], %(reason)s::text[], %(ms)s::bigint[])
    AS v(code, reason, ms)
), r AS (SELECT ({RESOLVE_SESSION}) AS id, v.at, v.reason FROM v)
UPDATE sessions SET ended_at = r.at, end_reason = r.reason FROM r WHERE sessions.id = r.id AND sessions.ended_at IS NULL
"""


@dataclass(slots=True)
class _Row:
    kind: int
    code: str | None
    ms: int
    seq: int = 0
    text: str = ""  # sender, end reason or event type
    payload: bytes | None = None  # message data (None: metadata only) or event props, JSON
    size: int = 0  # of the message data

    @property
    def cost(self) -> int:
        return ROW_OVERHEAD_BYTES + (len(self.payload) if self.payload else 0)


class ArchiveUnavailable(RuntimeError):
    """The database the archive writes to does not answer, or is not migrated."""


class Recorder:
    """What the relay reports; this base records nothing (no DATABASE_URL). Never blocks."""

    def session_created(self, code: str, ms: int) -> None:
        pass

    def session_paired(self, code: str, ms: int) -> None:
        pass

    def message(self, code: str, seq: int, sender: str, data: bytes, ms: int) -> None:
        pass

    def session_ended(self, code: str, reason: str, ms: int) -> None:
        pass

    def event(self, type: str, code: str | None, ms: int, props: Mapping[str, object] | None = None) -> None:
        pass

    async def check(self) -> None:
        """Raise ArchiveUnavailable unless the database answers (bounded by a timeout)."""

    def stats(self) -> dict[str, int]:
        """Counters for metrics; empty without an archive."""
        return {}

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Expose the counters in `registry` (/metrics); nothing without an archive."""


NO_ARCHIVE = Recorder()


def _refused(exc: BaseException) -> bool:
    """The database refused the rows themselves (bad data): retrying them as they are cannot help.

    Anything else (the server away, slow, read-only, not migrated, a bug) is retried with backoff
    while the bounded queue holds the rows.
    """
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError)


class Archive(Recorder):
    """The PostgreSQL archive: a bounded queue in front of one writer task."""

    def __init__(
        self,
        pool: ConnectionPool[psycopg.Connection[Any]],
        *,
        flush_s: float,
        batch_rows: int,
        queue_rows: int,
        store_bodies: bool,
        expected_version: int,
    ) -> None:
        self._pool = pool
        self._flush_s = flush_s
        self._batch_rows = batch_rows
        self._queue_rows = queue_rows
        self._store_bodies = store_bodies
        self._expected_version = expected_version
        self._rows: deque[_Row] = deque()
        self._bytes = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._closing = False
        self._overflowing = False
        self._failing: str | None = None  # the error of the outage in progress
        # metrics (counters since start)
        self.queued = 0
        self.written = 0
        self.dropped = 0  # the queue was full: never stored
        self.refused = 0  # the database refused the row (bad data): never stored
        self.batches = 0
        self.retries = 0

    @property
    def pending(self) -> int:
        return len(self._rows)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_ArchiveCollector(self))

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "written": self.written,
            "dropped": self.dropped,
            "refused": self.refused,
            "pending": len(self._rows),
            "batches": self.batches,
            "retries": self.retries,
        }

    # -- the relay's side: synchronous, never blocks --

    def _put(self, row: _Row) -> None:
        cost = row.cost
        if len(self._rows) >= self._queue_rows or self._bytes + cost > MAX_QUEUE_BYTES:
            self.dropped += 1
            if not self._overflowing:  # one line per overflow; `dropped` counts every row
                self._overflowing = True
                log.warning(
                    "archive.overflow",
                    extra={"fields": {"queue_rows": len(self._rows), "dropped_total": self.dropped}},
                )
            return
        self._rows.append(row)
        self._bytes += cost
        self.queued += 1
        if len(self._rows) == 1 or len(self._rows) >= self._batch_rows:
            self._wake.set()

    def session_created(self, code: str, ms: int) -> None:
        self._put(_Row(CREATED, code, ms))

    def session_paired(self, code: str, ms: int) -> None:
        self._put(_Row(PAIRED, code, ms))

    def message(self, code: str, seq: int, sender: str, data: bytes, ms: int) -> None:
        self._put(_Row(MESSAGE, code, ms, seq, sender, data if self._store_bodies else None, len(data)))

    def session_ended(self, code: str, reason: str, ms: int) -> None:
        self._put(_Row(ENDED, code, ms, text=reason))

    def event(self, type: str, code: str | None, ms: int, props: Mapping[str, object] | None = None) -> None:
        self._put(_Row(EVENT, code, ms, text=type, payload=orjson.dumps(props or {})))

    # -- readiness --

    async def check(self) -> None:
        def run(token: Canceller) -> int:
            with self._pool.connection(timeout=CHECK_TIMEOUT_S / 2) as conn, token.using(conn):
                return schema_version(conn)

        try:
            with trio.fail_after(CHECK_TIMEOUT_S):
                version = await in_thread(run)
        except trio.TooSlowError:
            raise ArchiveUnavailable(f"database: no answer within {CHECK_TIMEOUT_S:g}s") from None
        except psycopg.Error as exc:
            raise ArchiveUnavailable(f"database: {str(exc).strip()}") from None
        if version < self._expected_version:
            raise ArchiveUnavailable(
                f"database schema is at version {version}, expected {self._expected_version}:"
                " run `python server.py migrate`"
            )

    # -- the writer --

    async def run(self) -> None:
        """The writer task: a batch when ARCHIVE_BATCH_ROWS are queued or ARCHIVE_FLUSH_MS passed."""
        backoff = RETRY_MIN_S
        while True:
            if not self._rows:
                if self._closing:
                    self._drained.set()
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            if len(self._rows) < self._batch_rows and not self._closing:
                self._wake = trio.Event()
                with trio.move_on_after(self._flush_s):
                    await self._wake.wait()
            batch = list(itertools.islice(self._rows, self._batch_rows))
            try:
                await self._write(batch)
                self.written += len(batch)
                self._done(len(batch))
            except (psycopg.Error, trio.TooSlowError) as exc:
                if _refused(exc):
                    handled = await self._isolate(batch)
                    self._done(handled)
                    if handled == len(batch):
                        continue  # else an outage began midway: _isolate noted it
                else:
                    self._outage(exc)
                self.retries += 1
                await trio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            backoff = RETRY_MIN_S
            if self._failing is not None:
                log.info("archive.recovered", extra={"fields": {"after": self._failing, "pending": len(self._rows)}})
                self._failing = None

    async def _write(self, rows: Sequence[_Row]) -> None:
        with trio.fail_after(WRITE_TIMEOUT_S):
            await in_thread(partial(self._write_in_thread, rows))

    def _write_in_thread(self, rows: Sequence[_Row], token: Canceller) -> None:
        with self._pool.connection(timeout=POOL_WAIT_S) as conn, token.using(conn), conn.transaction():
            write_rows(conn, rows)

    def _outage(self, exc: BaseException) -> None:
        if self._failing is None:  # one line per outage
            self._failing = str(exc).strip() or type(exc).__name__
            log.warning("archive.unavailable", extra={"fields": {"error": self._failing, "pending": len(self._rows)}})

    def _done(self, count: int) -> None:
        self.batches += 1
        for _ in range(count):
            self._bytes -= self._rows.popleft().cost
        if self._overflowing and len(self._rows) < self._queue_rows // 2:
            self._overflowing = False  # the next overflow logs again

    async def _isolate(self, batch: list[_Row]) -> int:
        """The database refused a batch: write its rows one by one and drop only the bad ones.

        A message whose body is refused is archived without it. Returns how many rows of the
        batch are done with (stored or dropped); an outage midway stops early.
        """
        refused = 0
        handled = 0
        for row in batch:
            attempts = [row]
            if row.kind == MESSAGE and row.payload is not None:
                attempts.append(_Row(MESSAGE, row.code, row.ms, row.seq, row.text, None, row.size))
            for attempt in attempts:
                try:
                    await self._write([attempt])
                except (psycopg.Error, trio.TooSlowError) as exc:
                    if not _refused(exc):
                        self._outage(exc)
                        self._note_refused(refused)
                        return handled
                    continue
                self.written += 1
                break
            else:
                refused += 1
            handled += 1
        self._note_refused(refused)
        return handled

    def _note_refused(self, rows: int) -> None:
        if rows:
            self.refused += rows
            log.warning("archive.rows_refused", extra={"fields": {"rows": rows, "refused_total": self.refused}})

    async def close(self, within_s: float) -> None:
        """Flush what is queued, for at most `within_s` seconds (retrying if the database is away)."""
        self._closing = True
        self._wake.set()
        with trio.move_on_after(within_s):
            await self._drained.wait()
        if self._rows:
            log.warning(
                "archive.lost",
                extra={"fields": {"rows": len(self._rows), "error": self._failing, "within_s": within_s}},
            )


class _ArchiveCollector(Collector):
    """The archive's counters, read at scrape time (the relay's path only bumps integers)."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive

    def collect(self) -> Iterator[Metric]:
        stats = self._archive.stats()
        rows = CounterMetricFamily(
            "tandem_archive_rows",
            "Archive rows by outcome: written; dropped (queue full); refused (bad data)",
            labels=["outcome"],
        )
        for outcome in ("written", "dropped", "refused"):
            rows.add_metric([outcome], stats[outcome])
        yield rows
        yield GaugeMetricFamily("tandem_archive_pending_rows", "Rows waiting for PostgreSQL", value=stats["pending"])
        yield CounterMetricFamily(
            "tandem_archive_retries", "Batches retried after PostgreSQL failed", value=stats["retries"]
        )


def _json_body(data: bytes) -> str | None:
    # jsonb refuses \u0000 in strings: such a body is archived as NULL rather than failing the batch.
    return None if b"\\u0000" in data else data.decode()


def write_rows(conn: psycopg.Connection[Any], rows: Sequence[_Row]) -> None:
    """The statements of one batch, in an order that lets every row find its session."""
    created = [r for r in rows if r.kind == CREATED]
    if created:
        conn.execute(INSERT_SESSIONS, {"code": [r.code for r in created], "ms": [r.ms for r in created]})
    refs = [r for r in rows if r.kind in (PAIRED, MESSAGE, ENDED)]
    if refs:
        conn.execute(ENSURE_SESSIONS, {"code": [r.code for r in refs], "ms": [r.ms for r in refs]})
    paired = [r for r in rows if r.kind == PAIRED]
    if paired:
        conn.execute(UPDATE_PAIRED, {"code": [r.code for r in paired], "ms": [r.ms for r in paired]})
    messages = [r for r in rows if r.kind == MESSAGE]
    if messages:
        conn.execute(
            INSERT_MESSAGES,
            {
                "code": [r.code for r in messages],
                "seq": [r.seq for r in messages],
                "sender": [r.text for r in messages],
                "body": [None if r.payload is None else _json_body(r.payload) for r in messages],
                "size": [r.size for r in messages],
                "ms": [r.ms for r in messages],
            },
        )
    events = [r for r in rows if r.kind == EVENT]
    if events:
        conn.execute(
            INSERT_EVENTS,
            {
                "type": [r.text for r in events],
                "code": [r.code for r in events],
                "props": [(r.payload or b"{}").decode() for r in events],
                "ms": [r.ms for r in events],
            },
        )
    ended = [r for r in rows if r.kind == ENDED]
    if ended:
        conn.execute(
            UPDATE_ENDED,
            {"code": [r.code for r in ended], "reason": [r.text for r in ended], "ms": [r.ms for r in ended]},
        )


def _quiet_pool_logs() -> None:
    # psycopg_pool logs every checkout at INFO and every failed reconnect at WARNING; the archive
    # logs an outage once itself.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


@asynccontextmanager
async def open_archive(config: Config) -> AsyncIterator[Recorder]:
    """The archive for `config` (NO_ARCHIVE without DATABASE_URL), migrating first if asked.

    The writer runs until the block ends; then the queue is flushed for up to a tenth of
    SHUTDOWN_GRACE (the drain has had the rest) and the pool is closed.
    """
    url = config.database_url
    if url is None:
        yield NO_ARCHIVE
        return
    if config.migrate_on_start:
        await in_thread(lambda token: migrate(url, cancel=token))
    _quiet_pool_logs()
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        url,
        min_size=1,
        max_size=3,  # the writer, a write abandoned on timeout that is still finishing, readiness
        open=False,
        kwargs={"autocommit": True, **connect_kwargs("tandem-archive", ARCHIVE_STATEMENT_TIMEOUT_MS)},
        check=ConnectionPool.check_connection,
        timeout=POOL_WAIT_S,
        reconnect_timeout=POOL_RECONNECT_S,
        name="tandem-archive",
        num_workers=2,
    )
    pool.open(wait=False)  # a database that is down does not stop the relay
    archive = Archive(
        pool,
        flush_s=config.archive_flush_ms / 1000,
        batch_rows=config.archive_batch_rows,
        queue_rows=config.archive_queue_size,
        store_bodies=config.archive_messages,
        expected_version=latest_version(),
    )
    log.info(
        "archive.open",
        extra={"fields": {"database": describe(url), "messages": config.archive_messages}},
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(archive.run)
            try:
                yield archive
            finally:
                with trio.CancelScope(shield=True):
                    await archive.close(max(0.2, config.shutdown_grace * 0.1))
                nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(3.0, shield=True):
            await trio.to_thread.run_sync(lambda: pool.close(timeout=2.0), abandon_on_cancel=True)
        log.info(
            "archive.closed",
            extra={
                "fields": {
                    "written": archive.written,
                    "dropped": archive.dropped,
                    "refused": archive.refused,
                    "lost": archive.pending,
                }
            },
        )


def migrate_command(config: Config) -> int:
    """`python server.py migrate`: 0 when the schema is current, else one line on stderr."""
    if config.database_url is None:
        print("tandem: DATABASE_URL is not set: there is no database to migrate", file=sys.stderr)
        return 2
    try:
        report = migrate(config.database_url)
    except MigrationError as exc:
        print(f"tandem: migration failed: {exc}", file=sys.stderr)
        return 1
    done = f"applied {', '.join(report.applied)}" if report.applied else "nothing to apply"
    print(f"tandem: {describe(config.database_url)} is at version {latest_version()}: {done}", file=sys.stderr)
    return 0
