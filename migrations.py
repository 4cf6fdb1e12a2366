"""The migrator: applies sql/NNN_name.sql in version order and records each in schema_migrations.

One migrator at a time (a polled advisory lock). Each file runs in a transaction unless its first
line is `-- tandem: no-transaction` (then: one statement; a CREATE INDEX CONCURRENTLY is checked with
pg_index.indisvalid, an invalid index rebuilt once). `python server.py migrate` runs `migrate_command`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.errors
from psycopg import sql

from pg import Canceller, connect_kwargs, describe

if TYPE_CHECKING:
    from config import Config

log = logging.getLogger("tandem.database")  # the archive logs here too: one logger for PostgreSQL

SQL_DIR = Path(__file__).resolve().parent / "sql"
NO_TRANSACTION_MARK = "-- tandem: no-transaction"
# pg_try_advisory_lock key of the migrator ("tandem" in ASCII); advisory locks are per database.
MIGRATION_LOCK_KEY = 0x74616E64656D
MIGRATION_STATEMENT_TIMEOUT_MS = 60 * 60 * 1000  # an index build on a big table takes a while
MIGRATION_LOCK_TIMEOUT_MS = 30_000  # never queue behind the relay's traffic for longer


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
            with work, cancel.using(work) if cancel is not None else nullcontext(work):
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


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The newest applied migration; 0 when none (or no schema_migrations table)."""
    try:
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


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
