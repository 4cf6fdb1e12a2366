"""Proof that the index migrations pay: every archive and admin query, before and after.

Creates a scratch database, applies sql/001 only (tables and keys), loads a realistic dataset
(bench/pg_dataset.py), runs each of archive_queries.QUERIES with EXPLAIN (ANALYZE, BUFFERS)
(median of --repeat runs after one warm-up), applies the rest of sql/ with the migrator (CREATE
INDEX CONCURRENTLY on the loaded tables), runs them again and prints one table of both, measured
in the same run. JIT is off in this session, so that compile time does not inflate "before".

    .venv/bin/python bench/pg_indexes.py [--url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import archive_queries
import migrations
from bench import pg_dataset


def measure(
    conn: psycopg.Connection[Any], query: archive_queries.Query, params: dict[str, Any], repeat: int
) -> tuple[str, float, int]:
    """(access paths, median execution ms, shared buffers touched) of one query."""
    pg_dataset.explain(conn, query.sql, params, analyze=True)  # warm-up: caches, as in steady state
    times: list[float] = []
    plan: dict[str, Any] = {}
    for _ in range(repeat):
        plan = pg_dataset.explain(conn, query.sql, params, analyze=True)
        times.append(float(plan["Execution Time"]))
    top = plan["Plan"]
    buffers = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return ", ".join(dict.fromkeys(pg_dataset.scans(top))) or top["Node Type"], statistics.median(times), buffers


def machine(conn: psycopg.Connection[Any]) -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    row = conn.execute("SHOW server_version").fetchone()
    settings = conn.execute(
        "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ', ' ORDER BY name) FROM pg_settings"
        " WHERE name IN ('shared_buffers', 'work_mem', 'random_page_cost', 'max_parallel_workers_per_gather')"
    ).fetchone()
    return (
        f"{datetime.now(UTC):%Y-%m-%d}, {cpu}, {os.cpu_count()} vCPU, {mem_gib:.0f} GiB RAM, {platform.system()}"
        f" {platform.release()}, PostgreSQL {row[0] if row else '?'} ({settings[0] if settings else ''})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    name = f"tandem_bench_{secrets.token_hex(4)}"
    admin = psycopg.connect(args.url, autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(args.url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items() if v is not None})
    try:
        migrations.migrate(url, target=1)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET jit = off")
            started = time.monotonic()
            pg_dataset.load(conn, users=args.users, sessions=args.sessions, messages=args.messages, events=args.events)
            print(
                f"loaded {args.users:,} users, {args.sessions:,} sessions, {args.messages:,} messages,"
                f" {args.events:,} analytics events in {time.monotonic() - started:.1f}s",
                flush=True,
            )
            params = pg_dataset.sample_params(conn)
            before = {q.name: measure(conn, q, params[q.name], args.repeat) for q in archive_queries.QUERIES.values()}
            report = migrations.migrate(url)
            for table in ("sessions", "messages", "analytics_events"):
                conn.execute(f"VACUUM ANALYZE {table}".encode())
            after = {q.name: measure(conn, q, params[q.name], args.repeat) for q in archive_queries.QUERIES.values()}
            sizes: dict[str, str] = dict(
                conn.execute(
                    "SELECT c.relname, pg_size_pretty(pg_relation_size(c.oid)) FROM pg_class c"
                    " WHERE c.relkind = 'i' AND c.relnamespace = 'public'::regnamespace"
                ).fetchall()
            )
            tables = conn.execute(
                "SELECT string_agg(relname || ' ' || pg_size_pretty(pg_table_size(oid)), ', ' ORDER BY relname)"
                " FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
            ).fetchone()
            where = machine(conn)
    finally:
        if not args.keep:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()

    print(f"\nmachine: {where}")
    print(f"tables: {tables[0] if tables else ''}")
    print(f"median of {args.repeat} runs of EXPLAIN (ANALYZE, BUFFERS) each, after one warm-up; jit off\n")
    print("| query | plan before | plan after | before ms | after ms | ratio | buffers before → after |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for q in archive_queries.QUERIES.values():
        (plan_b, ms_b, buf_b), (plan_a, ms_a, buf_a) = before[q.name], after[q.name]
        ratio = ms_b / ms_a if ms_a > 0 else float("inf")
        print(f"| {q.name} | {plan_b} | {plan_a} | {ms_b:.3f} | {ms_a:.3f} | {ratio:,.1f}x | {buf_b:,} → {buf_a:,} |")
    print("\n| index | size | build (CREATE INDEX CONCURRENTLY on the loaded table) |")
    print("| --- | ---: | ---: |")
    for migration in migrations.discover():
        if migration.index is not None:
            built = report.seconds.get(migration.name)
            shown = f"{built:.2f}s" if built is not None else "-"
            print(f"| {migration.index} | {sizes.get(migration.index, '?')} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
