"""The relay: one `Connection` per client socket, and the `Hub` that routes events.

A connection reads one frame at a time, parses it (protocol.py), runs the
request against the store and queues the reply; a single writer task drains
that bounded queue to the socket. The store reports committed changes to the
hub in commit order, and the hub turns them into frames for the members
connected here. Everything is written against `Socket`, so it runs in-process
in tests without Hypercorn.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import trio

import lifecycle
import logging_setup
import protocol
import tracing
from auth import Authenticator, Identity
from config import Config
from limiter import Limiter, LimitKey, Limits, Pseudonyms, Rule, rate_limited
from protocol import CloseCode, ErrorCode
from session_store import (
    Appended,
    Ended,
    Event,
    Evicted,
    Joined,
    MessageStored,
    Paired,
    PeerLeft,
    PresenceChanged,
    Resumed,
    SessionState,
    SessionStore,
    StoredMessage,
    Takeover,
)

T = TypeVar("T")
log = logging.getLogger("tandem.relay")

# Frames the writer takes off its queue per wake-up: one scheduler round
# sends a burst, and a burst cannot starve the other tasks.
WRITE_BATCH = 64
# Bytes of frames handed to the socket in one write: a burst of small frames
# (a peer's message and this client's ack, say) costs one system call.
WRITE_BYTES = 64 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_code(length: int) -> str:
    return "".join(secrets.choice(protocol.CODE_ALPHABET) for _ in range(length))


def token_hash(token: str) -> bytes:
    # Tokens carry 256 random bits, so a fast hash is as safe as a slow one.
    return hashlib.sha256(token.encode()).digest()


class Written(enum.Enum):
    """What `Socket.write_now` did with the frames."""

    ALL = "all"  # the kernel has them
    PART = "part"  # the kernel has part; the socket holds the rest for its next `send`
    NONE = "none"  # nothing was written (a send in progress, or a socket that cannot): `send` them


class Socket(Protocol):
    """What the relay needs of a WebSocket."""

    async def receive(self) -> str | bytes | None:
        """The next message (text or binary); None once the peer is gone."""
        ...

    async def send(self, texts: list[str]) -> None:
        """These text frames, in order (in one write where the server allows);
        with no frames, what `write_now` held back."""
        ...

    def write_now(self, texts: list[str]) -> Written:
        """Write these frames without waiting, if the socket can take them now."""
        ...

    async def close(self, code: int) -> None: ...


@dataclass
class Services:
    """What a connection's requests use, built once by the server's lifespan."""

    config: Config
    store: SessionStore
    hub: Hub
    limits: Limits
    keys: Pseudonyms  # limiter keys for addresses and codes
    report: lifecycle.Report
    auth: Authenticator | None = None  # None: authentication is off

    @property
    def limiter(self) -> Limiter:
        return self.store.limiter

    def message_limits(self, client_id: str, ip_key: str, user: str | None = None) -> list[LimitKey]:
        """The limits of one `message:send`; with authentication the per-user one counts per `sub`
        (across connections and sessions), else per member (kept beside its session)."""
        limits = []
        if self.limits.messages_user is not None and user is not None:
            limits.append(LimitKey(self.limits.messages_user, self.keys.user(user)))
        elif self.limits.messages_user is not None:
            limits.append(LimitKey(self.limits.messages_user, client_id, per_session=True))
        if self.limits.messages_ip is not None:
            limits.append(LimitKey(self.limits.messages_ip, ip_key))
        return limits


# Requests served before authentication (PROTOCOL.md, Authentication).
_BEFORE_AUTH = (protocol.Hello, protocol.Ping, protocol.Authenticate)


# --- routing store events to connections -------------------------------------


class Hub:
    """This process's open connections, and the members among them by session."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.sessions: dict[str, list[Connection]] = {}
        self.all_closed = trio.Event()
        self.all_closed.set()
        self._unflushed: list[Connection] = []  # connections with frames queued this tick
        self._flusher = trio.lowlevel.ParkingLot()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls) -> AsyncIterator[Hub]:
        """A hub with its flusher running, until the block ends."""
        hub = cls()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run_flusher)
            yield hub
            nursery.cancel_scope.cancel()

    def flush_soon(self, conn: Connection) -> None:
        """`conn` has frames queued and no writer: `run_flusher` writes them this tick."""
        self._unflushed.append(conn)
        if len(self._unflushed) == 1:
            self._flusher.unpark_all()

    async def run_flusher(self) -> None:
        """Writes what every connection queued, once per tick, in one task.

        The frames of a commit's events and replies are queued during the
        commit's dispatch: one wake-up of this task writes them all, straight to
        the sockets, instead of waking a writer task per connection. A socket
        that cannot take them at once gets a writer task of its own.
        """
        while True:
            if not self._unflushed:
                await self._flusher.park()
            unflushed, self._unflushed = self._unflushed, []
            for conn in unflushed:
                try:
                    conn.flush()
                except Exception:  # a bug here must cost one connection, not every connection's output
                    log.exception("connection.flush_failed")
                    conn.close(CloseCode.INTERNAL_ERROR)
            await trio.lowlevel.cancel_shielded_checkpoint()  # a long run of flushes lets others in

    def add(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        self.all_closed = trio.Event()

    def remove(self, conn: Connection) -> None:
        self.detach(conn)
        self.connections.pop(conn.id, None)
        if not self.connections:
            self.all_closed.set()

    def attach(self, conn: Connection, code: str, client_id: str) -> None:
        conn.client_id = client_id
        conn.code = code
        self.sessions.setdefault(code, []).append(conn)

    def detach(self, conn: Connection) -> None:
        if conn.code is None:
            return
        members = self.sessions.get(conn.code)
        if members is not None and conn in members:
            members.remove(conn)
            if not members:
                del self.sessions[conn.code]
        conn.code = conn.client_id = None

    def dispatch(self, event: Event) -> None:
        """Deliver one store event; called in commit order, never blocks."""
        match event:
            case MessageStored(code, m):
                members = self.sessions.get(code)
                if members:
                    text = protocol.serialize(protocol.Message(code, m.seq, m.sender, m.data, m.ts, m.mid))
                    for conn in tuple(members):
                        if conn.client_id != m.sender:
                            conn.deliver(text, m.seq)
            case Paired(code, clients):
                self._tell(code, protocol.SessionPaired(code, clients))
                for conn in self.sessions.get(code, ()):
                    conn.peers = {m.client_id: m.online for m in clients if m.client_id != conn.client_id}
            case PresenceChanged(code, client_id, online):
                self._tell(code, protocol.Presence(client_id, online), client_id)
                for conn in self.sessions.get(code, ()):
                    if conn.client_id != client_id:
                        conn.peers[client_id] = online
            case PeerLeft(code, client_id):
                self._tell(code, protocol.PeerLeft(client_id), client_id)
                for conn in self.sessions.get(code, ()):
                    conn.peers.pop(client_id, None)
            case SessionState(code, clients, holders):
                for conn in tuple(self.sessions.get(code, ())):
                    if conn.held is not None:
                        continue  # a join or resume in flight: its reply will tell it the state
                    if conn.client_id is not None and holders.get(conn.client_id) != conn.id:
                        self.detach(conn)  # taken over elsewhere, or gone: as a Takeover
                        conn.close(CloseCode.NORMAL)
                    else:
                        conn.catch_up(code, clients)
            case Takeover(code, client_id, conn_id):
                previous = self.connections.get(conn_id)
                if previous is not None and previous.code == code and previous.client_id == client_id:
                    self.detach(previous)
                    previous.close(CloseCode.NORMAL)
            case Ended(code, reason):
                notice = None if reason is None else protocol.serialize(protocol.SessionExpired(code, reason))
                for conn in self.sessions.pop(code, []):
                    conn.end_session(notice)
            case Evicted():
                self.close_all(CloseCode.SERVICE_RESTART)

    def _tell(self, code: str, frame: protocol.ServerFrame, exclude: str | None = None) -> None:
        members = self.sessions.get(code)
        if members:
            text = protocol.serialize(frame)
            for conn in tuple(members):
                if conn.client_id != exclude:
                    conn.deliver(text, 0)

    def close_all(self, code: CloseCode) -> None:
        for conn in tuple(self.connections.values()):
            conn.close(code)


# --- one WebSocket --------------------------------------------------------------


class Connection:
    """A client socket: this task reads and handles, one writer task sends.

    Frames for the client go through `deliver`/`push` into a bounded queue; a
    client that lets it fill (in frames or bytes) is closed with 1013.
    While a join or resume is in flight events wait in `held`, so that the
    direct reply goes out first. With authentication on, only `hello`, `ping`
    and `auth` are served until a token is verified (`identity`); a socket
    without one after AUTH_TIMEOUT, or whose token expired, is closed with 1008.
    """

    __slots__ = (
        "_auth_deadline",
        "_code",
        "_flush_pending",
        "_idle_before_hold",
        "_idle_deadline",
        "_nursery",
        "_output_closed",
        "_queue",
        "_queued_bytes",
        "_read_scope",
        "_receive_scope",
        "_writer_scope",
        "_writing",
        "client_id",
        "close_code",
        "config",
        "delivered_seq",
        "held",
        "id",
        "identity",
        "ip",
        "ip_key",
        "messages_in",
        "messages_out",
        "peer_gone",
        "peers",
        "services",
        "site_key",
        "socket",
        "store",
    )

    def __init__(
        self,
        socket: Socket,
        services: Services,
        ip: str | None,
        ip_key: str,
        site_key: str,
        identity: Identity | None = None,
    ) -> None:
        self.socket = socket
        self.services = services
        self.config = services.config
        self.store = services.store
        self.ip = ip  # for the log (hashed there), never stored
        self.ip_key = ip_key  # the client address as limiter key (a hash; IPv6: its /64)
        self.site_key = site_key  # the same for guessing failures (IPv6: its /48)
        self.id = secrets.token_urlsafe(9)
        self._code: str | None = None
        self.client_id: str | None = None
        self.delivered_seq = 0  # newest message seq queued to this client
        self.peers: dict[str, bool] = {}  # the other members as this client knows them: online
        self.held: list[tuple[str, int, bool]] | None = None  # (text, seq, ends session)
        self.close_code: CloseCode | None = None
        self.peer_gone = False
        self.messages_in = 0
        self.messages_out = 0
        self._idle_deadline = math.inf  # when a socket in no session is closed
        self._idle_before_hold = math.inf  # the deadline a failed join or resume restores
        self._receive_scope: trio.CancelScope | None = None  # the reader's wait for a frame
        self.identity: Identity | None = None  # the verified token (authentication on)
        self._auth_deadline = math.inf  # when the socket must (again) hold a valid token
        if services.auth is not None:
            self._auth_deadline = trio.current_time() + self.config.auth_timeout
            if identity is not None:  # verified on the upgrade (Authorization header)
                self._set_identity(identity)
        self._queue: list[str] = []  # frames for the client, oldest first (a list: 56 bytes while empty)
        self._queued_bytes = 0  # their characters, frames being sent included
        self._output_closed = False  # the reader is done: nothing more is queued
        self._flush_pending = False  # in the hub's list for this tick
        self._writing = False  # a writer (task, or the final drain) owns the socket's sends
        self._writer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._read_scope = trio.CancelScope()

    @property
    def code(self) -> str | None:
        return self._code

    @code.setter
    def code(self, code: str | None) -> None:
        """Joining or leaving a session here. Out of one, the socket may idle
        only so long; leaving one, its events are no longer needed here."""
        previous, self._code = self._code, code
        if code != previous:
            self.delivered_seq = 0  # seqs count per session
            self.peers = {}
        if code is None and previous is not None:
            self.store.unwatch(previous)
            self._idle_deadline = trio.current_time() + self.config.idle_socket_timeout
        elif code is not None:
            self._idle_deadline = math.inf
        if self._receive_scope is not None:
            self._receive_scope.deadline = self._deadline()

    def _deadline(self) -> float:
        """When the reader stops waiting: the socket idled out of a session, or its token lapsed."""
        return min(self._idle_deadline, self._auth_deadline)

    def _set_identity(self, identity: Identity) -> None:
        assert self.services.auth is not None
        self.identity = identity
        self._auth_deadline = trio.current_time() + self.services.auth.remaining(identity)

    @property
    def user(self) -> str | None:
        """The verified `sub`, recorded with the sessions this connection creates, joins or resumes."""
        return None if self.identity is None else self.identity.user

    # -- called from anywhere; none of these blocks --

    def push(self, text: str) -> None:
        """Queue one frame for the client, or close it if it can't keep up.

        A connection asked to close still queues (the reply to the request in
        hand, events until its reader stops); the writer sends all of it before
        the close frame, except after 1013, when the queue is dropped.
        """
        if self.close_code == CloseCode.TRY_AGAIN_LATER or self._output_closed:
            return  # too slow (what was queued is dropped), or the reader is done: nothing more goes out
        self._queued_bytes += len(text)
        if self._queued_bytes > self.config.send_queue_bytes or len(self._queue) >= self.config.send_queue_frames:
            self.close(CloseCode.TRY_AGAIN_LATER)
            return
        self._queue.append(text)
        if not self._writing and not self._flush_pending:
            self._flush_pending = True
            self.services.hub.flush_soon(self)

    def flush(self) -> None:
        """Called by the hub's flusher: write what is queued straight to the socket,
        or, if it cannot take it all now, start a writer task that waits for it."""
        self._flush_pending = False
        if self._writing or not self._queue or self._nursery is None:
            return
        texts, size = self._peek()
        written = self.socket.write_now(texts)
        if written is not Written.NONE:
            self._pop(len(texts))
            self._sent(len(texts), size)
        if written is not Written.ALL or self._queue:
            self._writing = True
            self._writer_scope = trio.CancelScope()
            self._nursery.start_soon(self._writer, self._writer_scope)

    def deliver(self, text: str, seq: int) -> None:
        """An event's frame; `seq` for a message (sent at most once), else 0."""
        if seq and seq <= self.delivered_seq:
            return  # already sent: history replay and live events overlap
        if self.held is not None:
            if len(self.held) >= self.config.send_queue_frames:
                self.close(CloseCode.TRY_AGAIN_LATER)
            self.held.append((text, seq, False))
            return
        if seq:
            self.delivered_seq = seq
        self.push(text)

    def catch_up(self, code: str, clients: tuple[protocol.Member, ...]) -> None:
        """Tell this client what changed in its session while events were lost:
        a peer that joined (paired), left, or went on- or offline."""
        now = {m.client_id: m.online for m in clients if m.client_id != self.client_id}
        if now.keys() - self.peers.keys():
            self.deliver(protocol.serialize(protocol.SessionPaired(code, clients)), 0)
        for client_id in self.peers.keys() - now.keys():
            self.deliver(protocol.serialize(protocol.PeerLeft(client_id)), 0)
        for client_id in self.peers.keys() & now.keys():
            if self.peers[client_id] != now[client_id]:
                self.deliver(protocol.serialize(protocol.Presence(client_id, now[client_id])), 0)
        self.peers = now

    def end_session(self, text: str | None) -> None:
        """The session ended: send `text` (if any); the socket stays open."""
        if self.held is not None and text is not None:
            self.held.append((text, 0, True))
            return
        if text is not None:
            self.push(text)
        self.code = self.client_id = None

    def close(self, code: CloseCode) -> None:
        """Ask this connection to close with `code` once its current request is done."""
        if self.close_code is not None:
            return
        self.close_code = code
        self._read_scope.cancel()
        if code == CloseCode.TRY_AGAIN_LATER:  # too slow: drop what is queued
            if self._writer_scope is not None:
                self._writer_scope.cancel()
            self._queue.clear()
            self._queued_bytes = 0

    # -- the connection's own tasks --

    async def run(self) -> None:
        hub, report = self.services.hub, self.services.report
        hub.add(self)
        opened = time.monotonic()
        bound = logging_setup.bind(self)  # `conn` and `session` on every line this connection's work logs
        report(lifecycle.ConnectionOpened(self.id, self.ip))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery  # where `flush` starts a writer task
                try:
                    await self._reader()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._leave_hub()
                    self._output_closed = True
            self._nursery = None
            # A writer task has finished (the nursery waited for it): what is left goes out from here.
            await self._finish()
        finally:
            hub.remove(self)
            code = int(self.close_code or 1006)
            duration = time.monotonic() - opened
            report(lifecycle.ConnectionClosed(self.id, code, duration, self.messages_in, self.messages_out))
            logging_setup.unbind(bound)

    async def _leave_hub(self) -> None:
        code, client_id = self.code, self.client_id
        self.services.hub.detach(self)
        if code is not None and client_id is not None:
            # If the store is down the member stays online until it expires.
            with contextlib.suppress(protocol.TandemError):
                await self.store.disconnect(code, client_id, self.id, now_ms())

    async def _reader(self) -> None:
        max_bytes = self.config.max_message_bytes
        errors_in_row = 0
        self._idle_deadline = trio.current_time() + self.config.idle_socket_timeout
        with self._read_scope:
            while self.close_code is None:
                received: str | bytes | None = None
                with trio.CancelScope(deadline=self._deadline()) as self._receive_scope:
                    received = await self.socket.receive()
                idle = self._receive_scope.cancelled_caught
                self._receive_scope = None
                if trio.current_time() >= self._auth_deadline:  # checked before any frame it would let in
                    self._auth_lapsed()
                    return
                if idle:  # in no session for IDLE_SOCKET_TIMEOUT
                    self.services.report(lifecycle.ConnectionIdle(self.id))
                    self.close(CloseCode.NORMAL)
                    return
                if received is None:
                    self.peer_gone = True
                    return
                request: protocol.Request | None = None
                try:
                    if not isinstance(received, str):
                        protocol.reject_binary()
                    request = protocol.parse_request(received, max_bytes)
                    with trio.CancelScope(shield=True):  # a request runs to its reply
                        if tracing.tracer is None:
                            await self._handle(request)
                        else:  # in a span (tracing.py)
                            await tracing.tracer.request(self, request, self._handle)
                    if not isinstance(request, protocol.Ping | protocol.Hello):  # nor do these between failures
                        errors_in_row = 0
                except protocol.FrameRejected as exc:
                    self.close(exc.close_code)
                except protocol.TandemError as exc:
                    self.services.report(lifecycle.RequestFailed(exc))
                    self.push(protocol.serialize(protocol.error_frame(exc, request.id if request else None)))
                    if isinstance(exc, protocol.ClientError):
                        errors_in_row += 1
                        if errors_in_row >= self.config.max_consecutive_errors:
                            self.close(CloseCode.POLICY_VIOLATION)

    def _auth_lapsed(self) -> None:
        """No valid token (any more): `error` `unauthorized`, then close with 1008."""
        if self.identity is None:
            error = protocol.AuthError(f"not authenticated within AUTH_TIMEOUT ({self.config.auth_timeout:g} s)")
        else:
            error = protocol.AuthError("token expired")
        self.services.report(lifecycle.RequestFailed(error))
        self.push(protocol.serialize(protocol.error_frame(error, None)))
        self.close(CloseCode.POLICY_VIOLATION)

    def _peek(self) -> tuple[list[str], int]:
        """The oldest queued frames, up to WRITE_BATCH of them and about WRITE_BYTES."""
        texts: list[str] = []
        size = 0
        for text in self._queue:
            if len(texts) == WRITE_BATCH or (texts and size + len(text) > WRITE_BYTES):
                break
            texts.append(text)
            size += len(text)
        return texts, size

    def _pop(self, count: int) -> None:
        del self._queue[:count]

    def _sent(self, count: int, size: int) -> None:
        self._queued_bytes -= size
        self.messages_out += count

    async def _writer(self, scope: trio.CancelScope) -> None:
        """Sends what is queued, and what the socket held back, until nothing is left."""
        try:
            with scope:
                await self._drain()
        finally:
            self._writer_scope = None
            self._writing = False

    async def _drain(self) -> None:
        await self.socket.send([])  # the tail that `write_now` left, if any
        while self._queue:
            texts, size = self._peek()
            self._pop(len(texts))  # in hand: the queue's bound counts the frames still waiting
            await self.socket.send(texts)
            self._sent(len(texts), size)

    async def _finish(self) -> None:
        """After the reader: send what is still queued, then the close frame."""
        self._writing = True
        if self.close_code != CloseCode.TRY_AGAIN_LATER:
            await self._drain()
        if not self.peer_gone:
            # A peer that reads nothing can hold this send; Hypercorn's
            # read_timeout ends the socket then, and with it this wait.
            with trio.move_on_after(self.config.shutdown_grace):
                await self.socket.close(int(self.close_code or CloseCode.NORMAL))

    # -- requests --

    async def _handle(self, request: protocol.Request) -> None:
        if self.services.auth is not None and self.identity is None and not isinstance(request, _BEFORE_AUTH):
            raise protocol.AuthError("authenticate first (auth)")
        match request:
            case protocol.SendMessage():
                await self._send_message(request)
            case protocol.Ping():
                self.push(protocol.serialize(protocol.Pong(request.id, now_ms())))
            case protocol.CreateSession():
                await self._create(request)
            case protocol.JoinSession():
                await self._join(request)
            case protocol.ResumeSession():
                await self._resume(request)
            case protocol.LeaveSession():
                await self._leave(request)
            case protocol.Hello():
                self._welcome(request)
            case protocol.Authenticate():
                await self._authenticate(request)

    def _welcome(self, request: protocol.Hello) -> None:
        config = self.config
        limits = protocol.Limits(
            config.max_message_bytes, config.history_size, config.session_idle_timeout, config.session_ttl
        )
        mode = "none" if self.services.auth is None else "required"
        self.push(protocol.serialize(protocol.Welcome(request.id, mode, limits, now_ms(), config.motd or None)))

    async def _authenticate(self, request: protocol.Authenticate) -> None:
        """A first token, or a fresh one for the same `sub`; on any failure the previous one stands."""
        authenticator = self.services.auth
        if authenticator is None:
            raise protocol.ClientError("authentication is off on this server", ErrorCode.BAD_REQUEST)
        identity = await authenticator.verify(request.token)
        if self.identity is not None and identity.user != self.identity.user:
            raise protocol.AuthError("the token is for another user (sub)")
        self._set_identity(identity)
        self.push(protocol.serialize(protocol.AuthOk(request.id, identity.user, identity.expires_at)))

    def _require_no_session(self) -> None:
        if self.code is not None:
            raise protocol.ClientError("this connection is already in a session", ErrorCode.ALREADY_IN_SESSION)

    def _membership(self) -> tuple[str, str]:
        if self.code is None or self.client_id is None:
            raise protocol.ClientError("this connection is not in a session", ErrorCode.NOT_IN_SESSION)
        return self.code, self.client_id

    async def _send_message(self, request: protocol.SendMessage) -> None:
        started = time.perf_counter()
        code, client_id = self._membership()
        limits = self.services.message_limits(client_id, self.ip_key, self.user)
        now = now_ms()
        # The ack is queued at commit, beside the peer's events of the same batch:
        # both go out in one write, and this task wakes only to read on.
        acked = partial(self._acked, request.id)
        appended = await self.store.append(code, client_id, self.id, request.data, now, limits, request.mid, acked)
        self.messages_in += 1
        if not appended.duplicate:
            seconds = time.perf_counter() - started
            self.services.report(lifecycle.MessageAcked(code, appended.seq, client_id, request.data, now, seconds))

    def _acked(self, request_id: protocol.RequestId, appended: Appended) -> None:
        self.push(protocol.serialize(protocol.MessageAck(request_id, appended.seq, appended.duplicate)))

    async def _create(self, request: protocol.CreateSession) -> None:
        self._require_no_session()
        client_id, token = secrets.token_urlsafe(9), secrets.token_urlsafe(32)
        created = await self.store.create(
            partial(new_code, self.config.code_length), client_id, token_hash(token), self.id, now_ms(), self.user
        )
        self.services.hub.attach(self, created.code, client_id)
        try:
            await self.store.watch(created.code)  # before anyone can know the code
        except BaseException:
            self.services.hub.detach(self)
            raise
        reply = protocol.SessionCreated(request.id, created.code, client_id, token, created.expires_at)
        self.push(protocol.serialize(reply))
        self.services.report(lifecycle.SessionCreated(created.code, self.id))

    async def _attempt(self, kind: str, code: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run a join or resume, the requests a code guesser makes, under the
        failure limits: per address, and for joins per code.

        Each limit counts the attempt before it runs, in the check's own atomic
        step, and is refunded when the attempt succeeds (or fails through no
        fault of the client's): concurrent guesses cannot all pass one check.
        A resume is never refused for its code's failures, so a guesser who
        knows a code cannot lock its members out; its failures count there.
        """
        services, limiter = self.services, self.services.limiter
        code_rule, code_key = services.limits.code_failures, services.keys.code(code)
        counted: list[tuple[Rule, str, float]] = []
        rules = [(services.limits.join_failures_ip, self.site_key)]
        if kind == "join":
            rules.append((code_rule, code_key))
        for rule, key in rules:
            if rule is None:
                continue
            decision = await limiter.hit(rule, key)
            if not decision.allowed:
                raise rate_limited(rule.name, decision.retry_after)
            counted.append((rule, key, decision.stamp))
        refund = True
        try:
            return await attempt()
        except protocol.TandemError as exc:
            services.report(lifecycle.AttemptFailed(kind, code, str(exc.code)))
            if isinstance(exc, protocol.ClientError):
                refund = False
                if kind == "resume" and code_rule is not None:
                    with trio.CancelScope(shield=True):
                        await limiter.record(code_rule, code_key)
            raise
        finally:
            if refund:
                with trio.CancelScope(shield=True):
                    for rule, key, stamp in counted:
                        await limiter.refund(rule, key, stamp)

    def _hold(self, code: str, client_id: str) -> None:
        """Become a member before the store says so, holding its events back."""
        self.held = []
        self._idle_before_hold = self._idle_deadline
        self.services.hub.attach(self, code, client_id)

    def _unhold(self) -> None:
        """The join or resume failed: out again, and a failure buys no idle time."""
        self.held = None
        self.services.hub.detach(self)
        self._idle_deadline = self._idle_before_hold
        if self._receive_scope is not None:
            self._receive_scope.deadline = self._deadline()

    async def _join(self, request: protocol.JoinSession) -> None:
        self._require_no_session()
        code, client_id, token = request.code, secrets.token_urlsafe(9), secrets.token_urlsafe(32)

        async def join() -> Joined:
            self._hold(code, client_id)
            try:
                await self.store.watch(code)
                return await self.store.join(code, client_id, token_hash(token), self.id, now_ms(), self.user)
            except BaseException:
                self._unhold()
                raise

        joined = await self._attempt("join", code, join)
        reply = protocol.SessionJoined(request.id, code, client_id, token, joined.clients, joined.last_seq)
        self._know(joined.clients)
        self._release(code, reply, joined.backlog, joined.last_seq)
        if len(joined.clients) == 2:
            self.services.report(lifecycle.SessionPaired(code, self.id))

    async def _resume(self, request: protocol.ResumeSession) -> None:
        self._require_no_session()
        code, client_id = request.code, request.client_id

        async def resume() -> Resumed:
            self._hold(code, client_id)
            try:
                await self.store.watch(code)
                return await self.store.resume(
                    code, client_id, token_hash(request.token), self.id, request.last_seq, now_ms(), self.user
                )
            except BaseException:
                self._unhold()
                raise

        resumed = await self._attempt("resume", code, resume)
        self.services.report(lifecycle.SessionResumed(code, resumed.recovered))
        reply = protocol.SessionResumed(
            request.id, code, client_id, resumed.clients, resumed.last_seq, resumed.recovered
        )
        self._know(resumed.clients)
        self._release(code, reply, resumed.replay, resumed.last_seq)

    def _know(self, clients: tuple[protocol.Member, ...]) -> None:
        """The members a reply tells this client of; events held meanwhile are newer and stay."""
        for m in clients:
            if m.client_id != self.client_id:
                self.peers.setdefault(m.client_id, m.online)

    def _release(
        self, code: str, reply: protocol.ServerFrame, history: tuple[StoredMessage, ...], last_seq: int
    ) -> None:
        """Send the reply, then the stored messages, then the events held meanwhile."""
        held, self.held = self.held or [], None
        self.push(protocol.serialize(reply))
        for stored in history:
            message = protocol.Message(code, stored.seq, stored.sender, stored.data, stored.ts, stored.mid)
            self.push(protocol.serialize(message))
        self.delivered_seq = max(self.delivered_seq, last_seq)
        for text, seq, ends in held:
            if ends:
                self.end_session(text)
            else:
                self.deliver(text, seq)

    async def _leave(self, request: protocol.LeaveSession) -> None:
        code, client_id = self._membership()
        ended = await self.store.leave(code, client_id, self.id, now_ms())
        self.services.hub.detach(self)
        self.push(protocol.serialize(protocol.SessionLeft(request.id, code)))
        self.services.report(lifecycle.MemberLeft(code, self.id, ended))
