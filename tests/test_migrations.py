"""Rolling the archive's schema back, and statistics after index builds, on a real PostgreSQL.

Each down file undoes its up file exactly (catalogs compared step by step); downs of steps never
applied are refused; index drops and builds never make the archive's writes wait on a lock, shown
with the archive's own write statements running throughout `migrate down` and `migrate`; a
migration that built indexes leaves the tables analyzed. Every test makes its own database
(tests/pg_servers.py) and drops it afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import psycopg.errors
import pytest
from helpers import ROOT, base_env
from pg_servers import scratch_database

import archive as archive_module
import migrations
import pg

ALL = migrations.discover()
WRITE_LOCK_BOUND_MS = 1_000  # the writer's lock_timeout: a write that waits longer on a lock fails
PHASE_WAIT_S = 30.0  # for the migrator to reach the wait the test arranges


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


def query(url: str, text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        cursor = conn.execute(text.encode(), params)
        return cursor.fetchall() if cursor.description else []


def migrate_cli(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python server.py migrate ARGS` against `url`."""
    env = base_env(DATABASE_URL=url, LOG_LEVEL="WARNING", LOG_FORMAT="json")
    command = [sys.executable, str(ROOT / "server.py"), "migrate", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# What a schema is made of, as text: relations, columns (type, NOT NULL, identity, default),
# constraints and indexes (definition, valid, ready). Two databases with the same rows here have
# the same archive schema.
CATALOG = """
SELECT 'relation', c.relname, c.relkind::text FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'column', c.relname || '.' || a.attname,
       concat_ws(' ', format_type(a.atttypid, a.atttypmod), CASE WHEN a.attnotnull THEN 'NOT NULL' END,
                 nullif(a.attidentity, ''), pg_get_expr(d.adbin, d.adrelid))
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', k.conrelid::regclass::text || '.' || k.conname, pg_get_constraintdef(k.oid)
  FROM pg_constraint k WHERE k.connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', c.relname, concat_ws(' ', pg_get_indexdef(i.indexrelid),
       CASE WHEN NOT i.indisvalid THEN 'INVALID' END, CASE WHEN NOT i.indisready THEN 'NOT READY' END)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
 WHERE c.relnamespace = 'public'::regnamespace
ORDER BY 1, 2
"""


def catalog(url: str) -> list[tuple[Any, ...]]:
    return query(url, CATALOG)


def versions(url: str) -> list[int]:
    return [v for (v,) in query(url, "SELECT version FROM schema_migrations ORDER BY version")]


def test_every_step_has_a_down_file_that_undoes_it_exactly(pg_url: str) -> None:
    assert [m.name for m in ALL if m.down is None] == []
    # The schema after each number of steps: 0 (schema_migrations alone) to all.
    after: list[list[tuple[Any, ...]]] = []
    for m in [None, *ALL]:
        migrations.migrate(pg_url, target=0 if m is None else m.version)
        after.append(catalog(pg_url))
    assert len({tuple(c) for c in after}) == len(ALL) + 1  # every step changed something

    # Down one step at a time: each leaves the schema the step before it had.
    for n in range(len(ALL), 0, -1):
        report = migrations.revert(pg_url)
        assert report.reverted == [ALL[n - 1].name] and report.version == n - 1
        assert catalog(pg_url) == after[n - 1], ALL[n - 1].name
        assert versions(pg_url) == [m.version for m in ALL[: n - 1]]

    # Up again, then all of it down in one run and up again: the same schema each time.
    assert migrations.migrate(pg_url).applied == [m.name for m in ALL]
    assert catalog(pg_url) == after[-1]
    assert migrations.revert(pg_url, len(ALL)).reverted == [m.name for m in reversed(ALL)]
    assert catalog(pg_url) == after[0] and versions(pg_url) == []
    migrations.migrate(pg_url)
    assert catalog(pg_url) == after[-1]


def test_a_down_for_a_step_never_applied_is_refused(pg_url: str, tmp_path: Path) -> None:
    # Nothing applied at all.
    result = migrate_cli(pg_url, "down", cwd=tmp_path)
    assert result.returncode == 2, result
    where = urlsplit(pg_url).netloc.rpartition("@")[2]  # host:port, as the migrator names its database
    assert result.stderr.startswith(f"tandem: migrate down 1: no migration is applied to {where}/"), result
    assert "nothing to revert" in result.stderr and len(result.stderr.splitlines()) == 1, result

    # Two applied, three asked for: refused before anything ran.
    migrations.migrate(pg_url, target=2)
    result = migrate_cli(pg_url, "down", "3", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "only 2 are applied" in result.stderr and "never applied" in result.stderr, result
    assert "nothing was reverted" in result.stderr and len(result.stderr.splitlines()) == 1, result
    assert versions(pg_url) == [1, 2]
    assert query(pg_url, "SELECT count(*) FROM pg_class WHERE relname = 'sessions_code_created_at'") == [(1,)]

    # A pending step is never reverted: `down` takes the newest applied one (002), not 010.
    result = migrate_cli(pg_url, "down", cwd=tmp_path)
    assert result.returncode == 0, result
    assert "is at version 1: reverted 002_sessions_code_created_at.sql" in result.stderr, result
    assert versions(pg_url) == [1]

    # Not a count: the usage, exit 2.
    for wrong in (["down", "0"], ["down", "x"], ["down", "1", "2"], ["sideways"]):
        result = migrate_cli(pg_url, *wrong, cwd=tmp_path)
        assert result.returncode == 2 and "usage: python server.py" in result.stderr, (wrong, result)
    assert versions(pg_url) == [1]

    # A step without a down file cannot be reverted: refused, nothing ran.
    sql_dir = tmp_path / "sql"
    shutil.copytree(migrations.SQL_DIR, sql_dir)
    (sql_dir / migrations.DOWN_DIR / "001_schema.sql").unlink()
    with pytest.raises(migrations.DownRefused, match=r"001_schema\.sql has no down file \(down/001_schema\.sql\)"):
        migrations.revert(pg_url, directory=sql_dir)
    assert versions(pg_url) == [1]


def test_down_reverts_the_step_applied_last(pg_url: str, tmp_path: Path) -> None:
    # 002 arrives after 003 was applied (a branch merged late): the migrator applies it then, and
    # `down` reverts it first, whatever its number.
    sql_dir = tmp_path / "sql"
    (sql_dir / migrations.DOWN_DIR).mkdir(parents=True)

    def add(name: str, table: str) -> None:
        (sql_dir / name).write_text(f"CREATE TABLE {table} (x int);\n")
        (sql_dir / migrations.DOWN_DIR / name).write_text(f"DROP TABLE {table};\n")

    add("001_a.sql", "a")
    add("003_c.sql", "c")
    assert migrations.migrate(pg_url, directory=sql_dir).applied == ["001_a.sql", "003_c.sql"]
    add("002_b.sql", "b")
    assert migrations.migrate(pg_url, directory=sql_dir).applied == ["002_b.sql"]
    report = migrations.revert(pg_url, directory=sql_dir)
    assert report.reverted == ["002_b.sql"] and report.version == 3
    assert migrations.revert(pg_url, 2, directory=sql_dir).reverted == ["003_c.sql", "001_a.sql"]


def test_migrate_status_lists_applied_and_pending_steps(pg_url: str, tmp_path: Path) -> None:
    migrations.migrate(pg_url, target=3)
    result = migrate_cli(pg_url, "status", cwd=tmp_path)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f": 3 of {len(ALL)} migrations applied"), lines
    assert [line.split()[0] for line in lines[1:]] == [m.name for m in ALL]
    assert [line.split()[1] for line in lines[1:]] == ["applied"] * 3 + ["pending"] * (len(ALL) - 3)
    # A row no file has (migrated by a newer release) is listed after the files.
    query(pg_url, "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, '999_later.sql', '')")
    result = migrate_cli(pg_url, "status", cwd=tmp_path)
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[-1].split()[:4] == ["999_later.sql", "(not", "in", "sql/)"], result


def test_the_first_step_down_keeps_an_archive_that_holds_rows(pg_url: str) -> None:
    migrations.migrate(pg_url)
    query(pg_url, "INSERT INTO users (email) VALUES ('someone@example.com')")
    with pytest.raises(migrations.MigrationError) as caught:
        migrations.revert(pg_url, len(ALL))
    message = str(caught.value)
    assert "down/001_schema.sql failed (rolled back): the archive's tables hold rows" in message, message
    assert f"(reverted before it: {', '.join(m.name for m in reversed(ALL[1:]))})" in message, message
    assert versions(pg_url) == [1] and query(pg_url, "SELECT count(*) FROM users") == [(1,)]
    query(pg_url, "TRUNCATE users, profiles, sessions, messages, analytics_events")
    assert migrations.revert(pg_url).reverted == ["001_schema.sql"]
    assert query(pg_url, "SELECT count(*) FROM pg_class WHERE relname = 'users'") == [(0,)]


def test_one_migrator_at_a_time_down_too(pg_url: str) -> None:
    migrations.migrate(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (migrations.MIGRATION_LOCK_KEY,))
        with pytest.raises(migrations.MigrationError, match="another migrator held the migration lock"):
            migrations.revert(pg_url, lock_wait_s=0.5)
        assert versions(pg_url) == [m.version for m in ALL]
        other.execute("SELECT pg_advisory_unlock(%s)", (migrations.MIGRATION_LOCK_KEY,))
        assert migrations.revert(pg_url, lock_wait_s=5).reverted == [ALL[-1].name]


def test_down_files_follow_the_rules(tmp_path: Path) -> None:
    mark = migrations.NO_TRANSACTION_MARK
    up = {
        "001_t.sql": "CREATE TABLE t (x int);\n",
        "002_t_x.sql": f"{mark}\nCREATE INDEX CONCURRENTLY IF NOT EXISTS t_x ON t (x);\n",
    }

    def refused(downs: dict[str, str], match: str) -> None:
        directory = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        (directory / migrations.DOWN_DIR).mkdir(parents=True)
        for name, text in up.items():
            (directory / name).write_text(text)
        for name, text in downs.items():
            (directory / migrations.DOWN_DIR / name).write_text(text)
        with pytest.raises(migrations.MigrationError, match=match):
            migrations.discover(directory)

    refused({"002_t_x.sql": "DROP INDEX IF EXISTS t_x;\n"}, r"down/002_t_x\.sql: DROP INDEX without CONCURRENTLY locks")
    refused({"001_t.sql": "DROP INDEX t_x;\nDROP TABLE t;\n"}, "DROP INDEX without CONCURRENTLY")
    refused({"002_t_x.sql": "DROP INDEX CONCURRENTLY IF EXISTS t_x;\n"}, "cannot run in a transaction")
    refused({"002_t_x.sql": f"{mark}\nDROP INDEX CONCURRENTLY t_x;\n"}, "IF EXISTS")
    refused({"002_t_x.sql": f"{mark}\nDROP INDEX CONCURRENTLY IF EXISTS t_y;\n"}, "builds index t_x, so its down")
    refused({"003_t_y.sql": "SELECT 1;\n"}, r"down/003_t_y\.sql: a down file has the name of the file it reverts")
    refused({"002_t_z.sql": "SELECT 1;\n"}, "there is no 002_t_z.sql")
    # Up files: a plain DROP INDEX is refused there too.
    up["003_t_x_again.sql"] = "DROP INDEX t_x;\n"
    refused({}, r"003_t_x_again\.sql: DROP INDEX without CONCURRENTLY")


def test_a_migration_that_builds_indexes_leaves_fresh_statistics(pg_url: str) -> None:
    migrations.migrate(pg_url, target=1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sessions (code, created_at) SELECT 'c' || n, now() - n * interval '1 s'"
            " FROM generate_series(1, 3000) n"
        )
        conn.execute(
            "INSERT INTO messages (session_id, seq, sender, size_bytes, created_at)"
            " SELECT id, 1, 'a', 2, created_at FROM sessions"
        )
        conn.execute("INSERT INTO analytics_events (type, session_id, created_at) SELECT 't', id, now() FROM sessions")
    before = dict(query(pg_url, "SELECT relname, last_analyze FROM pg_stat_user_tables"))
    report = migrations.migrate(pg_url)
    assert report.analyzed == ["analytics_events", "messages", "sessions"], report
    stats = {
        name: (last, tuples)
        for name, last, tuples in query(
            pg_url,
            "SELECT s.relname, s.last_analyze, c.reltuples"
            " FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid",
        )
    }
    for table in ("sessions", "messages", "analytics_events"):
        last, tuples = stats[table]
        # last_analyze: set by ANALYZE only, never by autovacuum (last_autoanalyze).
        assert last is not None and (before[table] is None or last > before[table]), (table, stats)
        assert tuples == 3000, (table, stats)
    # No new index on users: left alone.
    assert stats["users"][0] == before["users"]


# --- traffic on the archive while the schema goes down and up again -----------------------------


@dataclass
class ArchiveTraffic:
    """The archive's own batch writes (archive.write_rows in a transaction), in a loop in a thread.

    lock_timeout WRITE_LOCK_BOUND_MS: a write that waits on a lock longer than that fails, and is
    kept in `failures`. `commits` holds when each batch committed (time.monotonic()).
    """

    url: str
    commits: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    longest_s: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __enter__(self) -> ArchiveTraffic:
        self.thread = threading.Thread(target=self._run, name="archive-traffic", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(30)

    def commits_between(self, start: float, end: float) -> int:
        return sum(start <= at <= end for at in self.commits)

    def _run(self) -> None:
        settings = pg.connect_kwargs("tandem-archive", 30_000, WRITE_LOCK_BOUND_MS)
        deadline = time.monotonic() + 300  # bounded, whatever happens to the test
        with psycopg.connect(self.url, autocommit=True, **settings) as conn:
            n = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                n += 1
                ms, code = int(time.time() * 1000), f"traffic-{n}"
                R = archive_module._Row
                rows = [
                    R(archive_module.CREATED, code, ms),
                    R(archive_module.PAIRED, code, ms),
                    R(archive_module.MESSAGE, code, ms, 1, "a", b'{"n": 1}', 8),
                    R(archive_module.EVENT, code, ms, text="session.left", payload=b"{}"),
                    R(archive_module.ENDED, code, ms, text="left"),
                ]
                started = time.monotonic()
                try:
                    with conn.transaction():
                        archive_module.write_rows(conn, rows)
                except psycopg.Error as exc:
                    self.failures.append(f"{type(exc).__name__}: {str(exc).strip()}")
                else:
                    self.commits.append(time.monotonic())
                self.longest_s = max(self.longest_s, time.monotonic() - started)
                time.sleep(0.005)


def hold_back_ddl(url: str) -> psycopg.Connection[Any]:
    """A reader in an open REPEATABLE READ transaction that has read the three written tables.

    CREATE INDEX CONCURRENTLY waits for its snapshot, DROP INDEX CONCURRENTLY for its locks: the
    migrator stays mid-statement until it commits. A DDL that queued for a table lock instead
    would make every write queue behind it too.
    """
    reader = psycopg.connect(url, autocommit=True)
    reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    for table in ("sessions", "messages", "analytics_events"):
        reader.execute(f"SELECT count(*) FROM {table}".encode())
    return reader


def migrator_waiting(watcher: psycopg.Connection[Any]) -> str | None:
    """The statement the migrator is waiting in, on a lock, if it is."""
    row = watcher.execute(
        "SELECT query FROM pg_stat_activity WHERE application_name = 'tandem-migrate' AND wait_event_type = 'Lock'"
    ).fetchone()
    return None if row is None else str(row[0])


def test_downs_and_ups_never_make_the_archive_writes_wait(pg_url: str, tmp_path: Path) -> None:
    migrations.migrate(pg_url)
    schema = catalog(pg_url)
    # The index steps: all but 001 (the tables), 002 (the archive writer's ON CONFLICT arbiter) and
    # the steps after the last index step, which are reverted first, before the measured runs.
    builds = [m.version for m in ALL if m.index is not None and m.version > 2]
    newer = [m for m in ALL if m.version > max(builds)]
    if newer:
        migrations.revert(pg_url, len(newer))
    index_steps = len(builds)
    runs: dict[str, tuple[float, float, str | None]] = {}
    with ArchiveTraffic(pg_url) as traffic, psycopg.connect(pg_url, autocommit=True) as watcher:
        deadline = time.monotonic() + PHASE_WAIT_S
        while len(traffic.commits) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        for name, args, statement in (
            ("down", ["down", str(index_steps)], "DROP INDEX CONCURRENTLY"),
            ("up", [], "CREATE INDEX CONCURRENTLY"),
        ):
            started_at = query(pg_url, "SELECT now()")[0][0]
            reader = hold_back_ddl(pg_url)
            env = base_env(DATABASE_URL=pg_url, LOG_LEVEL="WARNING", LOG_FORMAT="json")
            output = tmp_path / f"migrate-{name}.log"
            with open(output, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, str(ROOT / "server.py"), "migrate", *args],
                    cwd=tmp_path,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                deadline = time.monotonic() + PHASE_WAIT_S
                waiting = None
                while waiting is None and time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.05)
                    waiting = migrator_waiting(watcher)
                held_from = time.monotonic()
                time.sleep(1.5)  # the migrator stays in its statement; the archive goes on writing
                held_to = time.monotonic()
                still = migrator_waiting(watcher)
            finally:
                reader.close()  # the migrator goes on
                code = proc.wait(120)
            runs[name] = (traffic.commits_between(held_from, held_to), held_to - held_from, waiting)
            assert code == 0, output.read_text()
            # No write waited WRITE_LOCK_BOUND_MS on a lock (its lock_timeout), and writes went on
            # while the migrator was held mid-statement.
            assert traffic.failures == [], (name, traffic.failures[:3])
            assert runs[name][0] >= 3, runs
            assert waiting is not None and still is not None, (name, waiting, output.read_text())
            assert statement in waiting, (name, waiting)
        assert versions(pg_url) == [m.version for m in ALL]
    assert traffic.failures == [], traffic.failures[:3]
    assert catalog(pg_url) == schema
    # The up run analyzed the tables it built indexes on.
    analyzed = query(
        pg_url, "SELECT relname FROM pg_stat_user_tables WHERE last_analyze > %s ORDER BY 1", (started_at,)
    )
    assert [t for (t,) in analyzed] == ["analytics_events", "messages", "sessions"]
    print(f"\nwrites: {len(traffic.commits)}, longest {traffic.longest_s * 1000:.0f} ms; while held: {runs}")


def test_an_alter_that_waits_for_its_lock_gives_way_to_the_archive_writes(pg_url: str, tmp_path: Path) -> None:
    """A transactional step (011's ALTER TABLE sessions) behind a long transaction: it retries with a
    short lock_timeout instead of queueing, so the writes never wait behind it; it runs once free."""
    migrations.migrate(pg_url)
    altered = ALL[-1]
    assert altered.transactional and altered.index is None, altered.name
    with ArchiveTraffic(pg_url) as traffic:
        deadline = time.monotonic() + PHASE_WAIT_S
        while len(traffic.commits) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        reader = hold_back_ddl(pg_url)  # holds ACCESS SHARE on sessions: the ALTER cannot take its lock
        env = base_env(DATABASE_URL=pg_url, LOG_LEVEL="WARNING", LOG_FORMAT="json")
        output = tmp_path / "migrate-down.log"
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "server.py"), "migrate", "down", "1"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            held_from = time.monotonic()
            time.sleep(2.0)  # the migrator tries and gives way, again and again
            held_to = time.monotonic()
            assert proc.poll() is None, output.read_text()  # still trying: the lock was never free
        finally:
            reader.close()
            code = proc.wait(120)
        assert code == 0, output.read_text()
        assert traffic.failures == [], traffic.failures[:3]  # no write waited WRITE_LOCK_BOUND_MS
        assert traffic.commits_between(held_from, held_to) >= 3
    assert versions(pg_url) == [m.version for m in ALL[:-1]]
