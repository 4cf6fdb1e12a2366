"""The migrator: applies sql/NNN_name.sql in version order; reverts them with sql/down/NNN_name.sql.

schema_migrations records each applied file. One migrator at a time (a polled advisory lock), up or
down. Each file runs in a transaction unless its first line is `-- tandem: no-transaction` (then:
one statement; a CREATE INDEX CONCURRENTLY is checked with pg_index.indisvalid, an invalid index
rebuilt once; a DROP INDEX CONCURRENTLY is checked gone). A plain DROP INDEX is refused: it locks
its table against writes. After a run that built indexes their tables are analyzed, so the planner
has fresh statistics (ANALYZE blocks no writes). `python server.py migrate [down [N] | status]`
runs `migrate_command`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import psycopg
import psycopg.errors
from psycopg import sql

from pg import Canceller, connect_kwargs, describe

if TYPE_CHECKING:
    from config import Config

log = logging.getLogger("tandem.database")  # the archive logs here too: one logger for PostgreSQL

SQL_DIR = Path(__file__).resolve().parent / "sql"
DOWN_DIR = "down"  # SQL_DIR/down/NNN_name.sql reverts SQL_DIR/NNN_name.sql
NO_TRANSACTION_MARK = "-- tandem: no-transaction"
# pg_try_advisory_lock key of the migrator ("tandem" in ASCII); advisory locks are per database.
MIGRATION_LOCK_KEY = 0x74616E64656D
MIGRATION_STATEMENT_TIMEOUT_MS = 60 * 60 * 1000  # an index build on a big table takes a while
MIGRATION_LOCK_TIMEOUT_MS = 30_000  # never queue behind the relay's traffic for longer
# A transactional file (an ALTER TABLE) that waits for its lock makes every write to that table
# queue behind it: it gives up after this long, and is tried again until the deadline.
STEP_LOCK_TIMEOUT_MS = 200
STEP_LOCK_DEADLINE_S = 120.0


class MigrationError(RuntimeError):
    """The migrator stopped; the message says why and what to do."""


class DownRefused(MigrationError):
    """A down the database cannot take (a step never applied, or one without a down file); nothing ran."""


@dataclass(frozen=True, slots=True)
class Step:
    """One SQL file, run as a unit: an up file or the down file that reverts it."""

    path: Path
    label: str  # how messages name it: "003_x.sql", "down/003_x.sql"
    text: str
    transactional: bool
    index: str | None  # the index a non-transactional CREATE INDEX CONCURRENTLY builds
    dropped: str | None  # the index a non-transactional DROP INDEX CONCURRENTLY drops


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    checksum: str  # SHA-256 of the up file, recorded in schema_migrations
    up: Step
    down: Step | None = None  # None: no down file, it cannot be reverted

    @property
    def name(self) -> str:
        return self.up.path.name

    @property
    def path(self) -> Path:
        return self.up.path

    @property
    def text(self) -> str:
        return self.up.text

    @property
    def transactional(self) -> bool:
        return self.up.transactional

    @property
    def index(self) -> str | None:
        return self.up.index


@dataclass(slots=True)
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)  # by `revert`, newest first
    waited_s: float = 0.0  # for the advisory lock
    rebuilt: list[str] = field(default_factory=list)  # invalid indexes dropped and built again
    analyzed: list[str] = field(default_factory=list)  # tables given fresh statistics after index builds
    seconds: dict[str, float] = field(default_factory=dict)  # per file run
    version: int = 0  # the newest applied migration when the run ended


_FILE_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_CONCURRENTLY = re.compile(r"\bCONCURRENTLY\b", re.IGNORECASE)
_CREATE_INDEX_CONCURRENTLY = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE
)
_DROP_INDEX = re.compile(r"\bDROP\s+INDEX\b(?!\s+CONCURRENTLY\b)", re.IGNORECASE)
_DROP_INDEX_CONCURRENTLY = re.compile(r"^\s*DROP\s+INDEX\s+CONCURRENTLY\b", re.IGNORECASE)
_DROP_ONE_INDEX_CONCURRENTLY = re.compile(
    r"^\s*DROP\s+INDEX\s+CONCURRENTLY\s+(IF\s+EXISTS\s+)?(\w+)\s*(?:RESTRICT\s*)?$", re.IGNORECASE
)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
RECORD_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"
RECORD_REVERTED = "DELETE FROM schema_migrations WHERE version = %s"


def _statements(text: str) -> list[str]:
    """The statements of a migration file (comments dropped; files keep ';' out of literals)."""
    no_comments = re.sub(r"--[^\n]*", "", text)
    return [part.strip() for part in no_comments.split(";") if part.strip()]


def _one_line(exc: BaseException) -> str:
    """An error's first line: PostgreSQL adds CONTEXT and HINT lines that the CLI's one line leaves out."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _step(path: Path, label: str, text: str) -> Step:
    """One file checked for the rules of the format (up and down files follow the same)."""
    transactional = text.splitlines()[0].strip() != NO_TRANSACTION_MARK if text else True
    statements = _statements(text)
    if _DROP_INDEX.search("\n".join(statements)):
        raise MigrationError(
            f"{label}: DROP INDEX without CONCURRENTLY locks its table against writes until it commits;"
            f" write DROP INDEX CONCURRENTLY IF EXISTS alone in a file whose first line is '{NO_TRANSACTION_MARK}'"
        )
    index = dropped = None
    if transactional:
        if _CONCURRENTLY.search("\n".join(statements)):
            raise MigrationError(
                f"{label}: CONCURRENTLY cannot run in a transaction; put it alone in a file"
                f" whose first line is '{NO_TRANSACTION_MARK}'"
            )
    else:
        if len(statements) != 1:
            raise MigrationError(f"{label}: a non-transactional file holds exactly one statement")
        cic = _CREATE_INDEX_CONCURRENTLY.match(statements[0])
        if cic is not None:
            if cic.group(1) is None:
                raise MigrationError(
                    f"{label}: write CREATE INDEX CONCURRENTLY IF NOT EXISTS, so that a run"
                    " interrupted after the build can be repeated"
                )
            index = cic.group(2)
        elif _DROP_INDEX_CONCURRENTLY.match(statements[0]):
            dic = _DROP_ONE_INDEX_CONCURRENTLY.match(statements[0])
            if dic is None or dic.group(1) is None:
                raise MigrationError(
                    f"{label}: write DROP INDEX CONCURRENTLY IF EXISTS name (one index, no schema), so that"
                    " a run interrupted midway, which leaves the index invalid, can be repeated"
                )
            dropped = dic.group(2)
    return Step(path, label, text, transactional, index, dropped)


def discover(directory: Path = SQL_DIR) -> list[Migration]:
    """The migration files in version order, each with its down file, checked for the rules of the format."""
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql (lower case)")
        version = int(match.group(1))
        if version in migrations:
            raise MigrationError(f"{path.name}: version {version:03d} is also {migrations[version].name}")
        raw = path.read_bytes()
        up = _step(path, path.name, raw.decode("utf-8"))
        migrations[version] = Migration(version, hashlib.sha256(raw).hexdigest(), up)
    for path in sorted((directory / DOWN_DIR).glob("*.sql")):
        label = f"{DOWN_DIR}/{path.name}"
        match = _FILE_NAME.match(path.name)
        m = migrations.get(int(match.group(1))) if match is not None else None
        if m is None or m.name != path.name:
            raise MigrationError(f"{label}: a down file has the name of the file it reverts; there is no {path.name}")
        down = _step(path, label, path.read_text(encoding="utf-8"))
        if m.index is not None and down.dropped != m.index:
            raise MigrationError(
                f"{label}: {m.name} builds index {m.index}, so its down file is"
                f" DROP INDEX CONCURRENTLY IF EXISTS {m.index}"
            )
        migrations[m.version] = dataclasses.replace(m, down=down)
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


@contextmanager
def _locked(
    url: str, lock_wait_s: float, cancel: Canceller | None, report: MigrationReport
) -> Iterator[psycopg.Connection[Any]]:
    """The migrator's connection (schema_migrations exists), while this process holds the migration lock."""
    where = describe(url)
    try:
        lock = psycopg.connect(url, autocommit=True, **connect_kwargs("tandem-migrate-lock", 10_000))
    except psycopg.Error as exc:
        raise MigrationError(f"cannot connect to PostgreSQL at {where}: {_one_line(exc)}") from exc
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
                yield work
                report.version = schema_version(work)
        except psycopg.Error as exc:
            raise MigrationError(f"migration failed at {where}: {str(exc).strip()}") from exc
        finally:
            with suppress(psycopg.Error):
                lock.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _applied(work: psycopg.Connection[Any], known: Sequence[Migration]) -> list[Migration]:
    """The applied migrations, the last applied first, each checked against its file (unchanged, present)."""
    files = {m.version: m for m in known}
    rows = work.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY applied_at DESC, version DESC"
    ).fetchall()
    for version, name, checksum, applied_at in sorted(rows):
        m = files.get(version)
        if m is None:
            raise MigrationError(
                f"the database has migration {name}, which this Tandem does not have: it was migrated by a"
                " newer version (whose `migrate down` can revert it)"
            )
        if m.checksum != checksum:
            raise MigrationError(
                f"{m.name} was changed after it was applied on {applied_at:%Y-%m-%d %H:%M}"
                f" (checksum {checksum[:12]} then, {m.checksum[:12]} now): restore it and put"
                " the change in a new file"
            )
    return [files[version] for version, _, _, _ in rows]


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


def _build_index(work: psycopg.Connection[Any], step: Step, index: str, report: MigrationReport) -> None:
    """Run a CREATE INDEX CONCURRENTLY file until its index is valid.

    A build that fails (or an earlier run that was killed) leaves an INVALID index, which IF NOT
    EXISTS would keep: drop it and build again, once; still invalid is an error.
    """
    for attempt in (1, 2):
        if _index_valid(work, index) is False:
            log.warning("migrate.invalid_index", extra={"fields": {"file": step.label, "index": index}})
            _drop_index(work, index)
            report.rebuilt.append(index)
        error: psycopg.Error | None = None
        try:
            work.execute(step.text.encode())
        except psycopg.Error as exc:
            error = exc
        valid = _index_valid(work, index)
        if valid is None and error is not None:  # no index was left behind: just an error
            raise MigrationError(f"{step.label} failed: {_one_line(error)}") from error
        if valid:
            return
        if valid is None:
            raise MigrationError(f"{step.label} ran, but index {index} is not in the current schema")
        if attempt == 2:
            _drop_index(work, index)
            raise MigrationError(
                f"{step.label}: index {index} is invalid (pg_index.indisvalid = false) after a rebuild"
                f"{f': {_one_line(error)}' if error else ''}; dropped it, fix the cause and run the migration again"
            ) from error


def _run(
    work: psycopg.Connection[Any], step: Step, record: tuple[str, tuple[object, ...]], report: MigrationReport
) -> None:
    """Run one file, then `record` it in schema_migrations (in the file's transaction, if it has one)."""
    if step.transactional:
        deadline = time.monotonic() + STEP_LOCK_DEADLINE_S
        for attempt in itertools.count():
            try:
                with work.transaction():
                    work.execute(f"SET LOCAL lock_timeout = {STEP_LOCK_TIMEOUT_MS}")
                    work.execute(step.text.encode())
                    work.execute(*record)
                return
            except psycopg.errors.LockNotAvailable as exc:
                if time.monotonic() > deadline:
                    raise MigrationError(
                        f"{step.label} failed (rolled back): its tables stayed locked by other transactions "
                        f"for {STEP_LOCK_DEADLINE_S:g} s ({_one_line(exc)}); run it again when they are done"
                    ) from exc
                time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0))  # others' writes go first
            except psycopg.Error as exc:
                if work.closed:
                    raise  # the connection, not the file: _locked says where
                raise MigrationError(f"{step.label} failed (rolled back): {_one_line(exc)}") from exc
    # Non-transactional: one statement in autocommit, recorded after it ran. A run stopped between
    # the two is repeated by the next (IF NOT EXISTS, IF EXISTS).
    if step.index is not None:
        _build_index(work, step, step.index, report)
    else:
        try:
            work.execute(step.text.encode())
        except psycopg.Error as exc:
            if work.closed:
                raise
            raise MigrationError(f"{step.label} failed: {_one_line(exc)}; run the migrator again to finish it") from exc
        if step.dropped is not None and _index_valid(work, step.dropped) is not None:
            raise MigrationError(f"{step.label} ran, but index {step.dropped} is still in the current schema")
    work.execute(*record)


def _index_ids(work: psycopg.Connection[Any]) -> list[int]:
    """The oids of the indexes in the current schema."""
    rows = work.execute(
        "SELECT c.oid::int8 FROM pg_class c WHERE c.relkind IN ('i', 'I')"
        " AND c.relnamespace = current_schema()::regnamespace"
    ).fetchall()
    return [int(oid) for (oid,) in rows]


def _analyze(work: psycopg.Connection[Any], indexes_before: list[int], report: MigrationReport) -> None:
    """ANALYZE each table that gained an index since `indexes_before`: fresh statistics for the planner.

    Column statistics may predate a bulk load, and an expression index has statistics of its own,
    gathered only by ANALYZE (autovacuum's comes when enough rows change, perhaps never). ANALYZE
    takes SHARE UPDATE EXCLUSIVE on its table, which blocks no read or write. A failure here
    leaves the schema right: logged, not raised.
    """
    try:
        tables = work.execute(
            "SELECT DISTINCT n.nspname, t.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace"
            " WHERE c.relnamespace = current_schema()::regnamespace AND NOT c.oid::int8 = ANY(%s::int8[])"
            " ORDER BY 2",
            (indexes_before,),
        ).fetchall()
        for schema, table in tables:
            started = time.monotonic()
            work.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, table)))
            report.analyzed.append(table)
            report.seconds[f"ANALYZE {table}"] = time.monotonic() - started
    except psycopg.Error as exc:
        log.warning(
            "migrate.analyze_failed",
            extra={"fields": {"analyzed": report.analyzed, "error": _one_line(exc)}},
        )


def migrate(
    url: str,
    *,
    directory: Path = SQL_DIR,
    target: int | None = None,
    lock_wait_s: float = 600.0,
    cancel: Canceller | None = None,
) -> MigrationReport:
    """Apply the pending migrations (up to `target`), one migrator at a time; ANALYZE after. Blocking."""
    known = discover(directory)
    report = MigrationReport()
    with _locked(url, lock_wait_s, cancel, report) as work:
        applied = {m.version for m in _applied(work, known)}
        pending = [m for m in known if m.version not in applied and (target is None or m.version <= target)]
        indexes_before = _index_ids(work) if pending else []
        try:
            for m in pending:
                started = time.monotonic()
                _run(work, m.up, (RECORD_APPLIED, (m.version, m.name, m.checksum)), report)
                report.applied.append(m.name)
                report.seconds[m.name] = time.monotonic() - started
                log.info(
                    "migrate.applied",
                    extra={"fields": {"file": m.name, "duration_s": round(report.seconds[m.name], 3)}},
                )
        finally:
            # Also after a file failed: the indexes built before it get their statistics.
            if pending and not work.closed and (cancel is None or not cancel.abandoned):
                _analyze(work, indexes_before, report)
    log.info(
        "migrate.done",
        extra={
            "fields": {
                "database": describe(url),
                "applied": report.applied,
                "waited_s": round(report.waited_s, 3),
                "rebuilt": report.rebuilt,
                "analyzed": report.analyzed,
            }
        },
    )
    return report


def revert(
    url: str,
    steps: int = 1,
    *,
    directory: Path = SQL_DIR,
    lock_wait_s: float = 600.0,
    cancel: Canceller | None = None,
) -> MigrationReport:
    """Revert the `steps` migrations applied last, newest first, each by its down file. Blocking.

    Refused (DownRefused, nothing run) when fewer than `steps` are applied or one of them has no
    down file. One migrator at a time, as for `migrate`.
    """
    if steps < 1:
        raise ValueError(f"steps must be 1 or more, not {steps}")
    known = discover(directory)
    report = MigrationReport()
    where = describe(url)
    with _locked(url, lock_wait_s, cancel, report) as work:
        applied = _applied(work, known)
        if not applied:
            raise DownRefused(f"no migration is applied to {where}, so there is nothing to revert")
        if steps > len(applied):
            count = f"only {len(applied)} is" if len(applied) == 1 else f"only {len(applied)} are"
            raise DownRefused(
                f"{count} applied to {where} (the newest: {applied[0].name}); a step that was never applied"
                " has nothing to revert, so nothing was reverted"
            )
        chosen = applied[:steps]
        for m in chosen:
            if m.down is None:
                raise DownRefused(
                    f"{m.name} has no down file ({DOWN_DIR}/{m.name}), so it cannot be reverted; nothing was reverted"
                )
        for m in chosen:
            assert m.down is not None  # checked above, before anything ran
            started = time.monotonic()
            try:
                _run(work, m.down, (RECORD_REVERTED, (m.version,)), report)
            except MigrationError as exc:
                if not report.reverted:
                    raise
                # Each step reverted stays reverted: say which, so that nobody counts N again from the top.
                raise MigrationError(f"{exc} (reverted before it: {', '.join(report.reverted)})") from exc
            report.reverted.append(m.name)
            report.seconds[m.down.label] = time.monotonic() - started
            log.info(
                "migrate.reverted",
                extra={"fields": {"file": m.down.label, "duration_s": round(report.seconds[m.down.label], 3)}},
            )
    log.info(
        "migrate.done",
        extra={
            "fields": {
                "database": where,
                "reverted": report.reverted,
                "waited_s": round(report.waited_s, 3),
                "version": report.version,
            }
        },
    )
    return report


def status(url: str, *, directory: Path = SQL_DIR) -> list[tuple[str, datetime | None]]:
    """Every migration file in version order with when it was applied (None: pending), then any row
    of schema_migrations that no file has (named `NAME (not in sql/)`). Reads only; takes no lock."""
    try:
        with psycopg.connect(url, autocommit=True, **connect_kwargs("tandem-migrate-status", 10_000)) as conn:
            try:
                rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
            except psycopg.errors.UndefinedTable:
                rows = []
    except psycopg.Error as exc:
        raise MigrationError(f"cannot read the schema of {describe(url)}: {str(exc).strip()}") from exc
    applied = {version: (name, at) for version, name, at in rows}
    known = discover(directory)
    listed: list[tuple[str, datetime | None]] = [(m.name, applied.get(m.version, (m.name, None))[1]) for m in known]
    files = {m.version for m in known}
    listed += [(f"{name} (not in sql/)", at) for version, (name, at) in sorted(applied.items()) if version not in files]
    return listed


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The newest applied migration; 0 when none (or no schema_migrations table)."""
    try:
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


# --- python server.py migrate [down [N] | status] -----------------------------------------------


class MigrateArgs(NamedTuple):
    command: Literal["up", "down", "status"]
    steps: int = 0  # for "down"


def parse_migrate_args(args: Sequence[str]) -> MigrateArgs | None:
    """The arguments after `migrate`: none (apply), `down [N]` (N from 1), `status`; None: not valid."""
    match list(args):
        case []:
            return MigrateArgs("up")
        case ["status"]:
            return MigrateArgs("status")
        case ["down"]:
            return MigrateArgs("down", 1)
        case ["down", count] if re.fullmatch(r"[1-9][0-9]{0,3}", count):
            return MigrateArgs("down", int(count))
    return None


APPLY = MigrateArgs("up")  # `migrate` alone


def migrate_command(config: Config, args: MigrateArgs = APPLY) -> int:
    """`python server.py migrate [down [N] | status]`: 0 when done, else one line on stderr.

    Exit 1: the migration failed; 2: refused before anything ran (no DATABASE_URL, a down for a
    step never applied or without a down file).
    """
    url = config.database_url
    if url is None:
        print("tandem: DATABASE_URL is not set: there is no database to migrate", file=sys.stderr)
        return 2
    where = describe(url)
    if args.command == "status":
        try:
            listed = status(url)
        except MigrationError as exc:
            print(f"tandem: migrate status failed: {exc}", file=sys.stderr)
            return 1
        count = sum(at is not None for _, at in listed)
        print(f"{where}: {count} of {len(listed)} migrations applied")
        for name, at in listed:
            print(f"  {name:<48} {f'applied {at:%Y-%m-%d %H:%M:%S %Z}' if at else 'pending'}")
        return 0
    if args.command == "down":
        try:
            report = revert(url, args.steps)
        except DownRefused as exc:
            print(f"tandem: migrate down {args.steps}: {exc}", file=sys.stderr)
            return 2
        except MigrationError as exc:
            print(f"tandem: migrate down failed: {exc}", file=sys.stderr)
            return 1
        print(f"tandem: {where} is at version {report.version}: reverted {', '.join(report.reverted)}", file=sys.stderr)
        return 0
    try:
        report = migrate(url)
    except MigrationError as exc:
        print(f"tandem: migration failed: {exc}", file=sys.stderr)
        return 1
    done = f"applied {', '.join(report.applied)}" if report.applied else "nothing to apply"
    if report.analyzed:
        done += f"; statistics refreshed: {', '.join(report.analyzed)}"
    print(f"tandem: {where} is at version {report.version}: {done}", file=sys.stderr)
    return 0
