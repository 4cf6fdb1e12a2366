"""A trio client for Tandem: create, join or resume a session and keep its delivery promise.

A background task holds one WebSocket at a time; when it drops, it reconnects with jittered
backoff, resumes from the last delivered seq, drops replayed duplicates and resends unacknowledged
sends with their `mid` (stored once). The decisions (backoff, seq filter, outbox, saved state) are pure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import re
import secrets
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NoReturn, Protocol, TypeGuard

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    DisconnectionTimeout,
    HandshakeError,
    open_websocket_url,
)

__all__ = [
    "Acked",
    "Backoff",
    "BadCode",
    "ConnectionLost",
    "Disconnect",
    "Event",
    "Expired",
    "GiveUp",
    "Message",
    "MessageTooLarge",
    "Options",
    "Outbox",
    "OutboxFull",
    "Paired",
    "Peer",
    "PeerLeft",
    "Presence",
    "RequestFailed",
    "Resumed",
    "Retry",
    "SavedState",
    "SeqFilter",
    "ServerError",
    "Session",
    "SessionClosed",
    "State",
    "StateChanged",
    "TandemError",
    "Transport",
    "TransportClosed",
    "create",
    "decide",
    "join",
    "normalise_code",
    "resume",
    "websocket_connector",
]

Frame = dict[str, Any]
SAVED_VERSION = 1  # the layout of `Session.save()`; `SavedState.from_json` refuses any other
ABNORMAL_CLOSE = 1006  # what a WebSocket library reports when the TCP connection ended without a close frame
DISCONNECT_TIMEOUT = 2.0  # seconds the closing handshake of our own side may take
# Close codes after which reconnecting would fail the same way again (PROTOCOL.md "Close codes").
FATAL_CLOSES = {
    1002: "WebSocket protocol error",
    1003: "the server refused a binary frame",
    1007: "the server refused invalid UTF-8",
    1008: "policy violation (authentication, or too many errors in a row)",
    1009: "a frame was over the server's size limit",
}
# Error codes that say "later" rather than "never"; every other error ends the attempt for good.
CODE_PATTERN = re.compile(r"[0-9A-HJKMNP-TV-Z]{6,12}")  # Crockford's base32 without I L O U, 6 to 12 long
RETRYABLE_ERRORS = frozenset({"rate_limited", "unavailable", "internal"})
# Errors to a `message:send` that mean the session is over for this member (not the message's fault).
SESSION_GONE_ERRORS = frozenset({"not_found", "not_in_session"})


# --- the public vocabulary: states, events, errors ------------------------------------


class State(StrEnum):
    """Where a session is: the socket is being opened, the session is live, it is being recovered, or it is over."""

    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class TandemError(Exception):
    """Base of every error this module raises."""


class RequestFailed(TandemError):
    """The server answered a request with `error` (`code` is the protocol's error code)."""

    def __init__(self, code: str, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ConnectionLost(TandemError):
    """A connection failed or ended: the close code, or the HTTP status and Retry-After of a refused upgrade.

    A connector raises it when it cannot connect; a session closes with it when
    reconnecting would not help (a fatal close code, an HTTP refusal, `max_attempts` spent).
    """

    def __init__(
        self,
        message: str,
        close_code: int | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.http_status = http_status
        self.retry_after = retry_after


class SessionClosed(TandemError):
    """The session is over for this client: it expired, was left or taken over, or the client closed it."""


class OutboxFull(TandemError):
    """`Options.max_pending` sends are waiting for their ack; wait for some of them before sending more."""


class BadCode(TandemError, ValueError):
    """What was given to `join` cannot be a session code."""


class MessageTooLarge(TandemError, ValueError):
    """The `message:send` frame would be over the server's `MAX_MESSAGE_BYTES` (the server would close with 1009)."""


@dataclass(frozen=True)
class Peer:
    """Another member of the session and whether its connection is up."""

    client_id: str
    online: bool


@dataclass(frozen=True)
class StateChanged:
    """The session moved to `state`; `error` says why when it is CLOSED by a failure."""

    state: State
    error: TandemError | None = None


@dataclass(frozen=True)
class Paired:
    """The session has two members (again): `peers` are the others."""

    code: str
    peers: tuple[Peer, ...]


@dataclass(frozen=True)
class Message:
    """A message from the peer, delivered once and in seq order."""

    seq: int
    sender: str  # the sender's client_id (`from` on the wire)
    data: Any
    ts: int  # ms since the Unix epoch, when the server stored it
    mid: str | None = None


@dataclass(frozen=True)
class Presence:
    """A peer's connection dropped (`online=False`) or it resumed (`online=True`)."""

    client_id: str
    online: bool


@dataclass(frozen=True)
class PeerLeft:
    """A peer left the session for good (`session:leave`)."""

    client_id: str


@dataclass(frozen=True)
class Expired:
    """The session expired (`reason`: `idle`, `ttl` or `ended`); the session closes after this event."""

    code: str
    reason: str


@dataclass(frozen=True)
class ServerError:
    """The server sent `error` (a send's error is also raised by that `send`)."""

    code: str
    message: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Resumed:
    """A reconnect resumed the session; `recovered=False` means history was trimmed and messages were missed."""

    last_seq: int  # the session's newest seq
    recovered: bool


@dataclass(frozen=True)
class Acked:
    """A send nobody awaits (restored by `resume`, or its `send` was cancelled) was acknowledged with `seq`."""

    mid: str
    seq: int
    duplicate: bool


Event = StateChanged | Paired | Message | Presence | PeerLeft | Expired | ServerError | Resumed | Acked


# --- sans-IO: what to do after a connection ended -------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th retry waits uniform(0, min(cap, base * 2**n)) seconds."""

    base: float = 0.5
    cap: float = 10.0
    overload_floor: float = 1.0  # the least wait after close 1013 (the server is overloaded)
    restart_spread: float = 0.25  # after close 1012 (restart) a random wait below this, so clients do not stampede

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number `attempt` (0 for the first)."""
        return min(self.cap, self.base * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int, unit: float) -> float:
        """The wait before retry `attempt`, for `unit` drawn uniformly from [0, 1)."""
        return unit * self.ceiling(attempt)


@dataclass(frozen=True)
class Disconnect:
    """Why one connection ended (or never opened): the input of `decide`."""

    close_code: int | None = None  # the WebSocket close code (1006 when it just ended); None: no close
    http_status: int | None = None  # the upgrade was refused with this status
    error: str | None = None  # the Tandem error code that ended it (a reply to create, join, resume or auth)
    message: str = ""
    retry_after: float | None = None  # seconds, from an `error` frame or a `Retry-After` header
    in_session: bool = False  # the connection had been in the session (then a 1000 is a takeover)
    auth_expired: bool = False  # the server said `unauthorized` on its own (token expired) and a token source is set
    session_over: str | None = None  # the session ended (expired, left): nothing to resume
    dropped_oversized: bool = False  # after 1009: the send the server found too big was dropped, the rest may go on


@dataclass(frozen=True)
class Retry:
    """Reconnect after `delay` seconds; the retry after that one is number `attempt`."""

    delay: float
    attempt: int


@dataclass(frozen=True)
class GiveUp:
    """Do not reconnect: the session closes with `error`."""

    error: TandemError


def decide(ended: Disconnect, attempt: int, backoff: Backoff, unit: float) -> Retry | GiveUp:
    """Whether and when to reconnect after `ended`, the `attempt`-th retry in a row; `unit` is a uniform [0, 1) draw.

    Close 1012 (server restarting) retries at once (within `restart_spread`); 1013
    (overloaded) waits at least `overload_floor`, 1009 after its send was dropped at
    least one backoff step; a `retry_after` is waited in full; fatal closes, errors
    that would repeat (`not_found`, `unauthorized`, ...) and a takeover give up.
    """
    jitter = backoff.delay(attempt, unit)
    if ended.session_over is not None:
        return GiveUp(SessionClosed(ended.session_over))
    if ended.error is not None and ended.error not in RETRYABLE_ERRORS:
        return GiveUp(RequestFailed(ended.error, ended.message, ended.retry_after))
    if ended.close_code == 1008 and ended.auth_expired:
        return Retry(jitter, attempt + 1)  # the token ran out: reconnect with a fresh one from the source
    if ended.close_code == 1009 and ended.dropped_oversized:
        return Retry(backoff.delay(max(attempt, 1), unit), attempt + 1)  # not the same frame again
    if ended.close_code in FATAL_CLOSES:
        return GiveUp(
            ConnectionLost(f"closed with {ended.close_code}: {FATAL_CLOSES[ended.close_code]}", ended.close_code)
        )
    if ended.close_code == 1000 and ended.in_session:
        # Another connection resumed this member: resuming back would start a tug of war.
        return GiveUp(SessionClosed("taken over by another connection (close 1000)"))
    status = ended.http_status
    if status is not None and 400 <= status < 500 and status != 429:
        return GiveUp(ConnectionLost(f"upgrade refused with HTTP {status}: {ended.message}", http_status=status))
    if ended.close_code == 1012 and ended.retry_after is None:
        # A graceful restart: another instance (or this one, restarted) takes us now.
        return Retry(unit * backoff.restart_spread, 0)
    delay = jitter
    if ended.close_code == 1013:
        delay = max(delay, backoff.overload_floor)
    if ended.retry_after is not None:
        delay = max(delay, ended.retry_after)
    return Retry(delay, attempt + 1)


# --- sans-IO: messages in, sends out, the saved session ---------------------------------


@dataclass
class SeqFilter:
    """Delivers each peer message once, in seq order: a message is new only if its seq is above every one delivered.

    No reordering buffer is needed, nor possible: the server sends a connection's
    messages in seq order (replays first), and gaps are normal (this member's own
    messages, history trimmed), so waiting for a missing seq could wait forever.
    """

    last_seq: int = 0  # the highest seq delivered

    def is_new(self, seq: int) -> bool:
        return seq > self.last_seq

    def delivered(self, seq: int) -> None:
        """Record `seq` as delivered (after the hand-over succeeded, so a cancelled one is replayed)."""
        self.last_seq = max(self.last_seq, seq)


@dataclass(frozen=True)
class Pending:
    """An unacknowledged send: `number` orders the outbox, `text` is its `message:send` frame."""

    number: int
    mid: str
    data: Any
    text: str


def send_frame(mid: str, data: Any) -> str:
    """The `message:send` frame of `data` with its `mid`, which is also the request id (acks name the send)."""
    return encode({"type": "message:send", "id": mid, "mid": mid, "data": data})


def encode(frame: Mapping[str, Any]) -> str:
    """Compact JSON text; NaN and infinities are refused (they are not JSON)."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Outbox:
    """The sends not yet acknowledged, oldest first, at most `limit` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[str, Pending] = {}  # by mid, in the order they were added
        self._numbers = itertools.count()

    def add(self, mid: str, data: Any) -> Pending:
        """Queue a send; `OutboxFull` past the limit, `ValueError` for a mid already queued or not JSON data."""
        if len(self._entries) >= self.limit:
            raise OutboxFull(f"{self.limit} sends are waiting for their ack (Options.max_pending)")
        if mid in self._entries:
            raise ValueError(f"mid {mid!r} is already queued")
        entry = Pending(next(self._numbers), mid, data, send_frame(mid, data))
        self._entries[mid] = entry
        return entry

    def get(self, mid: str) -> Pending | None:
        return self._entries.get(mid)

    def remove(self, mid: str) -> Pending | None:
        """Take a send out (acknowledged, or refused for good); None when it is not queued (a second ack)."""
        return self._entries.pop(mid, None)

    def first_from(self, number: int) -> Pending | None:
        """The oldest send whose number is at least `number`: the next one a writer at `number` sends."""
        return next((entry for entry in self._entries.values() if entry.number >= number), None)

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class SavedState:
    """What a process needs to carry on with a session after a restart: see `Session.save` and `resume`."""

    code: str
    client_id: str
    token: str
    last_seq: int  # the highest seq the application has taken from the events
    pending: tuple[tuple[str, Any], ...] = ()  # (mid, data) of each unacknowledged send, oldest first

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON values (strings, numbers, lists), ready for `json.dumps`."""
        return {
            "version": SAVED_VERSION,
            "code": self.code,
            "client_id": self.client_id,
            "token": self.token,
            "last_seq": self.last_seq,
            "pending": [{"mid": mid, "data": data} for mid, data in self.pending],
        }

    @classmethod
    def from_json(cls, saved: Mapping[str, Any]) -> SavedState:
        """The state `to_json` made; `ValueError` for anything else (another version, a missing or wrong field)."""
        if saved.get("version") != SAVED_VERSION:
            raise ValueError(f"saved session version {saved.get('version')!r}, expected {SAVED_VERSION}")
        strings = [saved.get(name) for name in ("code", "client_id", "token")]
        if not all(isinstance(value, str) and value for value in strings):
            raise ValueError("saved session needs non-empty strings code, client_id and token")
        last_seq = saved.get("last_seq")
        if not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
            raise ValueError(f"saved session last_seq must be an integer >= 0, not {last_seq!r}")
        pending = saved.get("pending", [])
        if not isinstance(pending, list) or not all(
            isinstance(item, dict) and isinstance(item.get("mid"), str) and "data" in item for item in pending
        ):
            raise ValueError("saved session pending must be a list of {mid, data}")
        code, client_id, token = (str(value) for value in strings)
        return cls(code, client_id, token, last_seq, tuple((item["mid"], item["data"]) for item in pending))


def normalise_code(typed: str) -> str:
    """A session code as the server expects it, from what a person typed; `BadCode` when it cannot be one.

    Any case; spaces, hyphens, underscores and dots ignored; the ambiguous letters
    forgiven as in Crockford's base32 (I and L read as 1, O as 0), like tandem.js.
    """
    compact = re.sub(
        r"[\s\-_.]", "", unicodedata.normalize("NFKC", typed)
    )  # NFKC: a full-width letter is its ASCII one
    code = compact.upper().replace("I", "1").replace("L", "1").replace("O", "0") if compact.isascii() else ""
    if not CODE_PATTERN.fullmatch(code):
        why = "codes never contain the letter U" if "U" in code else "a code is 6 to 12 letters and digits"
        raise BadCode(f"not a session code: {typed!r} ({why})")
    return code


def new_mid() -> str:
    """A random `mid` (96 bits, 16 URL-safe characters): unique among a member's sends."""
    return secrets.token_urlsafe(12)


def retry_after_header(headers: tuple[tuple[bytes, bytes], ...]) -> float | None:
    """The seconds of a `Retry-After` header (the delta form Tandem sends), or None."""
    for name, value in headers:
        if name.lower() == b"retry-after":
            with contextlib.suppress(ValueError):
                seconds = float(value)
                if math.isfinite(seconds) and seconds >= 0:
                    return seconds
    return None


# --- transports: the WebSocket, or a fake one in tests --------------------------------


class TransportClosed(Exception):
    """The connection is closed; `code` is the WebSocket close code (1006 without a close frame)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Transport(Protocol):
    """One open connection carrying text frames."""

    async def send(self, text: str) -> None:
        """Send one text frame; `TransportClosed` once the connection is closed."""

    async def receive(self) -> str:
        """The next text frame; `TransportClosed` when the connection ends."""


# A connector opens a transport for a URL within a connect timeout (seconds); entering it
# raises `ConnectionLost` when it cannot, leaving it closes the connection.
Connector = Callable[[str, float], AbstractAsyncContextManager[Transport]]
TokenSource = Callable[[], Awaitable[str]]


class _WebSocket:
    """A trio-websocket connection as a `Transport` (it answers the server's pings by itself)."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws

    async def send(self, text: str) -> None:
        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
            raise TransportClosed(_close_code(exc)) from exc

    async def receive(self) -> str:
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise TransportClosed(_close_code(exc)) from exc
        return message if isinstance(message, str) else bytes(message).decode("utf-8", "replace")


def _close_code(exc: ConnectionClosed) -> int:
    reason = exc.reason
    return int(reason.code) if reason is not None and reason.code is not None else ABNORMAL_CLOSE


@asynccontextmanager
async def websocket_connector(url: str, connect_timeout: float) -> AsyncIterator[Transport]:
    """The default connector: trio-websocket, receiving frames up to 32 MiB.

    The server accepts at most 16 MiB (its largest `MAX_MESSAGE_BYTES`); a relayed
    `message` carries the sender's data plus a few fields, so it may be a little larger.
    """
    opened = False
    try:
        async with open_websocket_url(
            url,
            connect_timeout=connect_timeout,
            disconnect_timeout=DISCONNECT_TIMEOUT,
            max_message_size=32 * 1024 * 1024,
        ) as ws:
            opened = True
            yield _WebSocket(ws)
    except ConnectionRejected as exc:
        if opened:
            raise
        body = bytes(exc.body or b"")[:200].decode("utf-8", "replace")
        raise ConnectionLost(body, http_status=exc.status_code, retry_after=retry_after_header(exc.headers)) from exc
    except DisconnectionTimeout as exc:
        if not opened:
            raise ConnectionLost("connection timed out") from None
        if isinstance(exc.__context__, trio.Cancelled | BaseExceptionGroup):
            raise  # the block was cancelled (or failed): never hide that behind the close
        # Otherwise our closing handshake timed out after the connection was done with: nothing is lost.
    except (HandshakeError, ConnectionClosed, OSError) as exc:
        if opened:
            raise
        raise ConnectionLost(repr(exc.__cause__ or exc)) from exc


# --- options --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How a session connects, waits and retries. Every time is in seconds."""

    backoff: Backoff = field(default_factory=Backoff)
    max_attempts: int | None = None  # failed reconnects in a row before the session closes; None: forever
    open_timeout: float = 30.0  # how long `create` and `join` wait for the session before raising
    connect_timeout: float = 10.0  # TCP, TLS and the WebSocket upgrade
    request_timeout: float = 10.0  # each reply (resume, auth, leave); no reply: the connection is dropped
    ping_interval: float = 15.0  # a `ping` this often; the server answers with `pong`
    ping_timeout: float = 10.0  # no frame for ping_interval + ping_timeout: the connection is dead
    max_pending: int = 100  # unacknowledged sends; the server's default HISTORY_SIZE, as a `mid` lives in history
    # Sends written and awaiting their ack at once. 1 keeps the order of sends: with more, a send
    # refused by a rate limit (or `unavailable`) and resent can be stored after a later one that
    # the server admitted meanwhile. Keep it below MAX_CONSECUTIVE_ERRORS (20): each refusal counts.
    max_in_flight: int = 1
    event_buffer: int = 256  # events waiting for the application; a full buffer stops reading the socket
    max_message_bytes: int = 65536  # the server's MAX_MESSAGE_BYTES (a 1.1 `welcome` replaces it)
    token: TokenSource | None = None  # protocol 1.1: a JWT for `auth`, asked for on each connection and refresh
    auth_refresh_margin: float = 30.0  # refresh the token this long before it expires (at most 20 % of its life)
    connector: Connector = websocket_connector
    random: Callable[[], float] = random.random  # the jitter's uniform [0, 1) draw


# --- the session ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Create:
    pass


@dataclass(frozen=True)
class _Join:
    code: str


@dataclass(frozen=True)
class _Resume:
    pass


_Intent = _Create | _Join | _Resume


class _Wakeup:
    """Wakes every task waiting in `wait` when `set` is called (then re-arms)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Reply:
    """The reply a request waits for."""

    def __init__(self) -> None:
        self.frame: Frame | None = None
        self.done = trio.Event()


class _Waiter:
    """A `send` waiting for its ack: the seq, or the error that refused it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.seq: int | None = None
        self.error: TandemError | None = None

    def resolve(self, seq: int) -> None:
        self.seq = seq
        self.done.set()

    def fail(self, error: TandemError) -> None:
        self.error = error
        self.done.set()


class _Link:
    """One connection of a session: its transport, open requests and send window; `end` records why it ended."""

    def __init__(self, transport: Transport, scope: trio.CancelScope, has_token: bool, patience: float) -> None:
        self.transport = transport
        self.scope = scope  # cancels every task of this connection
        self.has_token = has_token
        self.patience = patience  # seconds one write may take before the connection counts as dead
        self.replies: dict[int, _Reply] = {}
        self.ids = itertools.count(1)
        self.ended: Disconnect | None = None
        self.in_session = False  # a create, join or resume succeeded on this connection
        self.auth_expired = False  # the server sent `unauthorized` on its own
        self.in_flight: set[str] = set()  # mids written and not answered yet
        self.paused_until = 0.0  # trio time before which no send is written (after rate_limited, unavailable)
        self.rewind_to: int | None = None  # the outbox number to write again from once the pause is over

    def end(self, close_code: int | None = None, **details: Any) -> None:
        """Record why the connection ends (the first reason wins) and stop its tasks."""
        if self.ended is None:
            self.ended = Disconnect(
                close_code=close_code,
                in_session=self.in_session,
                auth_expired=self.auth_expired and self.has_token,
                **details,
            )
        self.scope.cancel()

    async def fail(self, close_code: int | None = None, **details: Any) -> NoReturn:
        """`end`, then unwind the calling task (one of this connection's) through trio's cancellation."""
        self.end(close_code, **details)
        await trio.lowlevel.checkpoint()  # raises Cancelled: the scope above was cancelled
        raise AssertionError("a connection task ran outside its connection's scope")

    async def send(self, frame: Mapping[str, Any] | str) -> None:
        """Write a frame; a closed or stuck transport ends the connection (and the calling task, through `fail`)."""
        written = False
        with trio.move_on_after(self.patience):
            try:
                await self.transport.send(frame if isinstance(frame, str) else encode(frame))
            except TransportClosed as exc:
                await self.fail(exc.code)
            written = True
        if not written:  # the server stopped reading: TCP's window is full
            await self.fail(message=f"a write took over {self.patience} s")

    async def request(self, frame: Mapping[str, Any], patience: float) -> Frame:
        """Send a request with a fresh id and return its reply; no reply within `patience` s ends the connection."""
        rid = next(self.ids)
        reply = _Reply()
        self.replies[rid] = reply
        try:
            await self.send({**frame, "id": rid})
            with trio.move_on_after(patience):
                await reply.done.wait()
        finally:
            del self.replies[rid]
        if reply.frame is None:
            await self.fail(message=f"no reply to {frame.get('type')} within {patience} s")
        return reply.frame


class _ServerClock:
    """The server's clock in ms, from the `time` of its `welcome` and trio's clock since."""

    def __init__(self, server_ms: Any) -> None:
        self.server_ms = float(server_ms) if _is_number(server_ms) else time.time() * 1000
        self.local = trio.current_time()

    def seconds_until(self, ms: float) -> float:
        now = self.server_ms + (trio.current_time() - self.local) * 1000
        return (ms - now) / 1000


class Session:
    """One membership of one Tandem session, kept alive across reconnects. Open it with `create`, `join` or `resume`.

    Iterate the session (`async for event in session`) to receive its events; iteration
    ends after the session is CLOSED. Read them: while the event buffer is full the
    session stops reading the socket (the server may then close it with 1013, and the
    session recovers by resuming).
    """

    def __init__(self, url: str, intent: _Intent, options: Options, saved: SavedState | None = None) -> None:
        self.url = url
        self.options = options
        self._intent = intent
        self._credentials: tuple[str, str, str] | None = None  # code, client_id, token
        self._filter = SeqFilter()
        self._consumed_seq = 0  # the highest seq the application took from the events (what `save` keeps)
        self._outbox = Outbox(options.max_pending)
        self._waiters: dict[str, _Waiter] = {}
        self._members: dict[str, bool] = {}  # client_id -> online, every member but this one
        self._state = State.CONNECTING
        self._error: TandemError | None = None  # why the session closed
        self._events_in, self._events_out = trio.open_memory_channel[Event](options.event_buffer)
        self._changed = _Wakeup()  # the outbox, an ack or the state changed
        self._ready = trio.Event()  # the first create, join or resume was answered, or the session closed
        self._link: _Link | None = None
        self._max_bytes = options.max_message_bytes
        self._run_scope = trio.CancelScope()
        if saved is not None:
            self._credentials = (saved.code, saved.client_id, saved.token)
            self._filter.last_seq = self._consumed_seq = saved.last_seq
            for mid, data in saved.pending:
                self._outbox.add(mid, data)

    # --- what the application sees ---

    @property
    def state(self) -> State:
        return self._state

    @property
    def code(self) -> str:
        """The session's code (upper case), to show to the person who joins."""
        return self._member()[0]

    @property
    def client_id(self) -> str:
        """This member's id in the session (`Message.sender` of its messages at the peer)."""
        return self._member()[1]

    def _member(self) -> tuple[str, str, str]:
        # Set before `create` and `join` return, and by `resume` from the start.
        if self._credentials is None:
            raise TandemError("no session yet")
        return self._credentials

    @property
    def peers(self) -> tuple[Peer, ...]:
        """The other members, in the order they joined."""
        return tuple(Peer(client_id, online) for client_id, online in self._members.items())

    @property
    def last_seq(self) -> int:
        """The highest seq of a peer message the application has taken from the events."""
        return self._consumed_seq

    @property
    def pending(self) -> int:
        """Sends not acknowledged yet."""
        return len(self._outbox)

    @property
    def error(self) -> TandemError | None:
        """Why the session closed, when it closed by a failure."""
        return self._error

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> Event:
        try:
            event = await self._events_out.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(event, Message):
            self._consumed_seq = max(self._consumed_seq, event.seq)
        return event

    async def next_event(self) -> Event:
        """The next event; `SessionClosed` once the session is closed and every event was taken."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise SessionClosed(f"session closed: {self._error}") from self._error

    async def send(self, data: Any) -> int:
        """Send a JSON value; returns its seq once the server stored it. Wrap it in `trio.fail_after` to bound it.

        The send is queued when the connection is down and resent with the same
        `mid` after a resume, so it is stored once. `OutboxFull` past
        `Options.max_pending` unacknowledged sends, `MessageTooLarge` past the
        server's frame limit, `SessionClosed` when the session is over,
        `RequestFailed` when the server refuses this message for good. A cancelled
        `send` stays queued and is still sent (an `Acked` event reports it).
        """
        if self._state is State.CLOSED:
            raise SessionClosed(f"session closed: {self._error}") from self._error
        mid = new_mid()
        text = send_frame(mid, data)
        size = len(text.encode())
        if size > self._max_bytes:
            raise MessageTooLarge(f"message:send frame of {size} bytes, the server accepts {self._max_bytes}")
        self._outbox.add(mid, data)
        waiter = self._waiters[mid] = _Waiter()
        self._changed.set()
        try:
            await waiter.done.wait()
        finally:
            self._waiters.pop(mid, None)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.seq is not None
        return waiter.seq

    async def wait_open(self) -> None:
        """Wait until the session is OPEN (wrap it in `trio.fail_after`); `SessionClosed` if it closes first."""
        for _ in itertools.count():
            if self._state is State.OPEN:
                return
            if self._state is State.CLOSED:
                raise SessionClosed(f"session closed: {self._error}") from self._error
            await self._changed.wait()

    async def leave(self) -> None:
        """Leave the session for good, after the queued sends were acknowledged. Bound it with `trio.fail_after`."""
        for _ in itertools.count():
            if self._state is State.CLOSED:
                raise SessionClosed(f"session closed: {self._error}") from self._error
            if self._state is State.OPEN and self._link is not None and not self._outbox:
                break
            await self._changed.wait()
        link = self._link
        assert link is not None
        rid = next(link.ids)
        reply = link.replies[rid] = _Reply()
        try:
            # A closed connection or no reply in time: not confirmed, reported below.
            with trio.move_on_after(self.options.request_timeout), contextlib.suppress(TransportClosed):
                await link.transport.send(encode({"type": "session:leave", "id": rid}))
                await reply.done.wait()
        finally:
            link.replies.pop(rid, None)
        if reply.frame is None or reply.frame.get("type") != "session:left":
            raise RequestFailed(str((reply.frame or {}).get("code", "no_reply")), "session:leave was not confirmed")
        self._run_scope.cancel()
        self._shut(SessionClosed("left the session"), emit=True)

    def save(self) -> dict[str, Any]:
        """The session as a JSON-able dict for `resume`: credentials, last seq taken, unacknowledged sends.

        It holds the member's token: keep it as secret as the session.
        """
        code, client_id, token = self._member()
        pending = tuple((entry.mid, entry.data) for entry in self._outbox)
        return SavedState(code, client_id, token, self._consumed_seq, pending).to_json()

    # --- the connection loop ---

    async def _run(self) -> None:
        """Connect, run the connection, decide, wait, again; until a decision gives up."""
        attempt = 0
        failures = 0  # connections in a row that never reached OPEN
        with self._run_scope:
            for _ in itertools.count():
                ended, opened = await self._connection()
                if opened:
                    attempt = failures = 0
                else:
                    failures += 1
                decision = decide(ended, attempt, self.options.backoff, self.options.random())
                limit = self.options.max_attempts
                if isinstance(decision, Retry) and limit is not None and failures >= limit:
                    decision = GiveUp(ConnectionLost(f"{failures} connection attempts failed; last: {ended}"))
                if isinstance(decision, GiveUp):
                    self._shut(decision.error, emit=True)
                    return
                await self._set_state(State.RECONNECTING if self._credentials else State.CONNECTING)
                await trio.sleep(decision.delay)
                attempt = decision.attempt

    async def _connection(self) -> tuple[Disconnect, bool]:
        """One connection from open to end: why it ended, and whether the session was live on it."""
        try:
            async with self.options.connector(self.url, self.options.connect_timeout) as transport:
                try:
                    async with trio.open_nursery() as nursery:
                        link = _Link(
                            transport,
                            nursery.cancel_scope,
                            self.options.token is not None,
                            self.options.request_timeout,
                        )
                        self._link = link
                        nursery.start_soon(self._read, link)
                        await self._handshake(link, nursery)
                        nursery.start_soon(self._write, link)
                        nursery.start_soon(self._keepalive, link)
                finally:
                    self._link = None
                    self._changed.set()
        except ConnectionLost as exc:
            return Disconnect(http_status=exc.http_status, retry_after=exc.retry_after, message=str(exc)), False
        ended = link.ended or Disconnect(close_code=ABNORMAL_CLOSE)
        if ended.close_code == 1009:
            ended = await self._drop_oversized(link, ended)
        return ended, link.in_session

    async def _drop_oversized(self, link: _Link, ended: Disconnect) -> Disconnect:
        """After 1009: drop the oldest send in flight (the frame over the server's limit) and learn the limit.

        It is never sent again; its `send` raises `MessageTooLarge`, and a `ServerError`
        `too_big` reports it. With no send in flight the cause is unknown: `decide` gives up.
        """
        culprit = next((entry for entry in self._outbox if entry.mid in link.in_flight), None)
        if culprit is None:
            return ended
        self._outbox.remove(culprit.mid)
        size = len(culprit.text.encode())
        self._max_bytes = min(self._max_bytes, size - 1)
        error = MessageTooLarge(f"the server closed the connection (1009) over a message:send frame of {size} bytes")
        waiter = self._waiters.pop(culprit.mid, None)
        if waiter is not None:
            waiter.fail(error)
        await self._emit(ServerError("too_big", str(error)))
        return replace(ended, dropped_oversized=True)

    async def _handshake(self, link: _Link, nursery: trio.Nursery) -> None:
        """Authenticate when the server asks for it, then create, join or resume; the reader applies the reply."""
        if self.options.token is not None:
            await self._authenticate(link, nursery)
        if self._credentials is not None:
            code, client_id, token = self._credentials
            request: Frame = {
                "type": "session:resume",
                "code": code,
                "client_id": client_id,
                "token": token,
                "last_seq": self._filter.last_seq,
            }
        elif isinstance(self._intent, _Join):
            request = {"type": "session:join", "code": self._intent.code}
        else:
            request = {"type": "session:create"}
        reply = await link.request(request, self.options.request_timeout)
        if reply.get("type") == "error":
            await link.fail(**_error_details(reply))

    async def _authenticate(self, link: _Link, nursery: trio.Nursery) -> None:
        """Protocol 1.1: `hello`; when `welcome` says auth is required, `auth` with a token and keep it fresh."""
        welcome = await link.request({"type": "hello"}, self.options.request_timeout)
        if welcome.get("type") != "welcome":
            return  # a version 1 server (`unknown_type`): no authentication
        limits = welcome.get("limits")
        if isinstance(limits, dict) and isinstance(limits.get("max_message_bytes"), int):
            self._max_bytes = limits["max_message_bytes"]
        if welcome.get("auth") != "required":
            return
        clock = _ServerClock(welcome.get("time"))
        expires_at = await self._auth(link, refresh=False)
        nursery.start_soon(self._refresh_auth, link, clock, expires_at)

    async def _auth(self, link: _Link, *, refresh: bool) -> float | None:
        """Send `auth` with a fresh token: its expiry (ms) on `auth:ok`; None for a refused refresh."""
        assert self.options.token is not None
        token: str | None = None
        with trio.move_on_after(self.options.request_timeout):
            try:
                token = await self.options.token()
            except Exception as exc:  # the application's callback: a failure is retried like a lost connection
                await link.fail(message=f"token source failed: {exc!r}")
        if token is None:
            await link.fail(message=f"token source gave no token within {self.options.request_timeout} s")
        reply = await link.request({"type": "auth", "token": token}, self.options.request_timeout)
        if reply.get("type") == "auth:ok":
            expires_at = reply.get("expires_at")
            return float(expires_at) if _is_number(expires_at) else None
        if refresh:
            # Refused: the connection keeps its current token until it expires; the server then
            # closes with 1008 and the session reconnects with a token from the source.
            return None
        await link.fail(**_error_details(reply))

    async def _refresh_auth(self, link: _Link, clock: _ServerClock, expires_at: float | None) -> None:
        """Send a fresh token before the current one expires, for as long as the connection lives."""
        margin = self.options.auth_refresh_margin
        for _ in itertools.count():
            if expires_at is None:
                return
            remaining = clock.seconds_until(expires_at)
            # At least a second between refreshes, even for a token that is (nearly) expired already.
            await trio.sleep(max(1.0, remaining - min(margin, remaining * 0.2)))
            expires_at = await self._auth(link, refresh=True)

    async def _keepalive(self, link: _Link) -> None:
        """A `ping` every `ping_interval`: the `pong` keeps the reader's silence timeout from firing."""
        for _ in itertools.count():
            await trio.sleep(self.options.ping_interval)
            await link.send({"type": "ping"})

    async def _read(self, link: _Link) -> None:
        """Read frames until the connection ends; a connection silent for too long is dropped as dead."""
        silence = self.options.ping_interval + self.options.ping_timeout
        for _ in itertools.count():
            text: str | None = None
            with trio.move_on_after(silence):
                try:
                    text = await link.transport.receive()
                except TransportClosed as exc:
                    link.end(exc.code)
                    return
            if text is None:
                link.end(ABNORMAL_CLOSE, message=f"no frame from the server for {silence} s")
                return
            try:
                frame = json.loads(text)
            except ValueError:
                continue  # not JSON: nothing a client can act on
            if isinstance(frame, dict):
                await self._dispatch(link, frame)

    async def _dispatch(self, link: _Link, frame: Frame) -> None:
        """Apply one server frame in arrival order, so events reach the application in the server's order."""
        kind = frame.get("type")
        rid = frame.get("id")
        if kind == "error":
            await self._emit(ServerError(str(frame.get("code")), str(frame.get("message", "")), _retry_after(frame)))
            if rid is None and frame.get("code") == "unauthorized":
                link.auth_expired = True
            if isinstance(rid, str):
                await self._send_refused(link, rid, frame)
        elif kind == "message:ack" and isinstance(rid, str):
            await self._acked(link, rid, frame)
        elif kind in ("session:created", "session:joined", "session:resumed"):
            await self._entered(link, frame)
        elif kind == "message":
            await self._message(frame)
        elif kind == "session:paired":
            self._set_members(frame.get("clients"))
            await self._emit(Paired(str(frame.get("code")), self.peers))
        elif kind == "session:presence":
            peer = str(frame.get("client_id"))
            if peer in self._members:
                self._members[peer] = bool(frame.get("online"))
            await self._emit(Presence(peer, bool(frame.get("online"))))
        elif kind == "session:peer_left":
            self._members.pop(str(frame.get("client_id")), None)
            await self._emit(PeerLeft(str(frame.get("client_id"))))
        elif kind == "session:expired":
            reason = str(frame.get("reason"))
            await self._emit(Expired(str(frame.get("code")), reason))
            link.end(session_over=f"the session expired ({reason})")
        if isinstance(rid, int) and rid in link.replies:
            link.replies[rid].frame = frame
            link.replies[rid].done.set()

    async def _entered(self, link: _Link, frame: Frame) -> None:
        """The session is live on this connection: keep the credentials and members, report it."""
        code, client_id = str(frame.get("code")), str(frame.get("client_id"))
        if frame["type"] != "session:resumed":
            self._credentials = (code, client_id, str(frame.get("token")))
        self._set_members(frame.get("clients"))
        link.in_session = True
        await self._set_state(State.OPEN)
        if frame["type"] == "session:resumed":
            last_seq = frame.get("last_seq")
            await self._emit(Resumed(last_seq if isinstance(last_seq, int) else 0, frame.get("recovered") is not False))
        self._ready.set()

    async def _message(self, frame: Frame) -> None:
        seq = frame.get("seq")
        if not isinstance(seq, int) or not self._filter.is_new(seq):
            return  # seen before (a replay after a reconnect), or malformed
        mid, ts = frame.get("mid"), frame.get("ts")
        event = Message(
            seq,
            str(frame.get("from")),
            frame.get("data"),
            ts if isinstance(ts, int) else 0,
            mid if isinstance(mid, str) else None,
        )
        await self._emit(event)
        self._filter.delivered(seq)

    async def _acked(self, link: _Link, mid: str, frame: Frame) -> None:
        link.in_flight.discard(mid)
        seq = frame.get("seq")
        entry = self._outbox.remove(mid) if isinstance(seq, int) else None
        self._changed.set()
        if entry is None or not isinstance(seq, int):
            return  # the second ack of a send written twice
        waiter = self._waiters.pop(mid, None)
        if waiter is not None:
            waiter.resolve(seq)
        else:
            await self._emit(Acked(mid, seq, frame.get("duplicate") is True))

    async def _send_refused(self, link: _Link, mid: str, frame: Frame) -> None:
        """A `message:send` got `error`: wait and resend, end the session, or fail that send."""
        link.in_flight.discard(mid)
        entry = self._outbox.get(mid)
        if entry is None:
            return
        code = str(frame.get("code"))
        if code in RETRYABLE_ERRORS:
            # Not stored: write it (and what followed it) again after the wait. Sends already
            # stored meanwhile come back as duplicates, which cost nothing.
            wait = _retry_after(frame) or self.options.backoff.base
            link.paused_until = max(link.paused_until, trio.current_time() + wait)
            link.rewind_to = min(entry.number, link.rewind_to if link.rewind_to is not None else entry.number)
            self._changed.set()
        elif code in SESSION_GONE_ERRORS:
            link.end(**_error_details(frame))
        else:
            self._outbox.remove(mid)
            self._changed.set()
            waiter = self._waiters.pop(mid, None)
            if waiter is not None:
                waiter.fail(RequestFailed(code, str(frame.get("message", ""))))

    async def _write(self, link: _Link) -> None:
        """Write the outbox in order, every unacknowledged send again on a new connection, a window at a time."""
        number = 0  # the outbox number this connection writes next
        for _ in itertools.count():
            if link.rewind_to is not None:
                pause = link.paused_until - trio.current_time()
                if pause > 0:
                    await trio.sleep(pause)
                    continue
                number, link.rewind_to = min(number, link.rewind_to), None
            entry = self._outbox.first_from(number)
            if entry is None or len(link.in_flight) >= self.options.max_in_flight:
                with trio.move_on_after(self.options.ping_interval):  # re-check now and then regardless
                    await self._changed.wait()
                continue
            link.in_flight.add(entry.mid)
            number = entry.number + 1
            await link.send(entry.text)

    # --- helpers ---

    def _set_members(self, clients: Any) -> None:
        """Replace the members from a `clients` list (this member left out), keeping the server's order."""
        if not isinstance(clients, list):
            return
        me = self._credentials[1] if self._credentials else None
        self._members = {
            str(c.get("client_id")): bool(c.get("online"))
            for c in clients
            if isinstance(c, dict) and c.get("client_id") != me
        }

    async def _set_state(self, state: State) -> None:
        if state is not self._state and self._state is not State.CLOSED:
            self._state = state
            self._changed.set()
            await self._emit(StateChanged(state))

    async def _emit(self, event: Event) -> None:
        """Hand an event to the application; waits while the buffer is full (that is the backpressure)."""
        if self._state is not State.CLOSED or isinstance(event, StateChanged):
            await self._events_in.send(event)

    def _shut(self, error: TandemError, *, emit: bool) -> None:
        """Close the session: fail the waiting sends, report CLOSED (if the buffer has room), end the events."""
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSED
        self._error = error
        for waiter in self._waiters.values():
            waiter.fail(SessionClosed(f"session closed before the ack: {error}"))
        self._waiters.clear()
        if emit:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._events_in.send_nowait(StateChanged(State.CLOSED, error))
        self._events_in.close()
        self._ready.set()
        self._changed.set()


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _retry_after(frame: Frame) -> float | None:
    value = frame.get("retry_after")
    return float(value) if _is_number(value) and value >= 0 else None


def _error_details(frame: Frame) -> dict[str, Any]:
    """What an `error` frame tells `decide`: its code, message and retry_after."""
    return {
        "error": str(frame.get("code")),
        "message": str(frame.get("message", "")),
        "retry_after": _retry_after(frame),
    }


# --- opening a session ----------------------------------------------------------------


@asynccontextmanager
async def _open(url: str, intent: _Intent, options: Options | None, saved: SavedState | None) -> AsyncIterator[Session]:
    """Run a session's connection loop for the block; create and join wait until the session exists."""
    session = Session(url, intent, options or Options(), saved)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._run)
            try:
                if saved is None:
                    with trio.fail_after(session.options.open_timeout):
                        await session._ready.wait()
                    if session._credentials is None:
                        raise session.error or SessionClosed("the session closed before it opened")
                yield session
            finally:
                nursery.cancel_scope.cancel()
                session._shut(SessionClosed("closed by the application"), emit=False)
    except BaseExceptionGroup as group:
        # The block's own exception arrives wrapped by the nursery: hand it back as raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def create(url: str, options: Options | None = None) -> AbstractAsyncContextManager[Session]:
    """Create a session on the server at `url` (`ws://host:3001/ws`); entered once it exists (`session.code`)."""
    return _open(url, _Create(), options, None)


def join(url: str, code: str, options: Options | None = None) -> AbstractAsyncContextManager[Session]:
    """Join the session `code` (as typed: see `normalise_code`); entered once joined.

    A code that does not exist raises `RequestFailed` (not_found), one that cannot be
    a code `BadCode`. If the connection drops after the join was sent and before its
    reply, the retry may find the session full (the first join may have taken the place).
    """
    return _open(url, _Join(normalise_code(code)), options, None)


def resume(url: str, saved: Mapping[str, Any], options: Options | None = None) -> AbstractAsyncContextManager[Session]:
    """Carry on with a session from `Session.save()`; entered at once, the resume runs in the background.

    Messages after the saved `last_seq` are delivered again, and the saved
    unacknowledged sends are resent with their `mid` (each is stored once).
    """
    state = SavedState.from_json(saved)
    return _open(url, _Resume(), options, state)
