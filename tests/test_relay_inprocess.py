"""The relay core in-process: `Connection`s on fake sockets, no server process.

Each test drives `relay.Connection`s through `FakeSocket`s (frames in on a
bounded memory channel, frames out recorded, the close code kept) and checks
what a client would see: the frames it receives, in order, and how its socket
is closed. Most run on `FakeStore`, an in-memory `SessionStore` that reports
its events to the hub as a real store does and whose operations a test can
hold (`Gate`) or fail; they run on trio's MockClock (`autojump_clock`), so
timeouts are exact and a frame that never comes fails the test at once. The
GroupCommit tests and the two end-to-end tests on the real SqliteStore use
worker threads, hence trio's real clock.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

import config
import session_store
from config import Config
from lifecycle import ConnectionClosed, ConnectionIdle, LifecycleEvent
from limiter import IPV6_SITE, LimitKey, Limits, MemoryLimiter, Pseudonyms, Rule, rate_limited
from protocol import ClientError, ErrorCode, Member, ServerError, TandemError
from relay import Connection, Hub, Services, Written
from session_store import (
    MAX_MEMBERS,
    Appended,
    Created,
    Dispatch,
    Ended,
    Event,
    GroupCommit,
    Joined,
    MessageStored,
    Op,
    Paired,
    PeerLeft,
    PresenceChanged,
    Resumed,
    SessionStore,
    StoredMessage,
    Takeover,
    no_such_member,
    not_found,
    session_full,
)
from sqlite_store import SqliteStore

Frame = dict[str, Any]

# How long a test waits for a frame or a close (virtual seconds under MockClock).
RECV_TIMEOUT = 5.0
# A whole test on worker threads (GroupCommit, SqliteStore), real seconds.
THREADED_TIMEOUT = 10.0
CONFIG = dataclasses.replace(config.DEFAULTS, shutdown_grace=1.0)
UNKNOWN_CODE = "ZZZZZZZZ"  # well-formed, never created (FakeStore codes come from relay.new_code)
HOST_IP = "198.51.100.1"
GUEST_IP = "203.0.113.7"


# --- fakes ---------------------------------------------------------------------------


class FakeSocket:
    """An in-memory `relay.Socket`: the test writes frames in and reads frames out.

    `stop_reading()` makes `send` wait until `start_reading()`: a client that stopped reading.
    """

    def __init__(self) -> None:
        self.incoming, self._incoming = trio.open_memory_channel[str | bytes](16)
        self._outgoing, self.outgoing = trio.open_memory_channel[str](float("inf"))
        self.sent: list[str] = []
        self._reading = trio.Event()
        self._reading.set()
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.closed = trio.Event()

    async def receive(self) -> str | bytes | None:
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            return None  # the test hung up

    def stop_reading(self) -> None:
        if self._reading.is_set():
            self._reading = trio.Event()

    def start_reading(self) -> None:
        self._reading.set()

    async def send(self, texts: list[str]) -> None:
        for text in texts:
            await self._reading.wait()
            self.sent.append(text)
            self._outgoing.send_nowait(text)

    def write_now(self, texts: list[str]) -> Written:
        if not self._reading.is_set():
            return Written.NONE  # a client that stopped reading: its socket takes nothing now
        for text in texts:
            self.sent.append(text)
            self._outgoing.send_nowait(text)
        return Written.ALL

    async def close(self, code: int) -> None:
        assert self.close_code is None, "closed twice"
        self.close_code = code
        self.closed_at = trio.current_time()
        self.closed.set()

    def pending(self) -> list[Frame]:
        """The frames sent that the test has not read yet."""
        frames = []
        while True:
            try:
                frames.append(orjson.loads(self.outgoing.receive_nowait()))
            except trio.WouldBlock:
                return frames


class Gate:
    """Holds a store operation until the test opens it."""

    def __init__(self) -> None:
        self.reached = trio.Event()
        self.waiting = 0
        self._opened = trio.Event()

    async def wait(self) -> None:
        self.waiting += 1
        self.reached.set()
        try:
            await self._opened.wait()
        finally:
            self.waiting -= 1

    def open(self) -> None:
        self._opened.set()


@dataclass
class FakeMember:
    token_hash: bytes
    conn_id: str | None  # None: offline


@dataclass
class FakeSession:
    members: dict[str, FakeMember] = field(default_factory=dict)  # in join order
    messages: list[StoredMessage] = field(default_factory=list)
    last_seq: int = 0


class FakeStore(SessionStore):
    """Sessions in a dict, with the semantics of SqliteStore (no expiry, no trimming).

    Each operation commits and reports its events to `dispatch` before its
    caller wakes, as GroupCommit does. A test can hold an operation at its
    start (`gates[op]`), make its next call fail (`fail[op]`, after the gate),
    or run something right after its commit (`after_commit[op]`: another
    batch committing before the caller wakes).
    """

    backend = "fake"

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.limiter: MemoryLimiter = MemoryLimiter(clock=trio.current_time)  # MockClock-driven
        self.sessions: dict[str, FakeSession] = {}
        self.gates: dict[str, Gate] = {}
        self.fail: dict[str, TandemError] = {}
        self.after_commit: dict[str, Callable[[], object]] = {}

    async def _enter(self, op: str) -> None:
        await trio.lowlevel.checkpoint()  # a store call always yields
        gate = self.gates.get(op)
        if gate is not None:
            await gate.wait()
        error = self.fail.pop(op, None)
        if error is not None:
            raise error

    def _commit(self, op: str, events: Sequence[Event]) -> None:
        for event in events:
            self.dispatch(event)
        hook = self.after_commit.pop(op, None)
        if hook is not None:
            hook()

    def _live(self, code: str) -> FakeSession:
        session = self.sessions.get(code)
        if session is None:
            raise not_found()
        return session

    @staticmethod
    def _clients(session: FakeSession) -> tuple[Member, ...]:
        return tuple(Member(cid, m.conn_id is not None) for cid, m in session.members.items())

    def commit_message(self, code: str, sender: str, data: bytes, now: int = 0) -> StoredMessage:
        """Store a message and report it (what an append's commit does)."""
        session = self._live(code)
        session.last_seq += 1
        message = StoredMessage(session.last_seq, sender, data, now)
        session.messages.append(message)
        self.dispatch(MessageStored(code, message))
        return message

    async def create(
        self,
        new_code: Callable[[], str],
        client_id: str,
        token_hash: bytes,
        conn_id: str,
        now: int,
        user: str | None = None,
    ) -> Created:
        await self._enter("create")
        code = new_code()
        assert code not in self.sessions
        self.sessions[code] = FakeSession({client_id: FakeMember(token_hash, conn_id)})
        self._commit("create", [])
        return Created(code, now + 1_800_000)

    async def join(
        self, code: str, client_id: str, token_hash: bytes, conn_id: str, now: int, user: str | None = None
    ) -> Joined:
        await self._enter("join")
        session = self._live(code)
        if len(session.members) >= MAX_MEMBERS:
            raise session_full()
        session.members[client_id] = FakeMember(token_hash, conn_id)
        clients = self._clients(session)
        joined = Joined(clients, session.last_seq, tuple(session.messages))
        self._commit("join", [Paired(code, clients)] if len(clients) == MAX_MEMBERS else [])
        return joined

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
        await self._enter("resume")
        session = self.sessions.get(code)
        member = None if session is None else session.members.get(client_id)
        if session is None or member is None or not hmac.compare_digest(member.token_hash, token_hash):
            raise no_such_member()
        previous, member.conn_id = member.conn_id, conn_id
        events: list[Event] = []
        if previous is not None and previous != conn_id:
            events.append(Takeover(code, client_id, previous))
        events.append(PresenceChanged(code, client_id, True))
        replay = tuple(m for m in session.messages if m.seq > last_seq and m.sender != client_id)
        resumed = Resumed(self._clients(session), session.last_seq, True, replay)
        self._commit("resume", events)
        return resumed

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
        await self._enter("append")
        refused = self.limiter.hit_all(limits)
        if refused is not None:
            raise rate_limited(refused.rule, refused.decision.retry_after)
        member = self._live(code).members.get(client_id)
        if member is None or member.conn_id != conn_id:
            raise not_found()
        seq = self.commit_message(code, client_id, data, now).seq
        self._commit("append", [])
        appended = Appended(seq, duplicate=False)
        if acked is not None:
            acked(appended)
        return appended

    async def leave(self, code: str, client_id: str, conn_id: str, now: int) -> bool:
        await self._enter("leave")
        session = self.sessions.get(code)
        member = None if session is None else session.members.get(client_id)
        if session is None or member is None or member.conn_id != conn_id:
            raise ClientError("not a member of that session", ErrorCode.NOT_IN_SESSION)
        del session.members[client_id]
        if not session.members:
            del self.sessions[code]
            self._commit("leave", [Ended(code, None)])
            return True
        self._commit("leave", [PeerLeft(code, client_id)])
        return False

    async def disconnect(self, code: str, client_id: str, conn_id: str, now: int) -> None:
        await self._enter("disconnect")
        session = self.sessions.get(code)
        member = None if session is None else session.members.get(client_id)
        if member is not None and member.conn_id == conn_id:
            member.conn_id = None
            self._commit("disconnect", [PresenceChanged(code, client_id, False)])

    async def sweep(self, now: int) -> list[tuple[str, str]]:
        return []

    async def check(self) -> None:
        await self._enter("check")

    async def watch(self, code: str) -> None:
        await trio.lowlevel.checkpoint()

    def unwatch(self, code: str) -> None:
        pass


# --- clients and the relay under test ------------------------------------------------


class Client:
    """One client: its fake socket, the relay's Connection for it, and its membership."""

    def __init__(self, socket: FakeSocket, conn: Connection) -> None:
        self.socket = socket
        self.conn = conn
        self.code = ""
        self.client_id = ""
        self.token = ""
        self.finished = trio.Event()  # its Connection.run returned
        self._ids = itertools.count(1)

    async def send(self, frame: Frame) -> None:
        await self.socket.incoming.send(orjson.dumps(frame).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.socket.incoming.send(data)

    async def recv(self) -> Frame:
        with trio.fail_after(RECV_TIMEOUT):
            frame: Frame = orjson.loads(await self.socket.outgoing.receive())
        return frame

    async def expect(self, kind: str) -> Frame:
        frame = await self.recv()
        assert frame["type"] == kind, frame
        return frame

    async def request(self, kind: str, **fields: Any) -> Frame:
        """Send a request with a fresh id; its reply must be the next frame."""
        rid = next(self._ids)
        await self.send({"type": kind, "id": rid, **fields})
        reply = await self.recv()
        assert reply.get("id") == rid, reply
        return reply

    async def error(self, kind: str, **fields: Any) -> Frame:
        reply = await self.request(kind, **fields)
        assert reply["type"] == "error", reply
        return reply

    def member(self, reply: Frame) -> Frame:
        """Keep the membership a `session:created`/`joined`/`resumed` reply gave."""
        assert reply["type"] in ("session:created", "session:joined", "session:resumed"), reply
        self.code, self.client_id = reply["code"], reply["client_id"]
        self.token = reply.get("token", self.token)
        return reply

    async def create(self) -> Frame:
        return self.member(await self.request("session:create"))

    async def join(self, code: str) -> Frame:
        return self.member(await self.request("session:join", code=code))

    async def resume(self, old: Client, last_seq: int = 0, token: str | None = None) -> Frame:
        """Resume `old`'s membership on this connection (with another `token`, if given)."""
        token = old.token if token is None else token
        reply = await self.request(
            "session:resume", code=old.code, client_id=old.client_id, token=token, last_seq=last_seq
        )
        if reply["type"] == "session:resumed":
            self.token = token
            self.member(reply)
        return reply

    def hang_up(self) -> None:
        self.socket.incoming.close()

    async def closed(self, within: float = RECV_TIMEOUT) -> int:
        with trio.fail_after(within):
            await self.socket.closed.wait()
        assert self.socket.close_code is not None
        return self.socket.close_code

    def messages_sent(self) -> list[Frame]:
        """Every `message` frame this client's socket was sent."""
        return [f for f in map(orjson.loads, self.socket.sent) if f["type"] == "message"]


class Relay:
    """A Hub, a store and Connections on fake sockets, run in one nursery."""

    def __init__(self, services: Services, nursery: trio.Nursery, reports: list[LifecycleEvent]) -> None:
        self.services = services
        self.hub = services.hub
        self.nursery = nursery
        self.reports = reports  # what the relay reported (lifecycle.py), in order
        self.clients: list[Client] = []

    @property
    def fake(self) -> FakeStore:
        assert isinstance(self.services.store, FakeStore)
        return self.services.store

    async def connect(self, ip: str = HOST_IP) -> Client:
        socket = FakeSocket()
        keys = self.services.keys
        conn = Connection(socket, self.services, ip, keys.address(ip), keys.address(ip, IPV6_SITE))
        client = Client(socket, conn)
        self.clients.append(client)
        self.nursery.start_soon(self._run, client)
        while conn.id not in self.hub.connections:
            await trio.lowlevel.checkpoint()
        return client

    @staticmethod
    async def _run(client: Client) -> None:
        try:
            await client.conn.run()
        finally:
            client.finished.set()

    async def settle(self) -> None:
        """Let every store operation queued so far commit and every frame reach its socket."""
        await self.services.store.check()
        await wait_all_tasks_blocked()

    async def nothing(self, *clients: Client) -> None:
        """Assert that none of `clients` has an unread frame, once everything settled."""
        await self.settle()
        for client in clients:
            assert client.socket.pending() == []

    async def gone(self, client: Client) -> None:
        """Wait until `client`'s connection has finished (left the hub)."""
        with trio.fail_after(RECV_TIMEOUT):
            await client.finished.wait()
        assert client.conn.id not in self.hub.connections

    def unblock(self) -> None:
        if isinstance(self.services.store, FakeStore):
            for gate in self.services.store.gates.values():
                gate.open()
        for client in self.clients:
            client.socket.start_reading()

    async def close(self) -> None:
        self.unblock()
        for client in self.clients:
            client.hang_up()
        with trio.move_on_after(RECV_TIMEOUT):
            await self.hub.all_closed.wait()


@asynccontextmanager
async def run_relay(store: SessionStore, hub: Hub, cfg: Config, limits: Limits | None) -> AsyncIterator[Relay]:
    async with trio.open_nursery() as nursery:
        reports: list[LifecycleEvent] = []
        services = Services(cfg, store, hub, limits or Limits(), Pseudonyms(b"k" * 32), reports.append)
        relay = Relay(services, nursery, reports)
        try:
            yield relay
            await relay.close()
        finally:
            relay.unblock()  # a test that failed may have left an operation held
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_fake_relay(cfg: Config = CONFIG, limits: Limits | None = None) -> AsyncIterator[Relay]:
    async with Hub.open() as hub, run_relay(FakeStore(hub.dispatch), hub, cfg, limits) as relay:
        yield relay


@asynccontextmanager
async def open_sqlite_relay(data_dir: Path) -> AsyncIterator[Relay]:
    with trio.fail_after(THREADED_TIMEOUT):
        async with (
            Hub.open() as hub,
            SqliteStore.open(
                data_dir, hub.dispatch, history_size=100, idle_ms=1_800_000, ttl_ms=86_400_000, synchronous="NORMAL"
            ) as store,
            run_relay(store, hub, CONFIG, None) as relay,
        ):
            yield relay


async def pair(relay: Relay, guest_ip: str = GUEST_IP) -> tuple[Client, Client]:
    """A creates a session, B joins it; both have read `session:paired`."""
    a = await relay.connect(HOST_IP)
    b = await relay.connect(guest_ip)
    await a.create()
    await b.join(a.code)
    await a.expect("session:paired")
    await b.expect("session:paired")
    return a, b


def members(*pairs: tuple[str, bool]) -> list[Frame]:
    return [{"client_id": cid, "online": online} for cid, online in pairs]


# --- Hub routing -------------------------------------------------------------------------


async def test_message_reaches_the_other_member_and_not_the_sender(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        bystander = await relay.connect()

        ack = await a.request("message:send", data={"text": "hi"})
        assert ack["type"] == "message:ack" and ack["seq"] == 1
        message = await b.recv()
        assert message == {
            "type": "message",
            "code": a.code,
            "seq": 1,
            "from": a.client_id,
            "data": {"text": "hi"},
            "ts": message["ts"],
        }
        ack = await b.request("message:send", data=[1, 2])
        assert ack["seq"] == 2
        assert (await a.recv())["data"] == [1, 2]
        await relay.nothing(a, b, bystander)


async def test_paired_goes_to_every_member_each_time_the_session_fills(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        a = await relay.connect()
        await a.create()
        b = await relay.connect(GUEST_IP)
        joined = await b.join(a.code)
        assert joined["clients"] == members((a.client_id, True), (b.client_id, True))
        both = {"type": "session:paired", "code": a.code, "clients": joined["clients"]}
        assert await a.recv() == both
        assert await b.recv() == both  # after its own `session:joined`

        await b.request("session:leave")
        assert await a.recv() == {"type": "session:peer_left", "client_id": b.client_id}
        c = await relay.connect(GUEST_IP)
        await c.join(a.code)
        again = {"type": "session:paired", "code": a.code, "clients": members((a.client_id, True), (c.client_id, True))}
        assert await a.recv() == again
        assert await c.recv() == again
        await relay.nothing(a, b, c)


async def test_presence_and_peer_left_go_to_the_others_only(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        b.hang_up()  # the socket dropped: B stays a member, offline
        assert await a.recv() == {"type": "session:presence", "client_id": b.client_id, "online": False}

        b2 = await relay.connect(GUEST_IP)
        resumed = await b2.resume(b)
        assert resumed["clients"] == members((a.client_id, True), (b.client_id, True))
        assert await a.recv() == {"type": "session:presence", "client_id": b.client_id, "online": True}
        await relay.nothing(a, b2)  # B is not told about itself

        assert await b2.request("session:leave") == {"type": "session:left", "id": 2, "code": a.code}
        assert await a.recv() == {"type": "session:peer_left", "client_id": b.client_id}
        await relay.nothing(a, b2)

        # The last member leaving ends the session (Ended(None)): nobody is told anything more.
        assert (await a.request("session:leave"))["type"] == "session:left"
        await relay.nothing(a, b2)
        assert a.code not in relay.fake.sessions


async def test_takeover_closes_the_older_connection_and_keeps_the_member_online(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        a, b1 = await pair(relay)
        b2 = await relay.connect(GUEST_IP)
        resumed = await b2.resume(b1)  # B is still online on b1
        assert resumed["clients"] == members((a.client_id, True), (b1.client_id, True))
        assert await b1.closed() == 1000
        assert await a.recv() == {"type": "session:presence", "client_id": b1.client_id, "online": True}

        await relay.gone(b1)
        await a.request("message:send", data="after")
        assert (await b2.recv())["data"] == "after"
        # No `online: false` for the closed connection, and it got nothing after the pairing.
        await relay.nothing(a, b1, b2)
        assert b1.messages_sent() == []
        assert relay.fake.sessions[a.code].members[b1.client_id].conn_id == b2.conn.id


async def test_takeover_event_detaches_the_named_connection_at_once(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        # A Takeover naming a connection that is not that member's is ignored.
        relay.hub.dispatch(Takeover(a.code, a.client_id, b.conn.id))
        relay.hub.dispatch(MessageStored(a.code, StoredMessage(7, a.client_id, b'"one"', 0)))
        assert (await b.recv())["seq"] == 7

        # The right one closes it with 1000; an event dispatched right after does not reach it,
        # though its writer sends what was queued before the close.
        relay.hub.dispatch(Takeover(a.code, b.client_id, b.conn.id))
        relay.hub.dispatch(MessageStored(a.code, StoredMessage(8, a.client_id, b'"two"', 0)))
        assert await b.closed() == 1000
        await relay.nothing(b)
        assert [m["seq"] for m in b.messages_sent()] == [7]


@pytest.mark.parametrize("reason", ["idle", "ttl"])
async def test_ended_with_a_reason_sends_expired_and_keeps_the_socket_open(
    autojump_clock: MockClock, reason: str
) -> None:
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        relay.hub.dispatch(Ended(a.code, reason))
        for client in (a, b):
            assert await client.recv() == {"type": "session:expired", "code": a.code, "reason": reason}
        for client in (a, b):
            assert (await client.error("message:send", data=1))["code"] == "not_in_session"
            assert (await client.request("session:create"))["type"] == "session:created"
        assert a.socket.close_code is None and b.socket.close_code is None


async def test_ended_without_a_reason_sends_nothing_and_ends_the_membership(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        relay.hub.dispatch(Ended(a.code, None))
        await relay.nothing(a, b)
        for client in (a, b):
            assert (await client.error("message:send", data=1))["code"] == "not_in_session"
        assert a.socket.close_code is None and b.socket.close_code is None


async def test_messages_reach_a_member_whose_socket_was_in_another_session_before(autojump_clock: MockClock) -> None:
    """A socket's `delivered_seq` ends with its session: the next session's
    messages get through though their seqs are below the old session's."""
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        for i in range(3):
            await a.request("message:send", data=i)
            assert (await b.recv())["seq"] == i + 1
        await b.request("session:leave")
        await b.create()  # a new session on the same socket
        c = await relay.connect(GUEST_IP)
        await c.join(b.code)
        await b.expect("session:paired")
        await c.expect("session:paired")
        assert (await c.request("message:send", data="new"))["seq"] == 1
        message = await b.recv()  # seq 1, below the 3 B saw in its first session
        assert (message["from"], message["seq"], message["data"]) == (c.client_id, 1, "new")


# --- Connection: replies, errors, closes ----------------------------------------------------


async def test_replies_carry_the_request_id_and_errors_keep_the_socket_open(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        c = await relay.connect()
        await c.send({"type": "ping", "id": 7})
        pong = await c.recv()
        assert pong["type"] == "pong" and pong["id"] == 7 and isinstance(pong["ts"], int)
        await c.send({"type": "ping", "id": "req-a"})
        assert (await c.recv())["id"] == "req-a"
        await c.send({"type": "ping"})
        assert "id" not in await c.recv()

        await c.send({"type": "bogus", "id": "x1"})
        assert await c.recv() == {"type": "error", "id": "x1", "code": "unknown_type", "message": "unknown type"}
        await c.send_raw("{not json")
        invalid = await c.recv()
        assert invalid["type"] == "error" and invalid["code"] == "bad_request" and "id" not in invalid
        await c.send({"type": "session:join", "id": 3, "code": "short"})
        assert (await c.recv()) | {"message": ""} == {"type": "error", "id": 3, "code": "bad_request", "message": ""}
        assert (await c.error("message:send", data=1))["code"] == "not_in_session"
        assert (await c.error("session:join", code=UNKNOWN_CODE))["code"] == "not_found"

        created = await c.request("session:create")
        assert created["type"] == "session:created"
        assert set(created) == {"type", "id", "code", "client_id", "token", "expires_at"}
        assert (await c.error("session:create"))["code"] == "already_in_session"
        assert (await c.request("ping"))["type"] == "pong"
        assert c.socket.close_code is None


async def test_consecutive_client_errors_close_with_1008_and_pings_do_not_reset_the_count(
    autojump_clock: MockClock,
) -> None:
    cfg = dataclasses.replace(CONFIG, max_consecutive_errors=3)
    async with open_fake_relay(cfg) as relay:
        c = await relay.connect()
        await c.error("bogus")
        await c.error("bogus")
        await c.create()  # a successful request resets the count
        await c.error("bogus")
        await c.error("bogus")
        assert (await c.request("ping"))["type"] == "pong"
        await wait_all_tasks_blocked()
        assert c.socket.close_code is None  # two in a row so far
        assert (await c.error("bogus"))["code"] == "unknown_type"  # the third, answered before the close
        assert await c.closed() == 1008
        assert c.socket.pending() == []


async def test_a_binary_frame_closes_with_1003(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        c = await relay.connect()
        await c.send_raw(b'{"type": "ping"}')
        assert await c.closed() == 1003
        assert c.socket.sent == []


async def test_a_frame_over_max_message_bytes_closes_with_1009(autojump_clock: MockClock) -> None:
    limit = 256
    async with open_fake_relay(dataclasses.replace(CONFIG, max_message_bytes=limit)) as relay:
        c = await relay.connect()
        head, tail = '{"type":"ping","id":1,"pad":"', '"}'
        room = limit - len(head) - len(tail)
        await c.send_raw(head + "x" * room + tail)  # exactly the limit: fine
        assert (await c.recv())["type"] == "pong"
        # Fewer characters than the limit, more UTF-8 bytes: the limit is in bytes.
        over = head + "é" * (room // 2 + 1) + tail
        assert len(over) <= limit < len(over.encode())
        await c.send_raw(over)
        assert await c.closed() == 1009
        assert c.socket.pending() == []


async def test_a_client_that_does_not_read_is_closed_with_1013_when_its_queue_holds_too_many_frames(
    autojump_clock: MockClock,
) -> None:
    frames = 8
    async with open_fake_relay(dataclasses.replace(CONFIG, send_queue_frames=frames)) as relay:
        a, b = await pair(relay)
        b.socket.stop_reading()  # B stops reading: its writer blocks on the first frame
        for i in range(frames + 1):  # one in the writer's hands, `frames` queued
            assert (await a.request("message:send", data=i))["type"] == "message:ack"
        await wait_all_tasks_blocked()
        assert b.socket.close_code is None
        await a.request("message:send", data="one too many")
        assert await b.closed() == 1013
        # Its member goes offline (it can resume), and the queued frames were dropped.
        assert await a.recv() == {"type": "session:presence", "client_id": b.client_id, "online": False}
        b.socket.start_reading()
        await relay.nothing(a, b)
        assert b.messages_sent() == []


async def test_a_socket_whose_direct_write_fails_is_closed_with_1011_and_the_others_are_served(
    autojump_clock: MockClock,
) -> None:
    """The hub's one flusher writes every connection's frames: an error writing one
    socket closes that connection (1011, logged), never the flusher or the others."""
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        c, d = await pair(relay)

        def broken(texts: list[str]) -> Written:
            raise RuntimeError("write failed")

        b.socket.write_now = broken  # type: ignore[method-assign]
        await a.request("message:send", data="to b")
        assert await b.closed() == 1011
        await c.request("message:send", data="to d")
        assert (await d.recv())["data"] == "to d"
        assert await a.recv() == {"type": "session:presence", "client_id": b.client_id, "online": False}
        assert (await a.request("message:send", data="after"))["type"] == "message:ack"


async def test_a_client_that_does_not_read_is_closed_with_1013_when_its_queue_holds_too_many_bytes(
    autojump_clock: MockClock,
) -> None:
    cfg = dataclasses.replace(CONFIG, send_queue_frames=256, send_queue_bytes=4096)
    async with open_fake_relay(cfg) as relay:
        a, b = await pair(relay)
        b.socket.stop_reading()
        big = "x" * 1000  # each `message` frame is about 1.1 kB
        for _ in range(3):
            await a.request("message:send", data=big)
        await wait_all_tasks_blocked()
        assert b.socket.close_code is None  # about 3.3 kB queued
        await a.request("message:send", data=big)  # about 4.4 kB: over 4096
        assert await b.closed() == 1013
        b.socket.start_reading()
        await relay.nothing(b)
        assert b.messages_sent() == []


async def test_a_socket_in_no_session_is_closed_after_the_idle_timeout(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:  # IDLE_SOCKET_TIMEOUT 60
        start = trio.current_time()
        c = await relay.connect()
        await trio.sleep(30)
        assert (await c.request("ping"))["type"] == "pong"  # pings do not extend it
        await c.error("bogus")  # nor do failed requests
        await trio.sleep(29.9)
        assert c.socket.close_code is None
        assert await c.closed() == 1000
        assert c.socket.closed_at == pytest.approx(start + 60)
        assert ConnectionIdle(c.conn.id) in relay.reports


async def test_the_idle_timer_stops_in_a_session_and_restarts_when_it_is_left(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        start = trio.current_time()
        leaver = await relay.connect()
        expired = await relay.connect()
        await trio.sleep(10)
        await leaver.create()
        await expired.create()
        await trio.sleep(90)  # past the idle timeout, but in a session
        assert leaver.socket.close_code is None and expired.socket.close_code is None

        await leaver.request("session:leave")  # at 100: closed at 160
        await trio.sleep(40)
        relay.hub.dispatch(Ended(expired.code, "idle"))  # at 140: closed at 200
        await expired.expect("session:expired")
        assert await leaver.closed(within=100) == 1000
        assert leaver.socket.closed_at == pytest.approx(start + 160)
        assert await expired.closed(within=100) == 1000
        assert expired.socket.closed_at == pytest.approx(start + 200)


@pytest.mark.parametrize("attempt", ["join", "resume"])
async def test_a_failed_join_or_resume_does_not_extend_the_idle_timer(autojump_clock: MockClock, attempt: str) -> None:
    """A failed attempt leaves the connection in no session without restarting
    its idle timer (PROTOCOL.md: failed requests do not extend it)."""
    async with open_fake_relay() as relay:
        start = trio.current_time()
        c = await relay.connect()
        await trio.sleep(50)
        if attempt == "join":
            await c.error("session:join", code=UNKNOWN_CODE)
        else:
            await c.error("session:resume", code=UNKNOWN_CODE, client_id="someone", token="t", last_seq=0)
        assert await c.closed(within=100) == 1000
        assert c.socket.closed_at == pytest.approx(start + 60)  # not 50 + 60


async def test_a_peer_that_goes_away_is_not_sent_a_close_and_is_logged_as_1006(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        a, b = await pair(relay)
        b.hang_up()
        assert (await a.recv())["online"] is False
        await relay.gone(b)
        assert b.socket.close_code is None
        closed = [r for r in relay.reports if isinstance(r, ConnectionClosed) and r.conn == b.conn.id]
        assert [r.code for r in closed] == [1006]


# --- join and resume hold events back until the reply is out -------------------------------


async def test_events_during_a_join_go_out_after_the_reply_and_the_backlog_once_each(
    autojump_clock: MockClock,
) -> None:
    async with open_fake_relay() as relay:
        store = relay.fake
        a = await relay.connect()
        await a.create()
        await a.request("message:send", data="m1")  # stored before anyone joined
        gate = store.gates["join"] = Gate()
        b = await relay.connect(GUEST_IP)
        await b.send({"type": "session:join", "id": "j", "code": a.code})
        await gate.reached.wait()

        # While B's join is in flight: a message (also in its backlog) and a presence change.
        assert (await a.request("message:send", data="m2"))["seq"] == 2
        relay.hub.dispatch(PresenceChanged(a.code, a.client_id, True))
        # Right after the join's commit, before B's task wakes: a message not in the backlog.
        store.after_commit["join"] = lambda: store.commit_message(a.code, a.client_id, b'"m3"')
        await wait_all_tasks_blocked()
        assert b.socket.pending() == []
        gate.open()

        joined = await b.recv()
        assert joined["type"] == "session:joined" and joined["id"] == "j" and joined["last_seq"] == 2
        b.member(joined)
        seen = [await b.recv() for _ in range(5)]
        assert [(f["type"], f.get("seq"), f.get("data")) for f in seen] == [
            ("message", 1, "m1"),
            ("message", 2, "m2"),
            ("session:presence", None, None),
            ("session:paired", None, None),
            ("message", 3, "m3"),
        ]
        await relay.nothing(b)  # m2 was held too, and not sent twice
        assert (await a.recv())["type"] == "session:paired"


async def test_events_during_a_resume_go_out_after_the_reply_and_the_replay_once_each(
    autojump_clock: MockClock,
) -> None:
    async with open_fake_relay() as relay:
        store = relay.fake
        a, b = await pair(relay)
        b.hang_up()
        assert (await a.recv())["online"] is False
        for data in ("m1", "m2"):
            await a.request("message:send", data=data)
        gate = store.gates["resume"] = Gate()
        b2 = await relay.connect(GUEST_IP)
        request = {"type": "session:resume", "id": "r", "code": a.code, "client_id": b.client_id, "token": b.token}
        await b2.send(request | {"last_seq": 1})
        await gate.reached.wait()

        assert (await a.request("message:send", data="m3"))["seq"] == 3  # held for B, and in its replay
        store.after_commit["resume"] = lambda: store.commit_message(a.code, a.client_id, b'"m4"')
        gate.open()

        resumed = await b2.recv()
        assert (resumed["type"], resumed["id"], resumed["last_seq"], resumed["recovered"]) == (
            "session:resumed",
            "r",
            3,
            True,
        )
        seen = [await b2.recv() for _ in range(3)]
        assert [(f["type"], f["seq"], f["data"]) for f in seen] == [
            ("message", 2, "m2"),
            ("message", 3, "m3"),
            ("message", 4, "m4"),
        ]
        await relay.nothing(b2)
        assert await a.recv() == {"type": "session:presence", "client_id": b.client_id, "online": True}


async def test_a_failed_join_releases_nothing_and_leaves_the_connection_out_of_the_session(
    autojump_clock: MockClock,
) -> None:
    async with open_fake_relay() as relay:
        store = relay.fake
        a = await relay.connect()
        await a.create()
        gate = store.gates["join"] = Gate()
        b = await relay.connect(GUEST_IP)
        await b.send({"type": "session:join", "id": "j", "code": a.code})
        await gate.reached.wait()
        await a.request("message:send", data="held")
        relay.hub.dispatch(PresenceChanged(a.code, a.client_id, True))
        store.fail["join"] = session_full()
        gate.open()

        error = await b.recv()
        assert (error["type"], error["id"], error["code"]) == ("error", "j", "session_full")
        await relay.nothing(b)
        del store.gates["join"]
        await a.request("message:send", data="later")
        await relay.nothing(b)
        assert b.messages_sent() == []
        assert (await b.error("message:send", data=1))["code"] == "not_in_session"
        assert (await b.request("session:create"))["type"] == "session:created"


async def test_a_session_that_expires_during_a_join_is_reported_after_the_reply(autojump_clock: MockClock) -> None:
    async with open_fake_relay() as relay:
        store = relay.fake
        a = await relay.connect()
        await a.create()
        gate = store.gates["join"] = Gate()
        b = await relay.connect(GUEST_IP)
        await b.send({"type": "session:join", "id": "j", "code": a.code})
        await gate.reached.wait()
        store.after_commit["join"] = lambda: relay.hub.dispatch(Ended(a.code, "ttl"))
        gate.open()

        assert [(await b.recv())["type"] for _ in range(3)] == ["session:joined", "session:paired", "session:expired"]
        assert [(await a.recv())["type"] for _ in range(2)] == ["session:paired", "session:expired"]
        for client in (a, b):
            assert (await client.error("message:send", data=1))["code"] == "not_in_session"


# --- GroupCommit -----------------------------------------------------------------------------


class Executor:
    """An `execute` for GroupCommit: records each batch's payloads, then `outcome(op)`
    per op. The first batch waits in its worker thread until `release`, so that the
    calls made meanwhile queue up."""

    def __init__(self, outcome: Callable[[Op], None]) -> None:
        self.outcome = outcome
        self.batches: list[list[Any]] = []
        self.busy = threading.Event()
        self.released = threading.Event()

    def __call__(self, batch: list[Op]) -> None:
        self.batches.append([op.payload for op in batch])
        if len(self.batches) == 1:
            self.busy.set()
            self.released.wait(10)
        for op in batch:
            self.outcome(op)

    async def wait_busy(self) -> None:
        assert await trio.to_thread.run_sync(self.busy.wait, 10)

    def release(self) -> None:
        self.released.set()


def result_is_payload(op: Op) -> None:
    op.result = op.payload


def ignore(event: Event) -> None:
    pass


@asynccontextmanager
async def running(commit: GroupCommit, executor: Executor) -> AsyncIterator[None]:
    """Run the writer; at the end release the executor and close the queue
    (the writer must then finish within the test's deadline)."""
    with trio.fail_after(THREADED_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit.run)
            try:
                yield
            finally:
                executor.release()
                commit.close()


async def test_group_commit_runs_the_calls_made_during_a_batch_in_one_batch() -> None:
    executor = Executor(lambda op: setattr(op, "result", op.payload * 10))
    commit = GroupCommit(executor, ignore, abandon_on_cancel=False)
    results: dict[int, int] = {}

    async def call(n: int) -> None:
        results[n] = await commit.call(n)

    async with running(commit, executor), trio.open_nursery() as callers:
        callers.start_soon(call, 0)
        await executor.wait_busy()
        for n in range(1, 6):
            callers.start_soon(call, n)
        await wait_all_tasks_blocked()
        executor.release()
    assert results == {n: n * 10 for n in range(6)}
    assert len(executor.batches) == 2 and sorted(executor.batches[1]) == [1, 2, 3, 4, 5]
    assert (commit.batches, commit.ops) == (2, 6)


async def test_group_commit_gives_each_caller_its_own_result_or_error() -> None:
    def outcome(op: Op) -> None:
        kind, _, value = op.payload.partition(":")
        if kind == "ok":
            op.result = value
        elif kind == "client":
            op.error = ClientError(value, ErrorCode.NOT_FOUND)
        else:
            op.error = ValueError(value)  # a bug in an operation: `internal` for that caller alone

    executor = Executor(outcome)
    commit = GroupCommit(executor, ignore, abandon_on_cancel=False)
    outcomes: dict[str, object] = {}

    async def call(payload: str) -> None:
        try:
            outcomes[payload] = await commit.call(payload)
        except TandemError as exc:
            outcomes[payload] = exc

    payloads = ["ok:a", "client:gone", "ok:b", "bug:oops", "ok:c"]
    async with running(commit, executor), trio.open_nursery() as callers:
        callers.start_soon(call, "ok:first")
        await executor.wait_busy()
        for payload in payloads:
            callers.start_soon(call, payload)
        await wait_all_tasks_blocked()
        executor.release()
    assert sorted(executor.batches[1]) == sorted(payloads)  # all in one batch
    assert [outcomes[p] for p in ("ok:first", "ok:a", "ok:b", "ok:c")] == ["first", "a", "b", "c"]
    gone, bug = outcomes["client:gone"], outcomes["bug:oops"]
    assert isinstance(gone, ClientError) and gone.code == ErrorCode.NOT_FOUND and gone.message == "gone"
    assert isinstance(bug, ServerError) and bug.code == ErrorCode.INTERNAL
    assert isinstance(bug.__cause__, ValueError)


async def test_group_commit_dispatches_events_in_op_order_before_the_callers_wake() -> None:
    def outcome(op: Op) -> None:
        op.result = op.payload
        op.events = [PresenceChanged("CODE", op.payload, False), PeerLeft("CODE", op.payload)]

    dispatched: list[tuple[Event, frozenset[str]]] = []
    woken: set[str] = set()
    executor = Executor(outcome)
    commit = GroupCommit(executor, lambda event: dispatched.append((event, frozenset(woken))), abandon_on_cancel=False)

    async def call(payload: str) -> None:
        assert await commit.call(payload) == payload
        # The events of its op went out before its caller woke.
        assert PeerLeft("CODE", payload) in [event for event, _ in dispatched]
        woken.add(payload)

    order = ["b1", "b2", "b3", "b4"]
    async with running(commit, executor), trio.open_nursery() as callers:
        callers.start_soon(call, "first")
        await executor.wait_busy()
        for payload in order:  # queued one after the other: the batch keeps this order
            callers.start_soon(call, payload)
            await wait_all_tasks_blocked()
        executor.release()
    assert executor.batches == [["first"], order]
    second = [(e, seen) for e, seen in dispatched if isinstance(e, PresenceChanged | PeerLeft) and e.client_id in order]
    assert [event for event, _ in second] == [
        e for p in order for e in (PresenceChanged("CODE", p, False), PeerLeft("CODE", p))
    ]
    assert all(not (seen & set(order)) for _, seen in second)  # no caller of the batch had woken


async def test_group_commit_makes_callers_wait_while_the_queue_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_store, "OP_QUEUE_SIZE", 2)
    executor = Executor(result_is_payload)
    commit = GroupCommit(executor, ignore, abandon_on_cancel=False)
    results: dict[int, int] = {}
    scopes: dict[int, trio.CancelScope] = {}

    async def call(n: int) -> None:
        with trio.CancelScope() as scopes[n]:
            results[n] = await commit.call(n)

    async with running(commit, executor), trio.open_nursery() as callers:
        callers.start_soon(call, 0)
        await executor.wait_busy()
        for n in (1, 2, 3, 4):  # 1 and 2 fill the queue; 3 and 4 wait for room
            callers.start_soon(call, n)
            await wait_all_tasks_blocked()
        # A caller that gives up while waiting for room leaves nothing behind; one
        # that gives up once queued does not take its operation back.
        scopes[2].cancel()
        scopes[3].cancel()
        executor.release()
    assert results == {0: 0, 1: 1, 4: 4}
    assert sorted(n for batch in executor.batches for n in batch) == [0, 1, 2, 4]


async def test_group_commit_close_finishes_the_queue_then_refuses_calls() -> None:
    executor = Executor(result_is_payload)
    commit = GroupCommit(executor, ignore, abandon_on_cancel=False)
    results: dict[int, int] = {}
    refused: list[TandemError] = []

    async def call(n: int) -> None:
        try:
            results[n] = await commit.call(n)
        except TandemError as exc:
            refused.append(exc)

    with trio.fail_after(THREADED_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit.run)
            nursery.start_soon(call, 0)
            await executor.wait_busy()
            nursery.start_soon(call, 1)
            nursery.start_soon(call, 2)
            await wait_all_tasks_blocked()
            commit.close()
            await call(3)  # after close(): refused at once, while the writer still works
            assert refused and results == {}
            executor.release()
        # The nursery ended: run() returned once the queue was empty.
    assert results == {0: 0, 1: 1, 2: 2}
    await call(4)
    assert len(refused) == 2
    for exc in refused:
        assert isinstance(exc, ServerError) and exc.code == ErrorCode.UNAVAILABLE and exc.retry_after == 1.0
    assert sorted(n for batch in executor.batches for n in batch) == [0, 1, 2]


async def test_group_commit_fails_the_callers_of_a_batch_whose_execute_raised() -> None:
    """The batch's callers get `internal`, not a result of None as if their operations had succeeded."""
    batches: list[list[Any]] = []

    def execute(batch: list[Op]) -> None:
        batches.append([op.payload for op in batch])
        if batch[0].payload == "doomed":
            op = batch[0]
            op.events = [PeerLeft("CODE", "never")]
            raise RuntimeError("backend bug")
        for op in batch:
            op.result = op.payload

    dispatched: list[Event] = []
    commit = GroupCommit(execute, dispatched.append, abandon_on_cancel=False)
    with trio.fail_after(THREADED_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit.run)
            with pytest.raises(ServerError) as failed:
                await commit.call("doomed")
            assert failed.value.code == ErrorCode.INTERNAL
            assert await commit.call("next") == "next"  # the writer went on
            commit.close()
    assert batches == [["doomed"], ["next"]]
    assert dispatched == []  # a failed batch tells nothing


async def test_group_commit_fails_the_callers_of_a_batch_cut_short_by_cancellation() -> None:
    """With abandon_on_cancel, a writer cancelled mid-batch fails its callers with `unavailable`, never None."""
    executor = Executor(result_is_payload)
    commit = GroupCommit(executor, ignore, abandon_on_cancel=True)
    outcome: list[object] = []

    async def call(payload: str) -> None:
        try:
            outcome.append(await commit.call(payload))
        except TandemError as exc:
            outcome.append(exc)

    try:
        with trio.fail_after(THREADED_TIMEOUT):
            async with trio.open_nursery() as callers, trio.open_nursery() as writer:
                writer.start_soon(commit.run)
                callers.start_soon(call, "in flight")
                await executor.wait_busy()
                writer.cancel_scope.cancel()  # shutdown: the store's deadline passed
    finally:
        executor.release()  # the abandoned worker thread may finish
    [error] = outcome
    assert isinstance(error, ServerError) and error.code == ErrorCode.UNAVAILABLE, error


# --- failure limits on join and resume ----------------------------------------------------------

LIMITS_CONFIG = dataclasses.replace(CONFIG, idle_socket_timeout=3600.0)


async def test_failed_joins_count_against_the_address_and_successful_ones_are_refunded(
    autojump_clock: MockClock,
) -> None:
    limits = Limits(join_failures_ip=Rule("join_failures_ip", 3, 60.0))
    async with open_fake_relay(LIMITS_CONFIG, limits) as relay:
        codes = []
        for _ in range(5):
            host = await relay.connect(HOST_IP)
            codes.append((await host.create())["code"])
        guesser = await relay.connect(GUEST_IP)
        for _ in range(2):
            assert (await guesser.error("session:join", code=UNKNOWN_CODE))["code"] == "not_found"
        joiners = []
        for code in codes:  # five successes from the same address: each refunded
            joiner = await relay.connect(GUEST_IP)
            await joiner.join(code)
            joiners.append(joiner)
        relay.fake.fail["join"] = ServerError("store down", ErrorCode.UNAVAILABLE, retry_after=1.0)
        assert (await guesser.error("session:join", code=UNKNOWN_CODE))["code"] == "unavailable"  # refunded
        assert (await guesser.error("session:join", code=UNKNOWN_CODE))["code"] == "not_found"  # the third

        refused = await guesser.error("session:join", code=UNKNOWN_CODE)
        assert refused["code"] == "rate_limited" and refused["retry_after"] == pytest.approx(60.0)
        # Every join and resume from that address is refused, right credentials or not.
        member = joiners[0]
        member.hang_up()
        again = await relay.connect(GUEST_IP)
        assert (await again.resume(member))["code"] == "rate_limited"
        # Another address is not.
        elsewhere = await relay.connect("192.0.2.200")
        assert (await elsewhere.error("session:join", code=UNKNOWN_CODE))["code"] == "not_found"

        await trio.sleep(60)  # the window moved past the failures
        assert (await again.resume(member))["type"] == "session:resumed"


async def test_join_attempts_are_counted_before_they_run(autojump_clock: MockClock) -> None:
    limits = Limits(join_failures_ip=Rule("join_failures_ip", 2, 60.0))
    async with open_fake_relay(LIMITS_CONFIG, limits) as relay:
        store = relay.fake
        hosts = [await relay.connect(HOST_IP) for _ in range(2)]
        for host in hosts:
            await host.create()
        gate = store.gates["join"] = Gate()
        joiners = [await relay.connect(GUEST_IP) for _ in range(2)]
        for joiner, host in zip(joiners, hosts, strict=True):
            await joiner.send({"type": "session:join", "id": "j", "code": host.code})
        await wait_all_tasks_blocked()
        assert gate.waiting == 2

        # Two attempts in flight use up the address's allowance: a third is refused at once.
        third = await relay.connect(GUEST_IP)
        refused = await third.error("session:join", code=hosts[0].code)
        assert refused["code"] == "rate_limited"
        gate.open()
        for joiner in joiners:
            assert (await joiner.recv())["type"] == "session:joined"
        del store.gates["join"]
        # Both succeeded and were refunded: the address has its allowance back.
        assert (await third.error("session:join", code=UNKNOWN_CODE))["code"] == "not_found"
        assert (await third.error("session:join", code=UNKNOWN_CODE))["code"] == "not_found"
        assert (await third.error("session:join", code=UNKNOWN_CODE))["code"] == "rate_limited"


async def test_a_locked_code_refuses_joins_but_not_its_members_resume(autojump_clock: MockClock) -> None:
    limits = Limits(code_failures=Rule("code_failures", 3, 600.0))
    async with open_fake_relay(LIMITS_CONFIG, limits) as relay:
        a, b = await pair(relay)
        for n in range(3):  # from three addresses: only the per-code limit counts them all
            guesser = await relay.connect(f"192.0.2.{10 + n}")
            assert (await guesser.error("session:join", code=a.code))["code"] == "session_full"
        late = await relay.connect("192.0.2.20")
        refused = await late.error("session:join", code=a.code)
        assert refused["code"] == "rate_limited" and refused["retry_after"] == pytest.approx(600.0)
        other = await relay.connect(HOST_IP)
        await other.create()
        assert (await late.join(other.code))["type"] == "session:joined"  # the lock is per code

        b.hang_up()
        assert (await a.recv())["online"] is False
        wrong = await relay.connect("192.0.2.30")
        assert (await wrong.resume(b, token="not-the-token"))["code"] == "not_found"
        b2 = await relay.connect(GUEST_IP)
        assert (await b2.resume(b))["type"] == "session:resumed"


async def test_failed_resumes_count_against_the_code_but_resumes_are_never_refused_for_it(
    autojump_clock: MockClock,
) -> None:
    limits = Limits(code_failures=Rule("code_failures", 3, 600.0))
    async with open_fake_relay(LIMITS_CONFIG, limits) as relay:
        a = await relay.connect()
        await a.create()
        for n in range(5):
            guesser = await relay.connect(f"192.0.2.{10 + n}")
            assert (await guesser.resume(a, token="not-the-token"))["code"] == "not_found"
        joiner = await relay.connect("192.0.2.40")
        assert (await joiner.error("session:join", code=a.code))["code"] == "rate_limited"


# --- on the real SqliteStore (worker threads: real clock) -----------------------------------------


async def test_sqlite_routing_presence_replay_and_leave(tmp_path: Path) -> None:
    async with open_sqlite_relay(tmp_path) as relay:
        a, b = await pair(relay)
        assert (await a.request("message:send", data="hello"))["seq"] == 1
        assert (await b.recv())["data"] == "hello"
        assert (await b.request("message:send", data="hi"))["seq"] == 2
        assert (await a.recv())["data"] == "hi"
        await relay.nothing(a, b)

        b.hang_up()
        assert await a.recv() == {"type": "session:presence", "client_id": b.client_id, "online": False}
        assert (await a.request("message:send", data="while away"))["seq"] == 3
        b2 = await relay.connect(GUEST_IP)
        resumed = await b2.resume(b, last_seq=1)
        assert (resumed["last_seq"], resumed["recovered"]) == (3, True)
        replay = await b2.recv()  # seq 2 was B's own
        assert (replay["seq"], replay["data"]) == (3, "while away")
        assert await a.recv() == {"type": "session:presence", "client_id": b.client_id, "online": True}

        assert (await b2.request("session:leave"))["type"] == "session:left"
        assert await a.recv() == {"type": "session:peer_left", "client_id": b.client_id}
        assert (await a.request("session:leave"))["type"] == "session:left"
        await relay.nothing(a, b2)


async def test_sqlite_takeover(tmp_path: Path) -> None:
    async with open_sqlite_relay(tmp_path) as relay:
        a, b1 = await pair(relay)
        b2 = await relay.connect(GUEST_IP)
        assert (await b2.resume(b1))["type"] == "session:resumed"
        assert await b1.closed() == 1000
        assert await a.recv() == {"type": "session:presence", "client_id": b1.client_id, "online": True}
        await relay.gone(b1)
        await a.request("message:send", data="to the new one")
        assert (await b2.recv())["data"] == "to the new one"
        await relay.nothing(a, b1, b2)  # no `online: false` for the old connection
        assert b1.messages_sent() == []
