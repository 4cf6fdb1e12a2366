"""The embedded store: sessions in one SQLite file, one writer, group commit.

Every operation is a function run in the writer thread inside one batch
transaction (each in a savepoint, so one failure does not fail the others);
the batch commits before any caller wakes, so an ack follows a durable write.
WAL mode with `synchronous=FULL`; DATA_DIR is locked to one process.
"""

from __future__ import annotations

import hmac
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, TypeVar

import trio

import protocol
from limiter import LimitKey, MemoryLimiter, rate_limited
from protocol import ClientError, ErrorCode, Member, ServerError
from session_store import (
    CODE_ATTEMPTS,
    LIST_BUDGET,
    MAX_MEMBERS,
    STATES,
    Appended,
    Created,
    Dispatch,
    Ended,
    Event,
    GroupCommit,
    Joined,
    MemberInfo,
    MessageStored,
    Op,
    Paired,
    PeerLeft,
    PresenceChanged,
    Resumed,
    SessionInfo,
    SessionPage,
    SessionStore,
    StoredMessage,
    Takeover,
    no_such_member,
    not_found,
    session_full,
    timed,
    wrong_member,
)

T = TypeVar("T")

# Sessions one sweep expires; the next tick takes the rest.
SWEEP_LIMIT = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    code        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    ttl_at      INTEGER NOT NULL,    -- hard expiry: created_at + SESSION_TTL
    idle_at     INTEGER NOT NULL,    -- last activity + SESSION_IDLE_TIMEOUT
    last_seq    INTEGER NOT NULL DEFAULT 0,
    trimmed_seq INTEGER NOT NULL DEFAULT 0   -- newest seq dropped from history
) WITHOUT ROWID;
-- the sweeper's query: WHERE min(idle_at, ttl_at) <= now
CREATE INDEX IF NOT EXISTS sessions_deadline ON sessions (min(idle_at, ttl_at));
CREATE TABLE IF NOT EXISTS members (
    code       TEXT NOT NULL REFERENCES sessions (code) ON DELETE CASCADE,
    client_id  TEXT NOT NULL,
    token_hash BLOB NOT NULL,
    position   INTEGER NOT NULL,     -- join order, for `clients`
    conn_id    TEXT,                 -- the connection holding it; NULL: offline
    user       TEXT,                 -- its authenticated `sub`; NULL: authentication was off
    PRIMARY KEY (code, client_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    code   TEXT NOT NULL REFERENCES sessions (code) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    sender TEXT NOT NULL,
    data   BLOB NOT NULL,
    ts     INTEGER NOT NULL,
    mid    TEXT,                 -- the sender's idempotency key, if it gave one
    PRIMARY KEY (code, seq)
) WITHOUT ROWID;
"""
# Run after SCHEMA (and after adding `mid` to a file made before it existed):
# a member's `mid` names one stored message.
MID_INDEX = """
CREATE UNIQUE INDEX IF NOT EXISTS messages_mid ON messages (code, sender, mid) WHERE mid IS NOT NULL;
"""


class SqliteStore(SessionStore):
    """The embedded store: one SQLite file (WAL), one writer, group commit."""

    backend = "sqlite"

    def __init__(
        self,
        db: sqlite3.Connection,
        dispatch: Dispatch,
        *,
        history_size: int,
        idle_ms: int,
        ttl_ms: int,
    ) -> None:
        self._db = db
        self.location = next((path for _, name, path in db.execute("PRAGMA database_list") if name == "main"), "")
        self._history = history_size
        self._idle_ms = idle_ms
        self._ttl_ms = ttl_ms
        # Not abandoned on cancel: a commit in flight finishes, so that an op
        # reported done is durable and an acked message is stored.
        self.writer = GroupCommit(self._execute, dispatch, abandon_on_cancel=False, backend=self.backend)
        self.limiter: MemoryLimiter = MemoryLimiter()
        # The admin API's reads: a read-only connection of their own (WAL lets it read
        # beside the writer), so a listing never delays a commit. `open` sets it.
        self.reader: sqlite3.Connection | None = None
        self._reading = trio.CapacityLimiter(1)  # one thread on the reader at a time

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        data_dir: Path,
        dispatch: Dispatch,
        *,
        history_size: int,
        idle_ms: int,
        ttl_ms: int,
        synchronous: str = "FULL",
    ) -> AsyncIterator[SqliteStore]:
        """Open (creating) DATA_DIR/tandem.sqlite3 and run the writer until exit.

        Holds an exclusive lock on DATA_DIR so that a second process fails at
        start-up instead of corrupting the members' online state.
        """
        with _exclusive_lock(data_dir / "tandem.lock"):
            db = await trio.to_thread.run_sync(_connect, data_dir / "tandem.sqlite3", synchronous)
            try:
                store = cls(db, dispatch, history_size=history_size, idle_ms=idle_ms, ttl_ms=ttl_ms)
                store.reader = await trio.to_thread.run_sync(_connect_reader, data_dir / "tandem.sqlite3")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store.writer.run)
                    try:
                        yield store
                    finally:
                        store.writer.close()  # the writer finishes what is queued, then returns
            finally:
                if store.reader is not None:
                    await trio.to_thread.run_sync(store.reader.close)
                await trio.to_thread.run_sync(db.close)

    def _execute(self, batch: list[Op]) -> None:
        """In the worker thread: run every op of the batch in one transaction."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in batch:
                db.execute("SAVEPOINT op")
                try:
                    op.result = op.payload(db, op.events)
                except Exception as exc:  # the op fails alone; the batch goes on
                    db.execute("ROLLBACK TO op")
                    op.events.clear()
                    op.error = exc
                db.execute("RELEASE op")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.rollback()
            for op in batch:
                op.events.clear()
                op.error = ServerError(f"session store failed: {exc}", ErrorCode.UNAVAILABLE, retry_after=1.0)

    async def _call(
        self, run: Callable[[sqlite3.Connection, list[Event]], T], then: Callable[[T], None] | None = None
    ) -> T:
        result: T = await self.writer.call(run, then)
        return result

    # -- operations (each runs in the writer thread, inside the batch) --

    def _alive(self, db: sqlite3.Connection, code: str, now: int) -> tuple[int, int, int]:
        row = db.execute(
            "SELECT last_seq, trimmed_seq, min(idle_at, ttl_at) FROM sessions"
            " WHERE code = ? AND idle_at > ? AND ttl_at > ?",
            (code, now, now),
        ).fetchone()
        if row is None:
            raise not_found()
        return row  # type: ignore[no-any-return]

    def _touch(self, db: sqlite3.Connection, code: str, now: int) -> None:
        db.execute("UPDATE sessions SET idle_at = ? WHERE code = ?", (now + self._idle_ms, code))

    @staticmethod
    def _members(db: sqlite3.Connection, code: str) -> tuple[Member, ...]:
        rows = db.execute(
            "SELECT client_id, conn_id IS NOT NULL FROM members WHERE code = ? ORDER BY position",
            (code,),
        ).fetchall()
        return tuple(Member(client_id, bool(online)) for client_id, online in rows)

    @staticmethod
    def _messages(db: sqlite3.Connection, code: str, after: int, skip_sender: str = "") -> tuple[StoredMessage, ...]:
        rows = db.execute(
            "SELECT seq, sender, data, ts, mid FROM messages WHERE code = ? AND seq > ? AND sender != ? ORDER BY seq",
            (code, after, skip_sender),
        ).fetchall()
        return tuple(StoredMessage(seq, sender, bytes(data), ts, mid) for seq, sender, data, ts, mid in rows)

    @timed("create")
    async def create(
        self,
        new_code: Callable[[], str],
        client_id: str,
        token_hash: bytes,
        conn_id: str,
        now: int,
        user: str | None = None,
    ) -> Created:
        ttl_at = now + self._ttl_ms
        idle_at = now + self._idle_ms

        def run(db: sqlite3.Connection, events: list[Event]) -> Created:
            for _ in range(CODE_ATTEMPTS):
                code = new_code()
                cursor = db.execute(
                    "INSERT INTO sessions (code, created_at, ttl_at, idle_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (code) DO NOTHING",
                    (code, now, ttl_at, idle_at),
                )
                if cursor.rowcount == 1:
                    db.execute(
                        "INSERT INTO members (code, client_id, token_hash, position, conn_id, user)"
                        " VALUES (?, ?, ?, 0, ?, ?)",
                        (code, client_id, token_hash, conn_id, user),
                    )
                    return Created(code, min(ttl_at, idle_at))
            raise ServerError("could not draw a free session code", ErrorCode.INTERNAL)

        return await self._call(run)

    @timed("join")
    async def join(
        self, code: str, client_id: str, token_hash: bytes, conn_id: str, now: int, user: str | None = None
    ) -> Joined:
        def run(db: sqlite3.Connection, events: list[Event]) -> Joined:
            last_seq, _, _ = self._alive(db, code, now)
            members = self._members(db, code)
            if len(members) >= MAX_MEMBERS:
                raise session_full()
            position = db.execute(
                "SELECT coalesce(max(position), -1) + 1 FROM members WHERE code = ?", (code,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO members (code, client_id, token_hash, position, conn_id, user) VALUES (?, ?, ?, ?, ?, ?)",
                (code, client_id, token_hash, position, conn_id, user),
            )
            self._touch(db, code, now)
            clients = (*members, Member(client_id, True))
            if len(clients) == MAX_MEMBERS:
                events.append(Paired(code, clients))
            return Joined(clients, last_seq, self._messages(db, code, 0))

        return await self._call(run)

    @timed("resume")
    async def resume(
        self,
        code: str,
        client_id: str,
        token_hash: bytes,
        conn_id: str,
        last_seq: int,
        now: int,
        user: str | None = None,
    ) -> Resumed:
        def run(db: sqlite3.Connection, events: list[Event]) -> Resumed:
            try:
                newest, trimmed, _ = self._alive(db, code, now)
            except ClientError:
                raise no_such_member() from None
            row = db.execute(
                "SELECT token_hash, conn_id, user FROM members WHERE code = ? AND client_id = ?",
                (code, client_id),
            ).fetchone()
            if row is None or not hmac.compare_digest(bytes(row[0]), token_hash):
                raise no_such_member()
            if user is not None and row[2] != user:  # another user holds this member's token
                raise no_such_member()
            previous = row[1]
            db.execute(
                "UPDATE members SET conn_id = ? WHERE code = ? AND client_id = ?",
                (conn_id, code, client_id),
            )
            self._touch(db, code, now)
            if previous is not None and previous != conn_id:
                events.append(Takeover(code, client_id, previous))
            events.append(PresenceChanged(code, client_id, True))
            return Resumed(
                self._members(db, code),
                newest,
                recovered=trimmed <= last_seq,
                replay=self._messages(db, code, last_seq, client_id),
            )

        return await self._call(run)

    async def append(
        self,
        code: str,
        client_id: str,
        conn_id: str,
        data: bytes,
        now: int,
        limits: Sequence[LimitKey] = (),
        mid: str | None = None,
        acked: Callable[[Appended], None] | None = None,
    ) -> Appended:
        stamp = self.limiter.now()
        refused = self.limiter.hit_all(limits, stamp)  # in memory: this process is the only one
        if refused is not None:
            raise rate_limited(refused.rule, refused.decision.retry_after)

        def run(db: sqlite3.Connection, events: list[Event]) -> Appended:
            if mid is not None:
                stored = db.execute(
                    "SELECT seq FROM messages WHERE code = ? AND sender = ? AND mid = ?", (code, client_id, mid)
                ).fetchone()
                if stored is not None and self._member_here(db, code, client_id, conn_id, now):
                    return Appended(stored[0], duplicate=True)
            row = db.execute(
                "UPDATE sessions SET last_seq = last_seq + 1, idle_at = ?"
                " WHERE code = ? AND idle_at > ? AND ttl_at > ? AND EXISTS"
                " (SELECT 1 FROM members WHERE code = ? AND client_id = ? AND conn_id = ?)"
                " RETURNING last_seq, trimmed_seq",
                (now + self._idle_ms, code, now, now, code, client_id, conn_id),
            ).fetchone()
            if row is None:
                raise not_found()
            seq, trimmed = row
            db.execute(
                "INSERT INTO messages (code, seq, sender, data, ts, mid) VALUES (?, ?, ?, ?, ?, ?)",
                (code, seq, client_id, data, now, mid),
            )
            drop_to = seq - self._history
            if drop_to > trimmed:
                db.execute("DELETE FROM messages WHERE code = ? AND seq <= ?", (code, drop_to))
                db.execute("UPDATE sessions SET trimmed_seq = ? WHERE code = ?", (drop_to, code))
            events.append(MessageStored(code, StoredMessage(seq, client_id, data, now, mid)))
            return Appended(seq, duplicate=False)

        appended = await self._call(run, acked)
        if appended.duplicate:  # nothing new: it costs no message budget
            self.limiter.refund_all(limits, stamp)
        return appended

    @staticmethod
    def _member_here(db: sqlite3.Connection, code: str, client_id: str, conn_id: str, now: int) -> bool:
        """The member is online on `conn_id` in a live session (what an append requires)."""
        return (
            db.execute(
                "SELECT 1 FROM sessions JOIN members USING (code) WHERE code = ? AND idle_at > ? AND ttl_at > ?"
                " AND client_id = ? AND conn_id = ?",
                (code, now, now, client_id, conn_id),
            ).fetchone()
            is not None
        )

    @timed("leave")
    async def leave(self, code: str, client_id: str, conn_id: str, now: int) -> bool:
        def run(db: sqlite3.Connection, events: list[Event]) -> bool:
            cursor = db.execute(
                "DELETE FROM members WHERE code = ? AND client_id = ? AND conn_id = ?",
                (code, client_id, conn_id),
            )
            if cursor.rowcount == 0:
                raise ClientError("not a member of that session", ErrorCode.NOT_IN_SESSION)
            left = db.execute("SELECT count(*) FROM members WHERE code = ?", (code,)).fetchone()[0]
            if left == 0:
                db.execute("DELETE FROM sessions WHERE code = ?", (code,))
                events.append(Ended(code, None))
                return True
            events.append(PeerLeft(code, client_id))
            return False

        return await self._call(run)

    @timed("disconnect")
    async def disconnect(self, code: str, client_id: str, conn_id: str, now: int) -> None:
        def run(db: sqlite3.Connection, events: list[Event]) -> None:
            cursor = db.execute(
                "UPDATE members SET conn_id = NULL WHERE code = ? AND client_id = ? AND conn_id = ?",
                (code, client_id, conn_id),
            )
            if cursor.rowcount:
                events.append(PresenceChanged(code, client_id, False))

        await self._call(run)

    @timed("sweep")
    async def sweep(self, now: int) -> list[tuple[str, str]]:
        def run(db: sqlite3.Connection, events: list[Event]) -> list[tuple[str, str]]:
            rows = db.execute(
                "SELECT code, idle_at, ttl_at FROM sessions WHERE min(idle_at, ttl_at) <= ? LIMIT ?",
                (now, SWEEP_LIMIT),
            ).fetchall()
            expired = []
            for code, idle_at, ttl_at in rows:
                db.execute("DELETE FROM sessions WHERE code = ?", (code,))
                reason = "ttl" if ttl_at <= idle_at else "idle"
                events.append(Ended(code, reason))
                expired.append((code, reason))
            return expired

        return await self._call(run)

    @timed("check")
    async def check(self) -> None:
        def run(db: sqlite3.Connection, events: list[Event]) -> None:
            db.execute("SELECT 1").fetchone()

        await self._call(run)

    @timed("count_sessions")
    async def count_sessions(self, now: int) -> dict[str, int] | None:
        """Live sessions by state, for metrics: "waiting" (one member) and "paired"."""

        def run(db: sqlite3.Connection, events: list[Event]) -> dict[str, int]:
            waiting, paired = db.execute(
                "SELECT coalesce(sum(n < ?), 0), coalesce(sum(n >= ?), 0) FROM (SELECT count(*) AS n"
                " FROM members JOIN sessions USING (code) WHERE min(idle_at, ttl_at) > ? GROUP BY code)",
                (MAX_MEMBERS, MAX_MEMBERS, now),
            ).fetchone()
            return {"waiting": waiting, "paired": paired}

        return await self._call(run)

    # -- the admin API and e-mail invites --

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """`run(reader)` in a worker thread, on the admin API's read-only connection."""
        if self.reader is None:
            raise ServerError("the store is not open", ErrorCode.UNAVAILABLE, retry_after=1.0)
        reader = self.reader
        try:
            return await trio.to_thread.run_sync(run, reader, limiter=self._reading)
        except sqlite3.Error as exc:
            raise ServerError(f"session store failed: {exc}", ErrorCode.UNAVAILABLE, retry_after=1.0) from None

    @staticmethod
    def _infos(db: sqlite3.Connection, rows: Sequence[tuple[str, int, int, int]]) -> tuple[SessionInfo, ...]:
        """Sessions (code, created_at, expires_at, last_seq) with their members, in one query."""
        members: dict[str, list[MemberInfo]] = {row[0]: [] for row in rows}
        if members:
            found = db.execute(
                "SELECT code, client_id, conn_id IS NOT NULL, user FROM members"
                f" WHERE code IN ({','.join('?' * len(members))}) ORDER BY code, position",
                list(members),
            )
            for code, client_id, online, user in found:
                members[code].append(MemberInfo(client_id, bool(online), user))
        return tuple(
            SessionInfo(code, tuple(members[code]), seq, created, expires) for code, created, expires, seq in rows
        )

    @timed("list_sessions")
    async def list_sessions(self, now: int, state: str | None, limit: int, after: str | None) -> SessionPage:
        """Sessions in code order from the one after `after` (a code), along the primary key:
        at most LIST_BUDGET rows read, and one query for the page's members."""
        if after is not None and not set(after) <= set(protocol.CODE_ALPHABET):
            raise ValueError("not a position of this store")
        wanted = None if state is None else MAX_MEMBERS if state == STATES[1] else 1

        def run(db: sqlite3.Connection) -> SessionPage:
            rows = db.execute(
                "SELECT code, created_at, min(idle_at, ttl_at), last_seq,"
                " (SELECT count(*) FROM members WHERE members.code = sessions.code)"
                " FROM sessions WHERE code > ? ORDER BY code LIMIT ?",
                (after or "", LIST_BUDGET),
            )
            page: list[tuple[str, int, int, int]] = []
            examined, last = 0, after
            for code, created, expires, seq, count in rows:
                examined, last = examined + 1, code
                if expires > now and (wanted is None or count == wanted):
                    page.append((code, created, expires, seq))
                    if len(page) > limit:  # one more than asked: there is a next page
                        del page[limit:]
                        return SessionPage(self._infos(db, page), page[-1][0])
            # Stopped by the budget: more may follow the last row read.
            return SessionPage(self._infos(db, page), last if examined == LIST_BUDGET else None)

        return await self._read(run)

    @timed("inspect")
    async def inspect(self, code: str, now: int) -> SessionInfo | None:
        def run(db: sqlite3.Connection) -> SessionInfo | None:
            row = db.execute(
                "SELECT code, created_at, min(idle_at, ttl_at), last_seq FROM sessions"
                " WHERE code = ? AND idle_at > ? AND ttl_at > ?",
                (code, now, now),
            ).fetchone()
            return None if row is None else self._infos(db, [row])[0]

        return await self._read(run)

    @timed("end")
    async def end(self, code: str, now: int) -> bool:
        def run(db: sqlite3.Connection, events: list[Event]) -> bool:
            cursor = db.execute(
                "DELETE FROM sessions WHERE code = ? AND idle_at > ? AND ttl_at > ?", (code, now, now)
            )  # members and messages go with it (ON DELETE CASCADE)
            if cursor.rowcount == 0:
                return False
            events.append(Ended(code, "ended"))
            return True

        return await self._call(run)

    @timed("verify_member")
    async def verify_member(
        self, code: str, client_id: str, token_hash: bytes, now: int, user: str | None = None
    ) -> None:
        def run(db: sqlite3.Connection) -> tuple[bytes | None, str | None] | None:
            row: tuple[bytes | None, str | None] | None = db.execute(
                "SELECT members.token_hash, members.user FROM sessions LEFT JOIN members"
                " ON members.code = sessions.code AND members.client_id = ?"
                " WHERE sessions.code = ? AND idle_at > ? AND ttl_at > ?",
                (client_id, code, now, now),
            ).fetchone()
            return row

        row = await self._read(run)
        if row is None:
            raise not_found()
        stored, member_user = row
        if stored is None or not hmac.compare_digest(bytes(stored), token_hash):
            raise wrong_member()
        if user is not None and member_user != user:  # another user holds this member's token
            raise wrong_member()

    # One process holds every connection of the file: its events are all local.
    async def watch(self, code: str) -> None:
        return None

    def unwatch(self, code: str) -> None:
        return None


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """Open the database (creating it and its schema) for the writer thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: transactions are the writer's explicit BEGIN/COMMIT.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")  # from a validated choice
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 5000")
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    if "mid" not in columns:  # a file from before `mid`: its messages have none
        db.execute("ALTER TABLE messages ADD COLUMN mid TEXT")
    if "user" not in {row[1] for row in db.execute("PRAGMA table_info(members)")}:  # from before authentication
        db.execute("ALTER TABLE members ADD COLUMN user TEXT")
    db.executescript(MID_INDEX)
    # This process owns the file (see _exclusive_lock): no connection of an
    # earlier process survives it, so every member starts offline.
    db.execute("UPDATE members SET conn_id = NULL WHERE conn_id IS NOT NULL")
    return db


def _connect_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection to the database `_connect` opened, for the admin API's threads."""
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    reader.execute("PRAGMA busy_timeout = 5000")
    return reader


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (flock on POSIX, msvcrt on Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if not _try_lock(handle):
            raise RuntimeError(f"DATA_DIR {path.parent} is in use by another Tandem process")
        try:
            yield
        finally:
            _unlock(handle)


if sys.platform == "win32":
    import msvcrt

    def _try_lock(handle: IO[bytes]) -> bool:
        try:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(handle: IO[bytes]) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(handle: IO[bytes]) -> bool:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(handle: IO[bytes]) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
