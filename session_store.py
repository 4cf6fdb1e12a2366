"""The session store's contract: the model, the events, the interface, group commit.

A store keeps sessions, members and message history durably and reports every
change as an event (fields, never wire text) handed to `dispatch` in commit
order. `sqlite_store.py` and `redis_store.py` implement `SessionStore`; both
batch the operations of many connections per tick with `GroupCommit`, so the
event loop never waits on a disk or a network round trip per request.
"""

from __future__ import annotations

import functools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import trio
from prometheus_client.registry import CollectorRegistry

import protocol
import tracing
from limiter import Limiter, LimitKey
from protocol import ClientError, ErrorCode, Member, ServerError

log = logging.getLogger("tandem.store")

T = TypeVar("T")
P = ParamSpec("P")
S = TypeVar("S", bound="SessionStore")

# A session holds at most this many members (PROTOCOL.md: pairing).
MAX_MEMBERS = 2
# How many times create draws a new code when the drawn one is taken.
CODE_ATTEMPTS = 8
# Operations waiting for the writer; a full queue makes callers wait (backpressure).
OP_QUEUE_SIZE = 4096
# Operations in one batch: bounds a commit's latency and its memory.
MAX_BATCH = 512


# --- the model ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    sender: str
    data: bytes  # the `data` value as compact JSON
    ts: int
    mid: str | None = None  # the sender's idempotency key, if it gave one


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    duplicate: bool  # the member's `mid` was stored already: nothing new was stored


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


# --- what the admin API sees of a session ------------------------------------------

# The states a listing filters by: one member ("waiting") or two ("paired").
STATES = ("waiting", "paired")
# Sessions one page of `list_sessions` examines at most, whether they match its
# filter or not: a page's work is bounded whatever the store holds (`after`
# carries on where it stopped, even when it found nothing).
LIST_BUDGET = 1000


@dataclass(frozen=True, slots=True)
class MemberInfo:
    client_id: str
    online: bool
    user: str | None = None  # the member's `sub` with authentication on; never its token


@dataclass(frozen=True, slots=True)
class SessionInfo:
    code: str
    members: tuple[MemberInfo, ...]
    last_seq: int
    created_at: int
    expires_at: int  # the earlier of the idle and the TTL deadline

    @property
    def state(self) -> str:
        return STATES[1] if len(self.members) >= MAX_MEMBERS else STATES[0]


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a listing; `after` is where the next starts (a store's own
    position, opaque to callers), None after the last."""

    sessions: tuple[SessionInfo, ...]
    after: str | None


# --- events: what a committed change means to the members connected here ----------


@dataclass(frozen=True, slots=True)
class MessageStored:
    """A message was stored: the other members receive it."""

    code: str
    message: StoredMessage


@dataclass(frozen=True, slots=True)
class Paired:
    """The session reached two members: every member is told."""

    code: str
    clients: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """A member's connection dropped or came back: the others are told."""

    code: str
    client_id: str
    online: bool


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """A member left with `session:leave`: the others are told."""

    code: str
    client_id: str


@dataclass(frozen=True, slots=True)
class Takeover:
    """Member `client_id` moved to another connection: close `conn_id` with 1000."""

    code: str
    client_id: str
    conn_id: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The session is gone. `reason` ("idle", "ttl", "ended") is told to the
    members online; None when its last member left (nobody to tell)."""

    code: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class SessionState:
    """The session as it is now, for members here that may have missed events
    (the Redis listener reconnected): `holders` maps each member to the
    connection that holds it, None while offline."""

    code: str
    clients: tuple[Member, ...]
    holders: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class Evicted:
    """This instance was declared dead by the others (it was paused, or cut
    off): its members are offline there, so every socket here closes (1012)."""


Event = MessageStored | Paired | PresenceChanged | PeerLeft | Takeover | Ended | SessionState | Evicted
Dispatch = Callable[[Event], None]


def not_found() -> ClientError:
    return ClientError("no such session, or it expired", ErrorCode.NOT_FOUND)


def no_such_member() -> ClientError:
    """A resume's one answer for an unknown code and for wrong credentials, so
    that resuming cannot tell a guesser which codes exist."""
    return ClientError("no such session, or wrong client_id or token", ErrorCode.NOT_FOUND)


def wrong_member() -> ClientError:
    """Credentials that do not name a member of a live session (the e-mail API's 401)."""
    return ClientError("wrong client_id or token", ErrorCode.UNAUTHORIZED)


def session_full() -> ClientError:
    return ClientError("the session already has two members", ErrorCode.SESSION_FULL)


# --- the interface -------------------------------------------------------------------


class StoreObserver(Protocol):
    """Where a store reports the latency and the failures of its operations."""

    def observe(self, op: str, seconds: float) -> None: ...

    def failed(self, op: str, error: ServerError) -> None: ...


# A store operation: an async method of a store.
Method = Callable[Concatenate[S, P], Coroutine[Any, Any, T]]


class _Unobserved:
    def observe(self, op: str, seconds: float) -> None:
        pass

    def failed(self, op: str, error: ServerError) -> None:
        pass


def timed(op: str) -> Callable[[Method[S, P, T]], Method[S, P, T]]:
    """Report the operation's latency, and its backend failures (a ServerError;
    a client's mistake is a ClientError), to the store's observer."""

    def decorate(method: Method[S, P, T]) -> Method[S, P, T]:
        @functools.wraps(method)
        async def run(store: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            started = time.perf_counter()
            try:
                return await method(store, *args, **kwargs)
            except ServerError as exc:
                store.observer.failed(op, exc)
                raise
            finally:
                store.observer.observe(op, time.perf_counter() - started)

        return run

    return decorate


class SessionStore(ABC):
    """Durable sessions. Every method takes `now` in ms since the Unix epoch.

    Failures reach the caller as `protocol.TandemError`s: a ClientError for
    the request (`not_found`, `session_full`, ...), a ServerError when the
    backend failed (`unavailable` with `retry_after`).
    """

    backend: str  # "sqlite" or "redis": a metrics label
    location: str = ""  # where the sessions are, as a log may show it (no password)
    limiter: Limiter  # rate limits kept where the sessions are
    observer: StoreObserver = _Unobserved()

    # `user`: the member's authenticated `sub` (None with authentication off),
    # recorded by create and join; a resume with a user requires that one.

    @abstractmethod
    async def create(
        self,
        new_code: Callable[[], str],
        client_id: str,
        token_hash: bytes,
        conn_id: str,
        now: int,
        user: str | None = None,
    ) -> Created:
        """A new session with its creator as first member, online on `conn_id`."""

    @abstractmethod
    async def join(
        self, code: str, client_id: str, token_hash: bytes, conn_id: str, now: int, user: str | None = None
    ) -> Joined:
        """Add a member; `not_found` or `session_full`."""

    @abstractmethod
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
        """Put a member back online on `conn_id`; `no_such_member` for any mismatch (the user's too)."""

    @abstractmethod
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
        """Store a message durably and return its seq; `rate_limited` (nothing
        stored, nothing counted) if any of `limits` refuses it.

        With a `mid` the member already used for a message still in history,
        nothing is stored or counted: that message's seq, `duplicate`.
        `acked`, if given, is called with the outcome as soon as it is stored,
        in commit order with the events (before this call returns).
        """

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

    # -- the admin API and e-mail invites: concrete, so a store without them (a test's) still is one --

    async def list_sessions(self, now: int, state: str | None, limit: int, after: str | None) -> SessionPage:
        """Up to `limit` live sessions (only those in `state` if given) from position `after`,
        examining at most LIST_BUDGET; ValueError for an `after` this store did not make."""
        raise ServerError("this store cannot list sessions", ErrorCode.INTERNAL)

    async def inspect(self, code: str, now: int) -> SessionInfo | None:
        """The live session `code`, or None."""
        raise ServerError("this store cannot inspect sessions", ErrorCode.INTERNAL)

    async def end(self, code: str, now: int) -> bool:
        """End the live session `code` (an operator's decision): its members online, on any
        instance, get `session:expired` "ended". False when there is no such session."""
        raise ServerError("this store cannot end sessions", ErrorCode.INTERNAL)

    async def verify_member(
        self, code: str, client_id: str, token_hash: bytes, now: int, user: str | None = None
    ) -> None:
        """Check a member's credentials without touching the session: `not_found` when the
        session does not exist, `unauthorized` for a wrong client_id or token (or, given
        `user`, a member another user holds)."""
        raise ServerError("this store cannot verify members", ErrorCode.INTERNAL)

    async def count_sessions(self, now: int) -> dict[str, int] | None:
        """Live sessions by state ("waiting", "paired"), or None where counting is not cheap."""
        return None

    async def shared_secret(self) -> bytes | None:
        """A secret every instance on this store agrees on, or None (one process)."""
        return None

    def register_metrics(self, registry: CollectorRegistry) -> None:  # noqa: B027  # optional, not abstract
        """Add the store's own metrics to `registry`; none by default."""


# --- group commit --------------------------------------------------------------------


class Op:
    """One queued store operation, and then its outcome."""

    __slots__ = ("done", "error", "events", "payload", "result", "then", "trace")
    trace: Any  # the span context of the request that queued it: set by tracing.py only while tracing is on

    def __init__(self, payload: Any, then: Callable[[Any], None] | None = None) -> None:
        self.payload = payload
        self.then = then  # called with the result after the op's events, before its caller wakes
        self.result: Any = None
        self.error: BaseException | None = None
        self.events: list[Event] = []
        self.done = trio.Event()


def _fail(batch: list[Op], error: ServerError) -> None:
    """Every op of a batch that did not finish fails with `error`, and tells nothing."""
    for op in batch:
        op.events = []
        op.error = error


class GroupCommit:
    """Runs queued operations in batches on one writer task (group commit).

    `execute(batch)` runs in a worker thread and sets each op's result or
    error; then each op's events are dispatched in order, its `then` is called
    with its result, and its caller wakes. A reply that `then` queues thus goes
    out in the same burst as the events of its batch.
    Operations queue in a bounded channel: a full queue makes callers wait.
    """

    def __init__(
        self, execute: Callable[[list[Op]], None], dispatch: Dispatch, *, abandon_on_cancel: bool, backend: str = ""
    ) -> None:
        self._execute = execute
        self.backend = backend  # "sqlite" or "redis", for traces
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
                tracer = tracing.tracer  # None: tracing is off
                span = None if tracer is None else tracer.batch_started(batch, self.backend)
                try:
                    await trio.to_thread.run_sync(self._execute, batch, abandon_on_cancel=self._abandon)
                except trio.Cancelled:
                    # Shutting down mid-batch: whether it was stored is not known.
                    _fail(batch, ServerError("the server is shutting down", ErrorCode.UNAVAILABLE, retry_after=1.0))
                    raise
                except Exception:  # a bug in execute(): this batch fails, the writer goes on
                    log.exception("store.batch_failed")
                    _fail(batch, ServerError("session store error", ErrorCode.INTERNAL))
                finally:
                    self.batches += 1
                    self.ops += len(batch)
                    if tracer is not None:
                        tracer.batch_done(span, batch)
                    for op in batch:
                        if tracer is None:
                            for event in op.events:
                                self._dispatch(event)
                        else:
                            tracer.dispatch(op, self._dispatch, self.backend)  # a message in a deliver span
                        if op.then is not None and op.error is None:
                            op.then(op.result)
                        op.done.set()

    def close(self) -> None:
        self._send.close()

    async def call(self, payload: Any, then: Callable[[Any], None] | None = None) -> Any:
        op = Op(payload, then)
        if tracing.tracer is not None:
            tracing.tracer.queued(op)  # carries the request's span context to the batch
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
