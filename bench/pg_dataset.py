"""A realistic archive, generated inside PostgreSQL with generate_series, and sample parameters.

Thirty days of traffic ending at END, written in time order as the archive writes it: users
(a tenth of the sessions have a creator), sessions (all ended but those of the last half hour),
`messages // sessions` messages per session, and analytics events, a quarter tied to a session.
Used by bench/pg_indexes.py (1M rows) and tests/test_database.py (smaller, same shape).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

END = datetime(2025, 3, 1, tzinfo=UTC)
DAYS = 30
START = END - timedelta(days=DAYS)

USERS = """
INSERT INTO users (email, created_at)
SELECT 'user' || g || '@example.com', %(start)s + (g::float8 / %(users)s) * interval '30 days'
FROM generate_series(1, %(users)s) AS g
"""

PROFILES = "INSERT INTO profiles (user_id, display_name) SELECT id, 'User ' || id FROM users"

# Session g is created at START + (g - 0.5) / n of the 30 days; its messages follow 3 s apart.
SESSIONS = """
INSERT INTO sessions (id, code, created_by, created_at, paired_at, ended_at, end_reason, message_count,
                      last_message_at)
OVERRIDING SYSTEM VALUE
SELECT g, upper(substr(md5(g::text), 1, 8)),
       CASE WHEN g %% 10 = 0 THEN 1 + (g / 10) %% %(users)s END,
       t.created,
       CASE WHEN g %% 10 <> 1 THEN t.created + interval '20 seconds' END,
       CASE WHEN NOT t.open THEN t.created + (%(per)s * 3 + 60) * interval '1 second' END,
       CASE WHEN t.open THEN NULL WHEN g %% 20 = 0 THEN 'ttl' WHEN g %% 20 <= 5 THEN 'idle' ELSE 'left' END,
       %(per)s,
       t.created + %(per)s * 3 * interval '1 second'
FROM generate_series(1, %(sessions)s) AS g,
     LATERAL (SELECT %(start)s + ((g - 0.5) / %(sessions)s) * interval '30 days' AS created) AS c,
     LATERAL (SELECT c.created, c.created > %(end)s - interval '30 minutes' AS open) AS t
"""

MESSAGES = """
INSERT INTO messages (session_id, seq, sender, body, size_bytes, created_at)
SELECT x.s, x.q, 'client' || (x.s * 2 + x.q %% 2), b.body, length(b.body::text),
       %(start)s + ((x.s - 0.5) / %(sessions)s) * interval '30 days' + x.q * 3 * interval '1 second'
FROM generate_series(1, %(messages)s) AS m,
     LATERAL (SELECT (m - 1) / %(per)s + 1 AS s, (m - 1) %% %(per)s + 1 AS q) AS x,
     LATERAL (SELECT jsonb_build_object('text', 'message ' || m || ' ' || repeat('x', m %% 60), 'n', x.q) AS body) AS b
"""

EVENTS = """
INSERT INTO analytics_events (type, session_id, created_at, props)
SELECT t.type,
       CASE WHEN t.with_session THEN greatest(1, (g::bigint * %(sessions)s) / %(events)s) END,
       %(start)s + (g::float8 / %(events)s) * interval '30 days',
       t.props
FROM generate_series(1, %(events)s) AS g,
     LATERAL (SELECT CASE WHEN g %% 20 <= 6 THEN 'connection.opened'
                          WHEN g %% 20 <= 13 THEN 'connection.closed'
                          WHEN g %% 20 <= 16 THEN 'session.resumed'
                          WHEN g %% 20 = 17 THEN 'session.join_failed'
                          ELSE 'session.left' END AS type,
                     g %% 20 BETWEEN 14 AND 16 OR g %% 20 >= 18 AS with_session,
                     CASE WHEN g %% 20 BETWEEN 7 AND 13
                          THEN jsonb_build_object('code', 1000, 'duration_ms', g %% 600000)
                          WHEN g %% 20 = 17 THEN '{"error": "not_found"}'::jsonb
                          ELSE '{}'::jsonb END AS props) AS t
"""


def load(conn: psycopg.Connection[Any], *, users: int, sessions: int, messages: int, events: int) -> None:
    """Fill an empty, migrated database; then VACUUM ANALYZE (autovacuum's steady state)."""
    params = {
        "users": users,
        "sessions": sessions,
        "messages": messages,
        "events": events,
        "per": max(1, messages // sessions),
        "start": START,
        "end": END,
    }
    with conn.transaction():
        conn.execute(USERS, params)
        conn.execute(PROFILES)
        conn.execute(SESSIONS, params)
        conn.execute("SELECT setval(pg_get_serial_sequence('sessions', 'id'), %(sessions)s)", params)
        conn.execute(MESSAGES, params)
        conn.execute(EVENTS, params)
    for table in ("users", "profiles", "sessions", "messages", "analytics_events"):
        conn.execute(f"VACUUM ANALYZE {table}".encode())


def sample_params(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """Parameters for each of archive_queries.QUERIES, drawn from the loaded data."""
    row = conn.execute("SELECT max(id) FROM sessions").fetchone()
    middle = (row[0] if row and row[0] else 1) // 2
    found = conn.execute("SELECT code, created_at FROM sessions WHERE id = %s", (middle,)).fetchone()
    code, created = found if found else ("NONE", END)
    user = conn.execute("SELECT created_by FROM sessions WHERE created_by IS NOT NULL LIMIT 1").fetchone()
    day = timedelta(days=1)
    return {
        "archive.resolve_session": {"code": code, "at": created + timedelta(minutes=5)},
        "admin.session_by_code": {"code": code},
        "admin.transcript": {"session_id": middle, "after_seq": 0},
        "admin.session_events": {"session_id": middle},
        "admin.recent_sessions": {"since": END - day},
        "admin.open_sessions": {},
        "admin.ended_sessions": {"since": END - 2 * day, "until": END - day},
        "admin.user_sessions": {"user_id": user[0] if user else 1},
        "admin.user_by_email": {"email": "USER42@Example.com"},
        "analytics.event_counts": {"type": "session.join_failed", "since": END - 7 * day, "until": END},
        "analytics.events_window": {"since": END - 2 * day, "until": END - day},
        "analytics.message_volume": {"since": END - 2 * day, "until": END - day},
    }


def scans(plan: dict[str, Any]) -> list[str]:
    """The access paths of an EXPLAIN (FORMAT JSON) plan, e.g. 'Index Scan sessions_created_at'."""
    found: list[str] = []
    node_type = str(plan.get("Node Type", ""))
    if "Index Name" in plan:
        backward = " Backward" if plan.get("Scan Direction") == "Backward" else ""
        found.append(f"{node_type}{backward} {plan['Index Name']}")
    elif node_type.endswith("Seq Scan"):
        found.append(f"{node_type} {plan.get('Relation Name', '')}")
    for child in plan.get("Plans", []):
        found.extend(scans(child))
    return found


def indexes_used(plan: dict[str, Any]) -> set[str]:
    names = {str(plan["Index Name"])} if "Index Name" in plan else set()
    for child in plan.get("Plans", []):
        names |= indexes_used(child)
    return names


def explain(
    conn: psycopg.Connection[Any], query: str, params: dict[str, Any], *, analyze: bool = False
) -> dict[str, Any]:
    """The JSON plan of `query` with `params` inlined (as a custom plan sees them)."""
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    cursor = psycopg.ClientCursor(conn)
    cursor.execute(f"EXPLAIN ({options}) {query}".encode(), params)
    row = cursor.fetchone()
    assert row is not None
    result: dict[str, Any] = row[0][0]
    return result
