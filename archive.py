"""The archive of sessions, messages and events in PostgreSQL: its write side (archive_queries.py reads).

The relay reports through a `Recorder`, which never blocks: rows go into a bounded queue (overflow
is dropped and counted) and one writer task stores them in batches from a worker thread (psycopg 3
sync + psycopg_pool), retrying with backoff. Without DATABASE_URL the relay gets NO_ARCHIVE.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

from logging_setup import Outage
from migrations import latest_version, migrate, schema_version
from pg import Canceller, connect_kwargs, describe, in_thread

if TYPE_CHECKING:
    from config import Config

log = logging.getLogger("tandem.database")  # the migrator logs here too: one logger for PostgreSQL

ARCHIVE_STATEMENT_TIMEOUT_MS = 10_000
POOL_WAIT_S = 2.0  # how long a write waits for a pooled connection (then: retry with backoff)
POOL_RECONNECT_S = 10.0  # a reconnect chain gives up after this; the next request starts a fresh one
WRITE_TIMEOUT_S = 30.0  # one batch, at the call site
CHECK_TIMEOUT_S = 1.0  # readiness (READY_TIMEOUT defaults to 1 s too)
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0
MAX_QUEUE_BYTES = 64 * 2**20  # the archive queue's bytes, besides its rows
ROW_OVERHEAD_BYTES = 200


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


class ArchiveUnavailable(RuntimeError):
    """The database the archive writes to does not answer, or is not migrated."""


# Row kinds, written in this order within a batch.
CREATED, PAIRED, MESSAGE, EVENT, ENDED = range(5)


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
        self._outage = Outage(log, "archive.unavailable", "archive.recovered")
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
                    self._failed(exc)
                self.retries += 1
                await trio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            backoff = RETRY_MIN_S
            self._outage.recovered(pending=len(self._rows))

    async def _write(self, rows: Sequence[_Row]) -> None:
        with trio.fail_after(WRITE_TIMEOUT_S):
            await in_thread(partial(self._write_in_thread, rows))

    def _write_in_thread(self, rows: Sequence[_Row], token: Canceller) -> None:
        with self._pool.connection(timeout=POOL_WAIT_S) as conn, token.using(conn), conn.transaction():
            write_rows(conn, rows)

    def _failed(self, exc: BaseException) -> None:
        self._outage.failed(str(exc).strip() or type(exc).__name__, pending=len(self._rows))

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
                        self._failed(exc)
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
                extra={"fields": {"rows": len(self._rows), "error": self._outage.error, "within_s": within_s}},
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


# --- the writer's statements ----------------------------------------------------------------

# Which session a row belongs to: the newest with that code created at or before the row. The
# statements below embed it as a correlated subquery, with `v` the batch's rows;
# archive_queries.QUERIES["archive.resolve_session"] is the same lookup alone, for checking its plan.
RESOLVE_SESSION = (
    "SELECT s.id FROM sessions s WHERE s.code = v.code AND s.created_at <= v.at ORDER BY s.created_at DESC LIMIT 1"
)

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
