"""The PostgreSQL archive against a real PostgreSQL: migrations, plans, the archive, outages.

Every test creates its own database (tests/pg_servers.py) and drops it afterwards. The outage
test runs a private cluster in a temporary directory as the `postgres` OS user, stops it while
a session runs, and starts it again.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio
from helpers import ROOT, ServerFactory, base_env, connect, eventually, free_port, http, log_lines, paired
from pg_servers import PrivateCluster, scratch_database

import archive as archive_module
import archive_queries
import config as config_module
import migrations
import pg
from bench import pg_dataset

ARCHIVE_WAIT = 15.0  # seconds for rows to reach PostgreSQL
APPLIED_ALL = [m.name for m in migrations.discover()]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


def query(url: str, text: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        return conn.execute(text.encode(), params).fetchall()


async def archived(url: str, text: str, done: Callable[[list[tuple[Any, ...]]], bool]) -> list[tuple[Any, ...]]:
    """Poll `text` until `done(rows)`; fail with the last rows after ARCHIVE_WAIT seconds."""
    return await eventually(lambda: query(url, text), until=done, within=ARCHIVE_WAIT, interval=0.1)


def run_cli(*args: str, cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = base_env(**{"LOG_LEVEL": "INFO", "LOG_FORMAT": "json", **settings})
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


# --- migrations ---------------------------------------------------------------------------------


def test_migrations_apply_to_an_empty_database_and_a_second_run_is_a_no_op(pg_url: str) -> None:
    first = migrations.migrate(pg_url)
    assert first.applied == APPLIED_ALL
    versions = query(pg_url, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")
    assert [name for _, name, _, _ in versions] == APPLIED_ALL
    assert [checksum for _, _, checksum, _ in versions] == [m.checksum for m in migrations.discover()]
    indexes = {name for (name,) in query(pg_url, "SELECT indexrelid::regclass::text FROM pg_index WHERE indisvalid")}
    assert {q.index for q in archive_queries.QUERIES.values()} <= indexes
    # Foreign keys have indexes: each FK's columns lead some valid index of its table.
    unindexed = query(
        pg_url,
        "SELECT c.conrelid::regclass::text, c.conname FROM pg_constraint c WHERE c.contype = 'f'"
        " AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid AND i.indisvalid"
        " AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] = c.conkey)",
    )
    assert unindexed == []

    second = migrations.migrate(pg_url)
    assert second.applied == []
    assert (
        query(pg_url, "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version") == versions
    )


def test_a_modified_applied_file_is_refused(pg_url: str, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    shutil.copytree(migrations.SQL_DIR, sql_dir)
    migrations.migrate(pg_url, directory=sql_dir, target=3)
    changed = sql_dir / "003_sessions_open.sql"
    changed.write_text(changed.read_text() + "-- an innocent-looking edit\n")
    with pytest.raises(migrations.MigrationError, match=r"003_sessions_open\.sql was changed after it was applied"):
        migrations.migrate(pg_url, directory=sql_dir)
    # Refused before anything else ran: 004 and later are still pending.
    assert query(pg_url, "SELECT max(version) FROM schema_migrations") == [(3,)]


def test_migration_files_follow_the_rules(tmp_path: Path) -> None:
    def refused(files: dict[str, str], match: str) -> None:
        directory = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        for name, text in files.items():
            (directory / name).write_text(text)
        with pytest.raises(migrations.MigrationError, match=match):
            migrations.discover(directory)

    refused({"001_a.sql": "CREATE INDEX CONCURRENTLY i ON t (x);\n"}, "cannot run in a transaction")
    mark = migrations.NO_TRANSACTION_MARK
    refused({"001_a.sql": f"{mark}\nCREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (x);\nSELECT 1;\n"}, "exactly one")
    refused({"001_a.sql": f"{mark}\nCREATE INDEX CONCURRENTLY i ON t (x);\n"}, "IF NOT EXISTS")
    refused({"001_a.sql": "SELECT 1;", "001_b.sql": "SELECT 2;"}, "version 001")
    refused({"1_a.sql": "SELECT 1;"}, "NNN_name.sql")


def test_an_invalid_index_is_rebuilt_or_refused_loudly(pg_url: str, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    sql_dir.mkdir()
    (sql_dir / "001_t.sql").write_text("CREATE TABLE t (x int NOT NULL);\nINSERT INTO t VALUES (1), (1), (2);\n")
    (sql_dir / "002_t_x.sql").write_text(
        f"{migrations.NO_TRANSACTION_MARK}\n-- query: SELECT ... FROM t WHERE x = $1\n"
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_x ON t (x);\n"
    )
    # Duplicates: the build fails, leaves an INVALID index, the rebuild fails too: a loud error,
    # the invalid index dropped, 002 not recorded.
    with pytest.raises(migrations.MigrationError, match=r"002_t_x\.sql: index t_x is invalid"):
        migrations.migrate(pg_url, directory=sql_dir)
    assert query(pg_url, "SELECT count(*) FROM pg_class WHERE relname = 't_x'") == [(0,)]
    assert query(pg_url, "SELECT max(version) FROM schema_migrations") == [(1,)]

    # A run killed midway leaves an INVALID index that IF NOT EXISTS would keep: the migrator
    # drops it and builds it again.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY t_x ON t (x)")
        conn.execute("DELETE FROM t WHERE ctid = (SELECT max(ctid) FROM t WHERE x = 1)")
    assert query(pg_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass") == [(False,)]
    report = migrations.migrate(pg_url, directory=sql_dir)
    assert report.applied == ["002_t_x.sql"] and report.rebuilt == ["t_x"]
    assert query(pg_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass") == [(True,)]


def test_two_migrators_at_once_one_applies_the_other_waits_and_finds_nothing(pg_url: str, tmp_path: Path) -> None:
    # Hold the first migrator inside its run (a lock on schema_migrations, which it reads once it
    # has the advisory lock), so that the second one surely arrives while it works.
    # (pg_stat_activity is read on another connection: within a transaction it is a snapshot.)
    with psycopg.connect(pg_url, autocommit=True) as holder, psycopg.connect(pg_url, autocommit=True) as watcher:
        holder.execute(migrations.MIGRATIONS_TABLE)
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
        env = base_env(DATABASE_URL=pg_url, LOG_LEVEL="INFO", LOG_FORMAT="json")
        outputs = [tmp_path / f"migrate-{n}.log" for n in range(2)]
        procs = []
        for output in outputs:
            with open(output, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(ROOT / "server.py"), "migrate"],
                        cwd=tmp_path,
                        env=env,
                        stdout=out,  # the JSON log lines; the one-line summary on stderr goes apart,
                        stderr=subprocess.DEVNULL,  # so that the two never interleave in one file
                    )
                )
        deadline = time.monotonic() + 20
        blocked = waiting = False
        while time.monotonic() < deadline and not (blocked and waiting):
            time.sleep(0.05)
            waiting = any("migrate.waiting" in o.read_text() for o in outputs)
            blocked = bool(
                watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'tandem-migrate'"
                    " AND wait_event_type = 'Lock'"
                ).fetchall()
            )
        assert blocked and waiting, [o.read_text() for o in outputs]
        time.sleep(0.5)  # the second migrator keeps polling meanwhile
        holder.execute("COMMIT")
        codes = [proc.wait(60) for proc in procs]
    texts = [o.read_text() for o in outputs]
    assert codes == [0, 0], texts
    done = [orjson.loads(line) for text in texts for line in text.splitlines() if '"migrate.done"' in line]
    assert len(done) == 2, texts
    assert sorted(len(d["applied"]) for d in done) == [0, len(APPLIED_ALL)], done
    loser = next(d for d in done if not d["applied"])
    assert loser["waited_s"] >= 0.5, done
    assert query(pg_url, "SELECT count(*) FROM schema_migrations") == [(len(APPLIED_ALL),)]


def test_migrate_command_exit_codes(pg_url: str, tmp_path: Path) -> None:
    result = run_cli("migrate", cwd=tmp_path)
    assert result.returncode == 2 and "DATABASE_URL is not set" in result.stderr, result

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    result = run_cli("migrate", cwd=tmp_path, DATABASE_URL=dead)
    assert result.returncode == 1, result
    assert "migration failed: cannot connect to PostgreSQL at 127.0.0.1:" in result.stderr, result

    # The server with MIGRATE_ON_START=1 does not start without its schema.
    listen = {"HOST": "127.0.0.1", "PORT": str(free_port()), "DATA_DIR": str(tmp_path / "data")}
    result = run_cli(cwd=tmp_path, DATABASE_URL=dead, MIGRATE_ON_START="1", **listen)
    assert result.returncode == 2, result
    assert f"tandem: DATABASE_URL={dead}: cannot connect to PostgreSQL" in result.stderr, result
    assert run_cli("migrate", "now", cwd=tmp_path).returncode == 2

    result = run_cli("migrate", cwd=tmp_path, DATABASE_URL=pg_url)
    assert result.returncode == 0, result
    result = run_cli("migrate", cwd=tmp_path, DATABASE_URL=pg_url)
    assert result.returncode == 0 and "nothing to apply" in result.stderr, result


def test_archive_settings_are_checked() -> None:
    for name, value in (
        ("DATABASE_URL", "mysql://root:hunter2@db/x"),
        ("MIGRATE_ON_START", "yes please"),
        ("ARCHIVE_FLUSH_MS", "5"),
        ("ARCHIVE_BATCH_ROWS", "0"),
        ("ARCHIVE_QUEUE_SIZE", "many"),
        ("ARCHIVE_MESSAGES", "2"),
    ):
        with pytest.raises(config_module.ConfigError) as caught:
            config_module.load({name: value}, None)
        assert caught.value.name == name
        assert "hunter2" not in str(caught.value)


# --- every query uses its index -----------------------------------------------------------------


def test_each_query_plan_uses_its_index_at_realistic_row_counts(pg_url: str) -> None:
    migrations.migrate(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg_dataset.load(conn, users=2_000, sessions=20_000, messages=200_000, events=200_000)
        params = pg_dataset.sample_params(conn)
        wrong = {}
        for q in archive_queries.QUERIES.values():
            plan = pg_dataset.explain(conn, q.sql, params[q.name])["Plan"]
            if q.index not in pg_dataset.indexes_used(plan):
                wrong[q.name] = pg_dataset.scans(plan)
        assert wrong == {}, wrong

        # The writer's own statements find each row's session through sessions_code_created_at
        # and scan no table.
        code, at = params["archive.resolve_session"]["code"], 1_740_000_000_000
        one = {"code": [code], "ms": [at]}
        writes = {
            "ENSURE_SESSIONS": (archive_module.ENSURE_SESSIONS, one),
            "UPDATE_PAIRED": (archive_module.UPDATE_PAIRED, one),
            "INSERT_MESSAGES": (
                archive_module.INSERT_MESSAGES,
                {**one, "seq": [1_000], "sender": ["x"], "body": ["{}"], "size": [2]},
            ),
            "INSERT_EVENTS": (archive_module.INSERT_EVENTS, {**one, "type": ["t"], "props": ["{}"]}),
            "UPDATE_ENDED": (archive_module.UPDATE_ENDED, {**one, "reason": ["left"]}),
        }
        for name, (statement, values) in writes.items():
            plan = pg_dataset.explain(conn, statement, values)["Plan"]
            scans = pg_dataset.scans(plan)
            assert "sessions_code_created_at" in pg_dataset.indexes_used(plan), (name, scans)
            assert not [s for s in scans if "Seq Scan" in s], (name, scans)


# --- the archive --------------------------------------------------------------------------------


async def test_the_archive_matches_a_scripted_session_row_for_row(pg_url: str, tandem_factory: ServerFactory) -> None:
    server = tandem_factory(DATABASE_URL=pg_url, MIGRATE_ON_START="1", ARCHIVE_FLUSH_MS="50")
    sent: list[Any] = [{"text": "hello"}, {"n": 1, "deep": {"a": [1, 2, None]}}, "ünïcode ✓", 3.5, True]
    received = []
    async with connect(server) as a, connect(server) as b:
        created = await a.create()
        code = created["code"]
        await b.join(code)
        await b.expect("session:paired")
        await a.expect("session:paired")
        for i, data in enumerate(sent):
            sender, peer = (a, b) if i % 2 == 0 else (b, a)
            await sender.message(data)
            received.append(await peer.expect("message"))
        assert (await b.request("session:leave"))["type"] == "session:left"
        await a.expect("session:peer_left")
        assert (await a.request("session:leave"))["type"] == "session:left"

    await archived(
        pg_url, "SELECT count(*) FROM analytics_events WHERE type = 'connection.closed'", lambda r: r == [(2,)]
    )
    sessions = query(
        pg_url,
        "SELECT id, code, created_at <= paired_at, paired_at <= (SELECT min(created_at) FROM messages),"
        " ended_at >= last_message_at, end_reason, message_count,"
        " (extract(epoch FROM last_message_at) * 1000)::bigint FROM sessions",
    )
    session_id = sessions[0][0]
    assert sessions == [(session_id, code, True, True, True, "left", len(sent), received[-1]["ts"])]
    messages = query(
        pg_url,
        "SELECT session_id, seq, sender, body, size_bytes, (extract(epoch FROM created_at) * 1000)::bigint"
        " FROM messages ORDER BY seq",
    )
    assert messages == [
        (session_id, f["seq"], f["from"], f["data"], len(orjson.dumps(f["data"])), f["ts"]) for f in received
    ]
    events = query(pg_url, "SELECT type, session_id, props FROM analytics_events ORDER BY id")
    assert sorted((t, s) for t, s, _ in events) == sorted(
        [
            ("connection.opened", None),
            ("connection.opened", None),
            ("session.left", session_id),
            ("connection.closed", None),
            ("connection.closed", None),
        ]
    )
    closed = [p for t, _, p in events if t == "connection.closed"]
    assert sorted(p["messages_in"] for p in closed) == [2, 3]


async def test_metadata_only_and_expiry_is_archived(pg_url: str, tandem_factory: ServerFactory) -> None:
    migrations.migrate(pg_url)
    server = tandem_factory(
        DATABASE_URL=pg_url, ARCHIVE_MESSAGES="0", ARCHIVE_FLUSH_MS="50", SESSION_IDLE_TIMEOUT="1", SWEEP_INTERVAL="0.1"
    )
    async with paired(server) as (a, b, _, _):
        await a.message({"secret": "not for the archive"})
        await b.expect("message")
        await a.expect("session:expired")
    rows = await archived(
        pg_url, "SELECT end_reason, message_count FROM sessions WHERE ended_at IS NOT NULL", lambda r: len(r) == 1
    )
    assert rows == [("idle", 1)]
    assert query(pg_url, "SELECT body, size_bytes FROM messages") == [
        (None, len(orjson.dumps({"secret": "not for the archive"})))
    ]
    assert query(pg_url, "SELECT count(*) FROM analytics_events WHERE strpos(props::text, 'secret') > 0") == [(0,)]
    await archived(
        pg_url, "SELECT count(*) FROM analytics_events WHERE type = 'connection.closed'", lambda r: r == [(2,)]
    )


async def test_a_session_an_operator_ended_is_archived_with_reason_ended(
    pg_url: str, tandem_factory: ServerFactory
) -> None:
    migrations.migrate(pg_url)
    token = "admin-token-0123456789-abcdef"
    server = tandem_factory(DATABASE_URL=pg_url, ARCHIVE_FLUSH_MS="50", ADMIN_TOKEN=token)
    async with paired(server) as (a, b, created, _):
        status, _, _ = await http(
            "DELETE",
            f"{server.http}/api/debug/sessions/{created['code']}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert status == 204
        for client in (a, b):
            assert (await client.expect("session:expired"))["reason"] == "ended"
    rows = await archived(pg_url, "SELECT end_reason FROM sessions WHERE ended_at IS NOT NULL", lambda r: len(r) == 1)
    assert rows == [("ended",)]


async def test_sigterm_flushes_the_queue_before_exit(pg_url: str, tandem_factory: ServerFactory) -> None:
    migrations.migrate(pg_url)
    # Nothing would be written for a minute, nor before 10,000 rows: only the shutdown flushes.
    server = tandem_factory(DATABASE_URL=pg_url, ARCHIVE_FLUSH_MS="60000", ARCHIVE_BATCH_ROWS="10000")
    async with paired(server) as (a, b, _, _):
        for n in range(20):
            await a.message(n)
            await b.expect("message")
        assert query(pg_url, "SELECT count(*) FROM messages") == [(0,)]
        started = time.monotonic()
        assert await trio.to_thread.run_sync(server.terminate) == 0, server.output()
    assert time.monotonic() - started < 10.0  # SHUTDOWN_GRACE
    assert query(pg_url, "SELECT count(*), max(seq) FROM messages") == [(20, 20)], server.output()
    assert query(pg_url, "SELECT count(*) FROM analytics_events WHERE type = 'connection.closed'") == [(2,)]


async def test_a_full_queue_drops_and_counts_and_never_blocks_the_relay(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    server = tandem_factory(DATABASE_URL=dead, ARCHIVE_QUEUE_SIZE="10", ARCHIVE_FLUSH_MS="10")
    async with paired(server) as (a, b, _, _):
        with trio.fail_after(10):
            for n in range(40):
                assert await a.message(n) == n + 1
                assert (await b.expect("message"))["data"] == n
    metrics = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(f"{server.http}/metrics", timeout=5).read())
    dropped = re.search(rb'^tandem_archive_rows_total\{outcome="dropped"\} (\S+)$', metrics, re.MULTILINE)
    assert dropped is not None and float(dropped.group(1)) >= 30, metrics
    assert await trio.to_thread.run_sync(server.terminate) == 0, server.output()
    events = log_lines(server, strict=True)
    overflow = [e for e in events if e["event"] == "archive.overflow"]
    assert len(overflow) == 1, overflow
    closed = next(e for e in events if e["event"] == "archive.closed")
    assert closed["dropped"] >= 30 and closed["written"] == 0, closed
    lost = next(e for e in events if e["event"] == "archive.lost")
    assert 0 < lost["rows"] <= 10, lost


async def test_postgresql_down_mid_run_the_relay_keeps_working_and_rows_arrive_after(
    tandem_factory: ServerFactory,
) -> None:
    cluster = await trio.to_thread.run_sync(PrivateCluster)
    try:
        await trio.to_thread.run_sync(cluster.start)
        server = tandem_factory(DATABASE_URL=cluster.url, MIGRATE_ON_START="1", ARCHIVE_FLUSH_MS="50")
        async with paired(server) as (a, b, created, _):
            for n in range(3):
                await a.message(n)
                await b.expect("message")
            await archived(cluster.url, "SELECT count(*) FROM messages", lambda r: r == [(3,)])

            await trio.to_thread.run_sync(cluster.stop)
            with trio.fail_after(10):  # the relay does not wait for PostgreSQL
                for n in range(3, 10):
                    await (a if n % 2 else b).message(n)
                    assert (await (b if n % 2 else a).expect("message"))["data"] == n
                async with paired(server) as (c, d, during, _):
                    await c.message("during the outage")
                    await d.expect("message")
            # Still in service: the archive's check only warns.
            status, _, body = await http("GET", server.http + "/health/ready")
            report = orjson.loads(body)
            assert status == 200 and report["status"] == "warn", (status, report)
            assert report["checks"]["database:responseTime"][0]["status"] == "fail", report
            await trio.sleep(archive_module.POOL_WAIT_S + 1)  # long enough for the writer to give up once
            await trio.to_thread.run_sync(cluster.start)

            rows = await archived(
                cluster.url, "SELECT seq FROM messages ORDER BY session_id, seq", lambda r: len(r) == 11
            )
            assert [seq for (seq,) in rows] == [*range(1, 11), 1]
            codes = query(cluster.url, "SELECT code, paired_at IS NOT NULL FROM sessions ORDER BY id")
            assert codes == [(created["code"], True), (during["code"], True)]
        events = [e["event"] for e in log_lines(server, strict=True)]
        assert events.count("archive.unavailable") == 1 and events.count("archive.recovered") == 1, events
    finally:
        await trio.to_thread.run_sync(cluster.destroy)


# --- readiness ----------------------------------------------------------------------------------


async def test_check_reports_an_unreachable_or_unmigrated_database(pg_url: str) -> None:
    def settings(url: str) -> config_module.Config:
        return config_module.Config(database_url=url, shutdown_grace=1.0)

    async with archive_module.open_archive(settings(pg_url)) as archive:
        with pytest.raises(archive_module.ArchiveUnavailable, match=r"run `python server.py migrate`"):
            await archive.check()
        await trio.to_thread.run_sync(migrations.migrate, pg_url)
        await archive.check()

    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    async with archive_module.open_archive(settings(dead)) as archive:
        started = trio.current_time()
        with pytest.raises(archive_module.ArchiveUnavailable, match="database"):
            await archive.check()
        assert trio.current_time() - started <= archive_module.CHECK_TIMEOUT_S + 0.5

    async with archive_module.open_archive(config_module.Config()) as archive:
        assert archive is archive_module.NO_ARCHIVE
        await archive.check()


def test_the_query_catalogue_names_real_indexes() -> None:
    # Each index the catalogue names is created by a migration file that names the query.
    texts = {m.index or "": m.text for m in migrations.discover()}
    schema = migrations.discover()[0].text
    for q in archive_queries.QUERIES.values():
        text = texts.get(q.index, schema)
        assert q.index in text or q.index.endswith("_pkey"), q
        if not q.index.endswith("_pkey"):
            assert f'QUERIES["{q.name}"]' in text, (q.name, q.index)


async def test_rows_the_database_refuses_are_isolated_and_the_rest_stored(pg_url: str) -> None:
    await trio.to_thread.run_sync(migrations.migrate, pg_url)
    settings = config_module.Config(database_url=pg_url, archive_flush_ms=10, shutdown_grace=5.0)
    async with archive_module.open_archive(settings) as archive:
        assert isinstance(archive, archive_module.Archive)
        archive.session_created("ISOLATE1", 1_740_000_000_000)
        archive.message("ISOLATE1", 1, "a", b'{"ok": 1}', 1_740_000_000_001)
        archive.message("ISOLATE1", 2, "a", b'"nul \\u0000 inside"', 1_740_000_000_002)  # jsonb refuses \u0000
        archive.message("ISOLATE1", 3, "b", b"{not json", 1_740_000_000_003)  # refused: archived without body
        archive.session_ended("ISOLATE1", "exploded", 1_740_000_000_004)  # CHECK violation: dropped
        archive.message("ISOLATE1", 4, "b", b"[4]", 1_740_000_000_005)
    assert archive.stats() | {"batches": 0} == {
        "queued": 6,
        "written": 5,
        "dropped": 0,
        "refused": 1,
        "pending": 0,
        "batches": 0,
        "retries": 0,
    }
    assert query(pg_url, "SELECT seq, sender, body, size_bytes FROM messages ORDER BY seq") == [
        (1, "a", {"ok": 1}, 9),
        (2, "a", None, 19),
        (3, "b", None, 9),
        (4, "b", [4], 3),
    ]
    assert query(pg_url, "SELECT code, ended_at, message_count FROM sessions") == [("ISOLATE1", None, 4)]


async def test_an_abandoned_call_cancels_its_query(pg_url: str) -> None:
    def sleep(token: pg.Canceller) -> None:
        conn = psycopg.connect(pg_url, autocommit=True, application_name="tandem-test-sleep")
        with conn, token.using(conn):
            conn.execute("SELECT pg_sleep(30)")

    with trio.move_on_after(0.5):
        await pg.in_thread(sleep)
    active = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tandem-test-sleep' AND state = 'active'"
    await archived(pg_url, active, lambda rows: rows == [(0,)])
