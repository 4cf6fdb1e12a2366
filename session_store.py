"""Session model, the store interface, and the embedded SQLite store.

A store keeps sessions, members and message history durably and turns every
change into events (`Broadcast`, `Takeover`, `Ended`) handed to `dispatch` in
commit order. SqliteStore runs every operation on one writer task that batches
the operations of many connections into one transaction per tick (group
commit) in a worker thread, so the event loop never waits on the disk.
"""

from __future__ import annotations

import fcntl
import hmac
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

import protocol
from limiter import Limiter, LimitKey, MemoryLimiter, rate_limited
from protocol import ClientError, ErrorCode, Member, ServerError

T = TypeVar("T")

# A session holds at most this many members (PROTOCOL.md: pairing).
MAX_MEMBERS = 2
# How many times create draws a new code when the drawn one is taken.
CODE_ATTEMPTS = 8
# Operations waiting for the writer; a full queue makes callers wait (backpressure).
OP_QUEUE_SIZE = 4096
# Operations in one transaction: bounds a commit's latency and its memory.
MAX_BATCH = 512
# Sessions one sweep expires; the next tick takes the rest.
SWEEP_LIMIT = 1000


# --- the model ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    sender: str
    data: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class Created:
    code: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class Joined:
    clients: tuple[Member, ...]
    last_seq: int
    backlog: tuple[StoredMessage, ...]


@dataclass(frozen=True, slots=True)
class Resumed:
    clients: tuple[Member, ...]
    last_seq: int
    recovered: bool
    replay: tuple[StoredMessage, ...]


# Events, dispatched in commit order to the connections of this process.


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send the frame `text` to the members of `code` connected here, except `exclude`.

    `seq` is the message's seq for a `message` frame, else 0.
    """

    code: str
    text: str
    exclude: str | None = None
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Takeover:
    """Member `client_id` moved to another connection: close `conn_id` with 1000."""

    code: str
    client_id: str
    conn_id: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The session is gone: send the frame `text` (if any) and release its connections."""

    code: str
    text: str | None


Event = Broadcast | Takeover | Ended
Dispatch = Callable[[Event], None]


def not_found() -> ClientError:
    return ClientError("no such session, or it expired", ErrorCode.NOT_FOUND)


def no_such_member() -> ClientError:
    """A resume's one answer for an unknown code and for wrong credentials, so
    that resuming cannot tell a guesser which codes exist."""
    return ClientError("no such session, or wrong client_id or token", ErrorCode.NOT_FOUND)


class SessionStore(ABC):
    """Durable sessions. Every method takes `now` in ms since the Unix epoch."""

    limiter: Limiter  # rate limits kept where the sessions are

    @abstractmethod
    async def create(
        self, new_code: Callable[[], str], client_id: str, token_hash: bytes, conn_id: str, now: int
    ) -> Created: ...

    @abstractmethod
    async def join(self, code: str, client_id: str, token_hash: bytes, conn_id: str, now: int) -> Joined: ...

    @abstractmethod
    async def resume(
        self, code: str, client_id: str, token_hash: bytes, conn_id: str, last_seq: int, now: int
    ) -> Resumed: ...

    @abstractmethod
    async def append(
        self, code: str, client_id: str, conn_id: str, data: bytes, now: int, limits: Sequence[LimitKey] = ()
    ) -> int:
        """Store a message durably and return its seq; `rate_limited` (nothing
        stored, nothing counted) if any of `limits` refuses it."""

    @abstractmethod
    async def leave(self, code: str, client_id: str, conn_id: str, now: int) -> bool:
        """Remove the member; return True when that ended the session."""

    @abstractmethod
    async def disconnect(self, code: str, client_id: str, conn_id: str, now: int) -> None:
        """The member's connection `conn_id` dropped: mark it offline if still current."""

    @abstractmethod
    async def sweep(self, now: int) -> list[tuple[str, str]]:
        """End expired sessions; return (code, reason) for each, reason "idle" or "ttl"."""

    @abstractmethod
    async def check(self) -> None:
        """Raise unless the store answers."""

    @abstractmethod
    async def watch(self, code: str) -> None:
        """Make sure this process receives the events of `code` from now on."""

    @abstractmethod
    def unwatch(self, code: str) -> None:
        """This process no longer needs the events of `code`."""

    async def shared_secret(self) -> bytes | None:
        """A secret every instance on this store agrees on, or None (one process)."""
        return None


# --- SQLite ---------------------------------------------------------------------

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
    PRIMARY KEY (code, client_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    code   TEXT NOT NULL REFERENCES sessions (code) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    sender TEXT NOT NULL,
    data   BLOB NOT NULL,
    ts     INTEGER NOT NULL,
    PRIMARY KEY (code, seq)
) WITHOUT ROWID;
"""


class Op:
    """One queued store operation, and then its outcome."""

    __slots__ = ("done", "error", "events", "payload", "result")

    def __init__(self, payload: Any) -> None:
        self.payload = payload
        self.result: Any = None
        self.error: BaseException | None = None
        self.events: list[Event] = []
        self.done = trio.Event()


class GroupCommit:
    """Runs queued operations in batches on one writer task (group commit).

    `execute(batch)` runs in a worker thread and sets each op's result or
    error; then each op's events are dispatched in order and its caller wakes.
    Operations queue in a bounded channel: a full queue makes callers wait.
    """

    def __init__(self, execute: Callable[[list[Op]], None], dispatch: Dispatch, *, abandon_on_cancel: bool) -> None:
        self._execute = execute
        self._dispatch = dispatch
        self._abandon = abandon_on_cancel
        self._send, self._receive = trio.open_memory_channel[Op](OP_QUEUE_SIZE)
        self.batches = 0  # ops / batches is the mean batch size
        self.ops = 0

    async def run(self) -> None:
        """The writer task: returns once `close()` was called and the queue is empty."""
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await trio.to_thread.run_sync(self._execute, batch, abandon_on_cancel=self._abandon)
                finally:
                    self.batches += 1
                    self.ops += len(batch)
                    for op in batch:
                        for event in op.events:
                            self._dispatch(event)
                        op.done.set()

    def close(self) -> None:
        self._send.close()

    async def call(self, payload: Any) -> Any:
        op = Op(payload)
        try:
            await self._send.send(op)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ServerError("the server is shutting down", ErrorCode.UNAVAILABLE, retry_after=1.0) from None
        await op.done.wait()
        if op.error is not None:
            if isinstance(op.error, protocol.TandemError):
                raise op.error
            raise ServerError("session store error", ErrorCode.INTERNAL) from op.error
        return op.result


class SqliteStore(SessionStore):
    """The embedded store: one SQLite file (WAL), one writer, group commit."""

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
        self._history = history_size
        self._idle_ms = idle_ms
        self._ttl_ms = ttl_ms
        # Not abandoned on cancel: a commit in flight finishes, so that an op
        # reported done is durable and an acked message is stored.
        self.writer = GroupCommit(self._execute, dispatch, abandon_on_cancel=False)
        self.limiter: MemoryLimiter = MemoryLimiter()

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
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(store.writer.run)
                    try:
                        yield store
                    finally:
                        store.writer.close()  # the writer finishes what is queued, then returns
            finally:
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

    async def _call(self, run: Callable[[sqlite3.Connection, list[Event]], T]) -> T:
        result: T = await self.writer.call(run)
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
            "SELECT seq, sender, data, ts FROM messages WHERE code = ? AND seq > ? AND sender != ? ORDER BY seq",
            (code, after, skip_sender),
        ).fetchall()
        return tuple(StoredMessage(seq, sender, bytes(data), ts) for seq, sender, data, ts in rows)

    async def create(
        self, new_code: Callable[[], str], client_id: str, token_hash: bytes, conn_id: str, now: int
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
                        "INSERT INTO members (code, client_id, token_hash, position, conn_id) VALUES (?, ?, ?, 0, ?)",
                        (code, client_id, token_hash, conn_id),
                    )
                    return Created(code, min(ttl_at, idle_at))
            raise ServerError("could not draw a free session code", ErrorCode.INTERNAL)

        return await self._call(run)

    async def join(self, code: str, client_id: str, token_hash: bytes, conn_id: str, now: int) -> Joined:
        def run(db: sqlite3.Connection, events: list[Event]) -> Joined:
            last_seq, _, _ = self._alive(db, code, now)
            members = self._members(db, code)
            if len(members) >= MAX_MEMBERS:
                raise ClientError("the session already has two members", ErrorCode.SESSION_FULL)
            position = db.execute(
                "SELECT coalesce(max(position), -1) + 1 FROM members WHERE code = ?", (code,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO members (code, client_id, token_hash, position, conn_id) VALUES (?, ?, ?, ?, ?)",
                (code, client_id, token_hash, position, conn_id),
            )
            self._touch(db, code, now)
            clients = (*members, Member(client_id, True))
            if len(clients) == MAX_MEMBERS:
                events.append(Broadcast(code, protocol.serialize(protocol.SessionPaired(code, clients))))
            return Joined(clients, last_seq, self._messages(db, code, 0))

        return await self._call(run)

    async def resume(
        self, code: str, client_id: str, token_hash: bytes, conn_id: str, last_seq: int, now: int
    ) -> Resumed:
        def run(db: sqlite3.Connection, events: list[Event]) -> Resumed:
            try:
                newest, trimmed, _ = self._alive(db, code, now)
            except ClientError:
                raise no_such_member() from None
            row = db.execute(
                "SELECT token_hash, conn_id FROM members WHERE code = ? AND client_id = ?",
                (code, client_id),
            ).fetchone()
            if row is None or not hmac.compare_digest(bytes(row[0]), token_hash):
                raise no_such_member()
            previous = row[1]
            db.execute(
                "UPDATE members SET conn_id = ? WHERE code = ? AND client_id = ?",
                (conn_id, code, client_id),
            )
            self._touch(db, code, now)
            if previous is not None and previous != conn_id:
                events.append(Takeover(code, client_id, previous))
            events.append(Broadcast(code, protocol.serialize(protocol.Presence(client_id, True)), client_id))
            return Resumed(
                self._members(db, code),
                newest,
                recovered=trimmed <= last_seq,
                replay=self._messages(db, code, last_seq, client_id),
            )

        return await self._call(run)

    async def append(
        self, code: str, client_id: str, conn_id: str, data: bytes, now: int, limits: Sequence[LimitKey] = ()
    ) -> int:
        refused = self.limiter.hit_all(limits)  # in memory: this process is the only one
        if refused is not None:
            raise rate_limited(refused.rule, refused.decision.retry_after)

        def run(db: sqlite3.Connection, events: list[Event]) -> int:
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
                "INSERT INTO messages (code, seq, sender, data, ts) VALUES (?, ?, ?, ?, ?)",
                (code, seq, client_id, data, now),
            )
            drop_to = seq - self._history
            if drop_to > trimmed:
                db.execute("DELETE FROM messages WHERE code = ? AND seq <= ?", (code, drop_to))
                db.execute("UPDATE sessions SET trimmed_seq = ? WHERE code = ?", (drop_to, code))
            message = protocol.serialize(protocol.Message(code, seq, client_id, data, now))
            events.append(Broadcast(code, message, client_id, seq))
            return seq  # type: ignore[no-any-return]

        return await self._call(run)

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
            events.append(Broadcast(code, protocol.serialize(protocol.PeerLeft(client_id)), client_id))
            return False

        return await self._call(run)

    async def disconnect(self, code: str, client_id: str, conn_id: str, now: int) -> None:
        def run(db: sqlite3.Connection, events: list[Event]) -> None:
            cursor = db.execute(
                "UPDATE members SET conn_id = NULL WHERE code = ? AND client_id = ? AND conn_id = ?",
                (code, client_id, conn_id),
            )
            if cursor.rowcount:
                events.append(Broadcast(code, protocol.serialize(protocol.Presence(client_id, False)), client_id))

        await self._call(run)

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
                events.append(Ended(code, protocol.serialize(protocol.SessionExpired(code, reason))))
                expired.append((code, reason))
            return expired

        return await self._call(run)

    async def check(self) -> None:
        def run(db: sqlite3.Connection, events: list[Event]) -> None:
            db.execute("SELECT 1").fetchone()

        await self._call(run)

    async def count_sessions(self, now: int) -> dict[str, int]:
        """Live sessions by state, for metrics: "waiting" (one member) and "paired"."""

        def run(db: sqlite3.Connection, events: list[Event]) -> dict[str, int]:
            waiting, paired = db.execute(
                "SELECT coalesce(sum(n < ?), 0), coalesce(sum(n >= ?), 0) FROM (SELECT count(*) AS n"
                " FROM members JOIN sessions USING (code) WHERE min(idle_at, ttl_at) > ? GROUP BY code)",
                (MAX_MEMBERS, MAX_MEMBERS, now),
            ).fetchone()
            return {"waiting": waiting, "paired": paired}

        return await self._call(run)

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
    # This process owns the file (see _exclusive_lock): no connection of an
    # earlier process survives it, so every member starts offline.
    db.execute("UPDATE members SET conn_id = NULL WHERE conn_id IS NOT NULL")
    return db


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"DATA_DIR {path.parent} is in use by another Tandem process") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
