"""The archive's read side: the queries run on what the archive writes, each with the index it uses.

tests/test_database.py and bench/pg_indexes.py run every one to prove that its index (sql/) pays.
Kept apart from archive.py, the write side, which is about 500 lines on its own; the writer's own
lookup, RESOLVE_SESSION, stays there beside the statements that embed it.
"""

from __future__ import annotations

from dataclasses import dataclass

from archive import RESOLVE_SESSION


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    sql: str  # %(name)s parameters
    index: str  # the index its plan must use (tests/test_database.py, bench/pg_indexes.py)
    purpose: str


_SESSION_COLUMNS = "id, code, created_at, paired_at, ended_at, end_reason, message_count, last_message_at"

# The sql/ files cite each query as `database.QUERIES["name"]`, this module's QUERIES: applied
# migration files are checksummed and never edited, so their wording stays.
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
