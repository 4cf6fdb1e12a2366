"""PostgreSQL connections off the event loop: connect settings, and cancellable calls in threads.

psycopg 3's sync API runs in Trio worker threads (`in_thread`); a call Trio abandons on timeout or
cancellation has its query cancelled on the server (`Canceller`), so no thread keeps working for a
caller that left. Used by the migrator (migrations.py) and the archive writer (archive.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
import trio

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5  # libpq connect_timeout
TCP_USER_TIMEOUT_MS = 15_000  # a silent server is given up after this long (Linux)


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
