"""client.py: its pure decisions, its behaviour against a scripted fake server, and real Tandem processes.

The pure parts (backoff decision, seq filter, outbox, saved state) are checked
case by case. `FakeServer` is an in-process transport the test scripts frame by
frame, on trio's MockClock, for what a real server cannot be made to do on cue
(auth, retry_after, fatal close codes, silence). The rest runs real
`python server.py` processes on both stores: kill -9 and restart, a SIGTERM
drain, a restart of the client from its saved state, the outbox bound, rate
limits, 1009 and 1008, and the README's example as written.
"""

from __future__ import annotations

import itertools
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from helpers import BOTH_STORES, ROOT, Server, ServerFactory, base_env, stored, wait_exit
from jwt_keys import AUDIENCE, ISSUER, SECRET, claims
from jwt_keys import token as jwt_token

import client
from client import (
    Acked,
    Backoff,
    ConnectionLost,
    Disconnect,
    GiveUp,
    Message,
    Options,
    Outbox,
    OutboxFull,
    RequestFailed,
    Resumed,
    Retry,
    SavedState,
    SeqFilter,
    Session,
    SessionClosed,
    State,
    StateChanged,
    Transport,
    TransportClosed,
    decide,
)

Frame = dict[str, Any]
Ender = Callable[[], Awaitable[None]]
E = TypeVar("E")
PATIENCE = 10.0  # seconds (real, or virtual under MockClock) a test waits for one frame, event or reply
CODE = "ABCD2345"
SAVED: Frame = {"version": 1, "code": CODE, "client_id": "me", "token": "tok", "last_seq": 0, "pending": []}
QUIET = 1000.0  # a ping interval that no fake test reaches, so that no `ping` frames interleave


# --- pure parts ----------------------------------------------------------------------


BACKOFF = Backoff(base=0.5, cap=10.0, overload_floor=3.0)


@pytest.mark.parametrize(
    ("ended", "attempt", "expected"),
    [
        (Disconnect(close_code=1006), 0, Retry(0.25, 1)),  # full jitter: unit 0.5 of min(cap, 0.5 * 2**0)
        (Disconnect(close_code=1006), 3, Retry(2.0, 4)),
        (Disconnect(close_code=1006), 30, Retry(5.0, 31)),  # capped at 10 s
        (Disconnect(close_code=1011), 1, Retry(0.5, 2)),
        (Disconnect(close_code=1012), 5, Retry(0.125, 0)),  # a restart: at once, spread over 0.25 s
        (Disconnect(close_code=1013), 0, Retry(3.0, 1)),  # overloaded: at least the floor
        (Disconnect(close_code=1013), 30, Retry(5.0, 31)),
        (Disconnect(error="rate_limited", retry_after=7.5), 0, Retry(7.5, 1)),  # retry_after in full
        (Disconnect(error="unavailable", retry_after=0.1), 3, Retry(2.0, 4)),  # ... or the backoff if longer
        (Disconnect(http_status=429, retry_after=42.0), 0, Retry(42.0, 1)),  # above the cap too
        (Disconnect(http_status=503, retry_after=5.0), 0, Retry(5.0, 1)),
        (Disconnect(close_code=1012, retry_after=2.0), 0, Retry(2.0, 1)),
        (Disconnect(close_code=1008, auth_expired=True), 0, Retry(0.25, 1)),  # token expired: a fresh one
        (Disconnect(close_code=1009, dropped_oversized=True), 0, Retry(0.5, 1)),  # at least one backoff step
        (Disconnect(close_code=1000), 0, Retry(0.25, 1)),  # not in the session yet: an idle close
        (Disconnect(message="no reply"), 0, Retry(0.25, 1)),
    ],
)
def test_decide_retries(ended: Disconnect, attempt: int, expected: Retry) -> None:
    assert decide(ended, attempt, BACKOFF, 0.5) == expected


@pytest.mark.parametrize(
    ("ended", "error", "detail"),
    [
        (Disconnect(close_code=1003), ConnectionLost, 1003),
        (Disconnect(close_code=1008), ConnectionLost, 1008),
        (Disconnect(close_code=1008, in_session=True), ConnectionLost, 1008),
        (Disconnect(close_code=1009), ConnectionLost, 1009),
        (Disconnect(close_code=1002), ConnectionLost, 1002),
        (Disconnect(close_code=1007), ConnectionLost, 1007),
        (Disconnect(http_status=403), ConnectionLost, 403),
        (Disconnect(http_status=401), ConnectionLost, 401),
        (Disconnect(error="unauthorized"), RequestFailed, "unauthorized"),
        (Disconnect(error="not_found"), RequestFailed, "not_found"),
        (Disconnect(error="session_full"), RequestFailed, "session_full"),
        (Disconnect(error="bad_request"), RequestFailed, "bad_request"),
        (Disconnect(close_code=1000, in_session=True), SessionClosed, "taken over"),
        (Disconnect(session_over="the session expired (idle)"), SessionClosed, "expired"),
    ],
)
def test_decide_gives_up(ended: Disconnect, error: type[Exception], detail: object) -> None:
    decision = decide(ended, 0, BACKOFF, 0.5)
    assert isinstance(decision, GiveUp) and isinstance(decision.error, error), decision
    if isinstance(decision.error, ConnectionLost):
        assert detail in (decision.error.close_code, decision.error.http_status)
    elif isinstance(decision.error, RequestFailed):
        assert decision.error.code == detail
    else:
        assert str(detail) in str(decision.error)


def test_backoff_is_full_jitter_below_a_doubling_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=10.0)
    assert [backoff.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.delay(3, 0.0) == 0.0 and backoff.delay(3, 0.25) == 1.0
    assert backoff.ceiling(10_000) == 10.0  # no overflow after a very long outage


def test_seq_filter_passes_each_seq_once_and_never_goes_back() -> None:
    seen = SeqFilter()
    delivered = []
    for seq in [1, 2, 2, 1, 4, 3, 4, 7]:  # 3 after 4: already past it; gaps (5, 6) are normal
        if seen.is_new(seq):
            delivered.append(seq)
            seen.delivered(seq)
    assert delivered == [1, 2, 4, 7] and seen.last_seq == 7
    cancelled = SeqFilter(last_seq=7)
    assert cancelled.is_new(8)  # checked but not delivered (a cancelled hand-over) ...
    assert cancelled.is_new(8) and cancelled.last_seq == 7  # ... is still new


def test_outbox_keeps_order_and_its_bound() -> None:
    box = Outbox(limit=3)
    first = box.add("m1", {"n": 1})
    box.add("m2", [2])
    box.add("m3", "three")
    with pytest.raises(OutboxFull):
        box.add("m4", 4)
    assert json.loads(first.text) == {"type": "message:send", "id": "m1", "mid": "m1", "data": {"n": 1}}
    assert [e.mid for e in box] == ["m1", "m2", "m3"]
    assert box.first_from(0) is first and box.first_from(first.number + 1).mid == "m2"  # type: ignore[union-attr]
    assert box.remove("m2") is not None and box.remove("m2") is None  # a second ack finds nothing
    assert box.first_from(first.number + 1).mid == "m3"  # type: ignore[union-attr]
    box.add("m4", 4)  # room again
    assert [e.mid for e in box] == ["m1", "m3", "m4"] and len(box) == 3
    box.remove("m4")
    with pytest.raises(ValueError, match="already queued"):
        box.add("m1", 1)
    with pytest.raises(ValueError):
        Outbox(5).add("nan", float("nan"))  # not JSON


def test_saved_state_round_trips_through_json_and_refuses_junk() -> None:
    state = SavedState(CODE, "me", "tok", 12, (("m1", {"a": [1, None]}), ("m2", "x")))
    text = json.dumps(state.to_json())
    assert SavedState.from_json(json.loads(text)) == state
    for junk in [
        {**SAVED, "version": 2},
        {**SAVED, "code": ""},
        {**SAVED, "token": None},
        {**SAVED, "last_seq": -1},
        {**SAVED, "last_seq": True},
        {**SAVED, "pending": [{"data": 1}]},
        {**SAVED, "pending": {"mid": "m", "data": 1}},
    ]:
        with pytest.raises(ValueError):
            SavedState.from_json(junk)


def test_codes_are_read_as_a_person_typed_them() -> None:
    assert client.normalise_code("abcd-2345") == "ABCD2345"
    assert client.normalise_code(" ab cd 23 45 ") == "ABCD2345"
    assert client.normalise_code("ILOZ2345") == "110Z2345"  # I and L read as 1, O as 0
    assert client.normalise_code("\uff21\uff22\uff23\uff24\uff12\uff13\uff14\uff15") == "ABCD2345"  # full width
    for bad in ["ABC12", "ABCDEFGH12345", "UUUU2345", "ABCD 23!5", "straße12", ""]:
        with pytest.raises(client.BadCode):
            client.normalise_code(bad)


def test_retry_after_header() -> None:
    assert client.retry_after_header(((b"Retry-After", b"55"),)) == 55.0
    assert client.retry_after_header(((b"retry-after", b"1.5"), (b"x", b"y"))) == 1.5
    assert client.retry_after_header(((b"Retry-After", b"Wed, 21 Oct 2015 07:28:00 GMT"),)) is None
    assert client.retry_after_header(((b"Retry-After", b"-3"),)) is None
    assert client.retry_after_header(()) is None


# --- a scripted fake server ------------------------------------------------------------


class FakeTransport:
    """The client's side of a fake connection: frames to the server, frames (or a close code) from it."""

    def __init__(self, conn: FakeConnection) -> None:
        self._conn = conn

    async def send(self, text: str) -> None:
        if self._conn.close_code is not None:
            raise TransportClosed(self._conn.close_code)
        await self._conn.from_client_in.send(text)

    async def receive(self) -> str:
        if self._conn.close_code is not None:
            raise TransportClosed(self._conn.close_code)
        item = await self._conn.to_client_out.receive()
        if isinstance(item, int):
            self._conn.close_code = item
            raise TransportClosed(item)
        return item


class FakeConnection:
    """One connection as the fake server sees it: read the client's frames, answer, send events, close."""

    def __init__(self) -> None:
        self.to_client_in, self.to_client_out = trio.open_memory_channel[str | int](100)
        self.from_client_in, self.from_client_out = trio.open_memory_channel[str](100)
        self.close_code: int | None = None
        self.hung_up = False  # the client left the connector's block

    async def receive(self, *, skip_pings: bool = True, patience: float = PATIENCE) -> Frame:
        """The client's next frame (pings skipped unless asked for), within `patience` s."""
        for _ in range(100):
            with trio.fail_after(patience):
                frame: Frame = json.loads(await self.from_client_out.receive())
            if not (skip_pings and frame.get("type") == "ping"):
                return frame
        raise AssertionError("only pings")

    async def expect(self, kind: str, patience: float = PATIENCE) -> Frame:
        frame = await self.receive(patience=patience)
        assert frame["type"] == kind, f"expected {kind}, got {frame}"
        return frame

    async def reply(self, request: Frame, kind: str, **fields: Any) -> None:
        await self.event(kind, id=request["id"], **fields)

    async def event(self, kind: str, **fields: Any) -> None:
        await self.to_client_in.send(json.dumps({"type": kind, **fields}))

    async def close(self, code: int) -> None:
        await self.to_client_in.send(code)

    async def resumed(self) -> Frame:
        """Answer the client's `session:resume` of SAVED's member (both members online); returns the request."""
        request = await self.expect("session:resume")
        assert (request["code"], request["client_id"], request["token"]) == (CODE, "me", "tok")
        clients = [{"client_id": "me", "online": True}, {"client_id": "peer", "online": True}]
        await self.reply(request, "session:resumed", code=CODE, client_id="me", clients=clients, last_seq=0)
        return request

    async def message(self, seq: int, data: Any = None) -> None:
        await self.event(
            "message", code=CODE, seq=seq, data=data if data is not None else seq, ts=seq, **{"from": "peer"}
        )


@dataclass
class FakeServer:
    """Hands out fake connections; `refuse` makes the next attempts fail; `attempts` are their trio times."""

    attempts: list[float] = field(default_factory=list)
    refuse: list[ConnectionLost] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._accepted_in, self._accepted_out = trio.open_memory_channel[FakeConnection](16)

    def connector(self, url: str, connect_timeout: float) -> AbstractAsyncContextManager[Transport]:
        return self._connect()

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Transport]:
        self.attempts.append(trio.current_time())
        if self.refuse:
            raise self.refuse.pop(0)
        conn = FakeConnection()
        await self._accepted_in.send(conn)
        try:
            yield FakeTransport(conn)
        finally:
            conn.hung_up = True
            conn.from_client_in.close()

    async def accept(self) -> FakeConnection:
        with trio.fail_after(PATIENCE):
            return await self._accepted_out.receive()

    def options(self, **overrides: Any) -> Options:
        settings: dict[str, Any] = {
            "connector": self.connector,
            "random": lambda: 0.5,
            "ping_interval": QUIET,
            "backoff": Backoff(base=0.5, cap=10.0, overload_floor=3.0),
        }
        return Options(**{**settings, **overrides})


async def next_of(session: Session, kind: type[E], patience: float = PATIENCE) -> E:
    """The next event of type `kind`, skipping others (a bounded number), each within `patience` s."""
    for _ in range(100):
        with trio.fail_after(patience):
            event = await session.next_event()
        if isinstance(event, kind):
            return event
    raise AssertionError(f"no {kind.__name__} among 100 events")


async def until_state(session: Session, state: State, patience: float = PATIENCE) -> None:
    """Skip events until the session reports `state`."""
    for _ in range(100):
        if (await next_of(session, StateChanged, patience)).state is state:
            return
    raise AssertionError(f"never {state}")


async def closed_with(session: Session, patience: float = PATIENCE) -> client.TandemError | None:
    """Wait for StateChanged(CLOSED) and return its error."""
    for _ in range(100):
        event = await next_of(session, StateChanged, patience)
        if event.state is State.CLOSED:
            return event.error
    raise AssertionError("not closed")


@asynccontextmanager
async def resumed_fake(fake: FakeServer, **overrides: Any) -> AsyncIterator[tuple[Session, FakeConnection]]:
    """A session resumed from SAVED on the fake server: (session, its connection)."""
    async with client.resume("ws://fake/ws", SAVED, fake.options(**overrides)) as session:
        conn = await fake.accept()
        await conn.resumed()
        assert await next_of(session, StateChanged) == StateChanged(State.OPEN)
        yield session, conn


def waits(attempts: list[float]) -> list[float]:
    """The time between one connection attempt and the next (rounded: MockClock times are exact)."""
    return [round(later - earlier, 6) for earlier, later in itertools.pairwise(attempts)]


async def test_reconnect_waits_grow_with_full_jitter_up_to_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer(refuse=[ConnectionLost("refused")] * 20)
    async with client.resume("ws://fake/ws", SAVED, fake.options(max_attempts=8)) as session:
        error = await closed_with(session, patience=60.0)
    assert isinstance(error, ConnectionLost) and "8 connection attempts" in str(error)
    assert waits(fake.attempts) == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]  # unit 0.5 of 0.5, 1, 2, 4, 8, 10, 10


async def test_1012_reconnects_at_once_1013_waits_the_floor_1006_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeServer()
    async with resumed_fake(fake) as (session, conn):
        for code in (1012, 1013, 1006):
            await conn.close(code)
            assert await next_of(session, StateChanged) == StateChanged(State.RECONNECTING)
            conn = await fake.accept()
            await conn.resumed()
            assert await next_of(session, StateChanged) == StateChanged(State.OPEN)
    assert waits(fake.attempts) == [0.125, 3.0, 0.25]  # at once (spread); the 1013 floor; full jitter


async def test_retry_after_is_waited_in_full(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer(refuse=[ConnectionLost("busy", http_status=429, retry_after=9.0)])
    async with client.resume("ws://fake/ws", SAVED, fake.options()) as session:
        conn = await fake.accept()
        request = await conn.expect("session:resume")
        await conn.reply(request, "error", code="rate_limited", message="slow down", retry_after=7.0)
        conn = await fake.accept()
        await conn.resumed()
        await session.wait_open()
    assert waits(fake.attempts) == [9.0, 7.0]


@pytest.mark.parametrize("code", [1003, 1008, 1002, 1007])
async def test_fatal_close_codes_close_the_session_without_a_retry(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    fake = FakeServer()
    async with resumed_fake(fake) as (session, conn):
        sending = trio.Event()

        async def send_one() -> None:
            sending.set()
            with pytest.raises(SessionClosed), trio.fail_after(PATIENCE):
                await session.send("lost")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_one)
            await sending.wait()
            await conn.expect("message:send")
            await conn.close(code)
            error = await closed_with(session)
        assert isinstance(error, ConnectionLost) and error.close_code == code
        assert session.state is State.CLOSED and session.error is error
        await trio.sleep(600)
        assert len(fake.attempts) == 1
        assert session.save()["pending"][0]["data"] == "lost"  # kept for a later resume by the application
        with pytest.raises(SessionClosed), trio.fail_after(PATIENCE):
            await session.send("after")


async def test_1009_drops_the_oversized_send_and_carries_on(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    async with resumed_fake(fake) as (session, conn):
        refused: list[Exception] = []

        async def send_big() -> None:
            with pytest.raises(client.MessageTooLarge) as exc, trio.fail_after(PATIENCE):
                await session.send("x" * 1000)
            refused.append(exc.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_big)
            await conn.expect("message:send")
            await conn.close(1009)  # the server's limit is lower than the client thought
            conn = await fake.accept()
            await conn.resumed()
        assert refused and session.pending == 0
        assert (await next_of(session, client.ServerError)).code == "too_big"
        with pytest.raises(client.MessageTooLarge), trio.fail_after(PATIENCE):
            await session.send("x" * 1000)  # the limit is learnt: refused before it is sent
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.send, "small")
            small = await conn.expect("message:send")
            assert small["data"] == "small"
            await conn.reply(small, "message:ack", seq=1)
        await conn.close(1009)  # no send in flight: the cause is unknown, and would repeat
        error = await closed_with(session)
        assert isinstance(error, ConnectionLost) and error.close_code == 1009
    assert waits(fake.attempts) == [0.5]  # after the first 1009: one backoff step (0.5 of 1 s)


async def test_a_takeover_is_not_resumed(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    async with resumed_fake(fake) as (session, conn):
        await conn.close(1000)  # another connection resumed this member
        error = await closed_with(session)
        assert isinstance(error, SessionClosed) and "taken over" in str(error)
        await trio.sleep(600)
        assert len(fake.attempts) == 1


@pytest.mark.parametrize(
    ("refused", "code"),
    [("session:resume", "not_found"), ("session:resume", "bad_request"), ("auth", "unauthorized")],
)
async def test_a_refusal_that_would_repeat_closes_without_a_retry(
    autojump_clock: trio.testing.MockClock, refused: str, code: str
) -> None:
    fake = FakeServer()

    async def token() -> str:
        return "bad"

    options = fake.options(token=token if refused == "auth" else None)
    async with client.resume("ws://fake/ws", SAVED, options) as session:
        conn = await fake.accept()
        if refused == "auth":
            await conn.reply(await conn.expect("hello"), "welcome", protocol="1.1", auth="required", time=0)
        await conn.reply(await conn.expect(refused), "error", code=code, message="refused")
        error = await closed_with(session)
        assert isinstance(error, RequestFailed) and error.code == code
        await trio.sleep(600)
        assert len(fake.attempts) == 1


async def test_expiry_closes_the_session(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    async with resumed_fake(fake) as (session, conn):
        await conn.event("session:expired", code=CODE, reason="idle")
        assert await next_of(session, client.Expired) == client.Expired(CODE, "idle")
        error = await closed_with(session)
        assert isinstance(error, SessionClosed) and "expired" in str(error)
        await trio.sleep(600)
        assert len(fake.attempts) == 1
        assert conn.hung_up


async def test_duplicates_are_dropped_and_a_resume_starts_after_the_last_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeServer()
    async with resumed_fake(fake) as (session, conn):
        for seq in (1, 2, 2, 1, 3):
            await conn.message(seq)
        got = [(await next_of(session, Message)).seq for _ in range(3)]
        await conn.close(1006)
        conn = await fake.accept()
        request = await conn.expect("session:resume")
        assert request["last_seq"] == 3
        clients = [{"client_id": "me", "online": True}, {"client_id": "peer", "online": False}]
        await conn.reply(
            request, "session:resumed", code=CODE, client_id="me", clients=clients, last_seq=9, recovered=False
        )
        for seq in (2, 3, 4, 4, 9):
            await conn.message(seq)
        assert await next_of(session, Resumed) == Resumed(9, False)
        assert session.peers == (client.Peer("peer", False),)
        got += [(await next_of(session, Message)).seq for _ in range(2)]
        await conn.message(5)  # below 9: already past it
        await conn.message(10)
        got.append((await next_of(session, Message)).seq)
        assert got == [1, 2, 3, 4, 9, 10]
        assert session.last_seq == 10 and session.save()["last_seq"] == 10


async def test_unacknowledged_sends_are_resent_with_their_mid_after_a_resume(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeServer()
    seqs: dict[str, int] = {}
    async with resumed_fake(fake) as (session, conn):

        async def send(data: str) -> None:
            seqs[data] = await session.send(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "x")
            first = await conn.expect("message:send")  # written, never acknowledged
            assert first["id"] == first["mid"] and first["data"] == "x"
            fake.refuse.append(ConnectionLost("down"))
            await conn.close(1006)
            assert await next_of(session, StateChanged) == StateChanged(State.RECONNECTING)
            nursery.start_soon(send, "y")  # queued while disconnected
            await trio.testing.wait_all_tasks_blocked()
            assert session.pending == 2
            conn = await fake.accept()
            await conn.resumed()
            again = await conn.expect("message:send")
            assert (again["mid"], again["data"]) == (first["mid"], "x")  # the same mid: stored once
            await nothing_from(conn)  # one send in flight at a time (Options.max_in_flight)
            await conn.reply(again, "message:ack", seq=5, duplicate=True)
            second = await conn.expect("message:send")
            assert second["data"] == "y" and second["mid"] != first["mid"]
            await conn.reply(second, "message:ack", seq=6)
    assert seqs == {"x": 5, "y": 6}
    assert session.pending == 0


async def nothing_from(conn: FakeConnection) -> None:
    """Assert that the client sends nothing (but pings) for a virtual minute."""
    with trio.move_on_after(60):
        frame = await conn.receive(patience=120)
        raise AssertionError(f"unexpected {frame}")


async def test_a_wider_window_pipelines_sends_in_order(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    async with resumed_fake(fake, max_in_flight=3) as (session, conn), trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(session.send, n)
            await trio.testing.wait_all_tasks_blocked()
        written = [await conn.expect("message:send") for _ in range(3)]
        assert [frame["data"] for frame in written] == [0, 1, 2]
        await nothing_from(conn)  # the fourth waits for room in the window
        await conn.reply(written[1], "message:ack", seq=2)
        assert (await conn.expect("message:send"))["data"] == 3
        nursery.cancel_scope.cancel()


async def test_sends_wait_out_rate_limits_and_bad_ones_fail(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    async with resumed_fake(fake) as (session, conn):
        outcomes: dict[str, object] = {}

        async def send(data: Any, key: str) -> None:
            try:
                outcomes[key] = await session.send(data)
            except RequestFailed as exc:
                outcomes[key] = exc.code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "a", "a")
            frame = await conn.expect("message:send")
            refused_at = trio.current_time()
            await conn.reply(frame, "error", code="rate_limited", message="limit", retry_after=4.0)
            again = await conn.expect("message:send")
            assert again["mid"] == frame["mid"] and trio.current_time() - refused_at == pytest.approx(4.0)
            await conn.reply(again, "message:ack", seq=1)
            nursery.start_soon(send, [[[]]], "deep")
            bad = await conn.expect("message:send")
            await conn.reply(bad, "error", code="bad_request", message="data nested too deep")
        assert outcomes == {"a": 1, "deep": "bad_request"}
        assert session.pending == 0


async def test_the_outbox_bound_raises_past_it(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer(refuse=[ConnectionLost("down")] * 50)
    async with client.resume("ws://fake/ws", SAVED, fake.options(max_pending=2)) as session:
        async with trio.open_nursery() as nursery:
            for n in range(2):
                nursery.start_soon(session.send, n)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(OutboxFull), trio.fail_after(PATIENCE):
                await session.send(2)
            with pytest.raises(client.MessageTooLarge), trio.fail_after(PATIENCE):
                await session.send("x" * 70_000)  # over the default 65536 bytes: refused before queueing
            assert session.pending == 2
            nursery.cancel_scope.cancel()
        assert session.pending == 2  # cancelled sends stay queued, as the save shows
        assert sorted(p["data"] for p in session.save()["pending"]) == [0, 1]


async def test_a_silent_connection_is_dropped_and_resumed(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    async with resumed_fake(fake, ping_interval=5.0, ping_timeout=3.0) as (session, conn):
        start = trio.current_time()
        ping = await conn.receive(skip_pings=False)
        assert ping["type"] == "ping" and trio.current_time() - start == pytest.approx(5.0)
        await conn.event("pong", ts=1)
        # Nothing more from the server: 8 s after the pong the connection is given up.
        assert await next_of(session, StateChanged) == StateChanged(State.RECONNECTING)
        assert trio.current_time() - start == pytest.approx(13.0)
        conn = await fake.accept()
        await conn.resumed()
        await session.wait_open()


async def test_auth_sends_the_token_and_refreshes_it_before_it_expires(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    tokens = iter(f"jwt-{n}" for n in range(1, 10))

    async def token() -> str:
        return next(tokens)

    server_ms = 1_800_000_000_000
    async with client.resume("ws://fake/ws", SAVED, fake.options(token=token)) as session:
        conn = await fake.accept()
        hello = await conn.expect("hello")
        limits = {"max_message_bytes": 300, "history_size": 100, "session_idle_timeout": 1, "session_ttl": 1}
        await conn.reply(
            hello, "welcome", protocol="1.1", server="tandem/x", auth="required", limits=limits, time=server_ms
        )
        auth = await conn.expect("auth")
        assert auth["token"] == "jwt-1"
        start = trio.current_time()
        await conn.reply(auth, "auth:ok", user="alice", expires_at=server_ms + 100_000)
        await conn.resumed()
        await session.wait_open()
        with pytest.raises(client.MessageTooLarge), trio.fail_after(PATIENCE):  # the limit the welcome gave
            await session.send("x" * 300)
        refresh = await conn.expect("auth", patience=100.0)  # 80 s in: 100 s left less min(30 s, 20 %)
        assert refresh["token"] == "jwt-2" and trio.current_time() - start == pytest.approx(80.0)
        await conn.reply(refresh, "auth:ok", user="alice", expires_at=server_ms + 400_000)
        # The server says the token ran out and closes with 1008: reconnect with a fresh token.
        await conn.event("error", code="unauthorized", message="token expired")
        await conn.close(1008)
        conn = await fake.accept()
        await conn.reply(await conn.expect("hello"), "welcome", protocol="1.1", auth="required", time=server_ms)
        auth = await conn.expect("auth")
        assert auth["token"] == "jwt-3"
        await conn.reply(auth, "auth:ok", user="alice", expires_at=server_ms + 600_000)
        await conn.resumed()
        await session.wait_open()


async def test_a_version_1_server_is_not_sent_auth(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()

    async def token() -> str:
        raise AssertionError("no token is needed")

    async with client.resume("ws://fake/ws", SAVED, fake.options(token=token)) as session:
        conn = await fake.accept()
        hello = await conn.expect("hello")
        await conn.reply(hello, "error", code="unknown_type", message="unknown type 'hello'")
        await conn.resumed()
        await session.wait_open()


async def test_create_waits_for_the_session_and_a_failed_join_raises(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer(refuse=[ConnectionLost("not yet")])

    async def serve_create() -> None:
        conn = await fake.accept()
        request = await conn.expect("session:create")
        await conn.reply(request, "session:created", code=CODE, client_id="me", token="tok", expires_at=1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_create)
        async with client.create("ws://fake/ws", fake.options()) as session:
            assert (session.code, session.client_id, session.state, session.peers) == (CODE, "me", State.OPEN, ())
            assert session.save() == {**SAVED, "pending": []}

    async def refuse_join() -> None:
        conn = await fake.accept()
        request = await conn.expect("session:join")
        assert request["code"] == "WXYZ2345"
        await conn.reply(request, "error", code="not_found", message="no such session, or it expired")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse_join)
        with pytest.raises(RequestFailed) as failed:
            async with client.join("ws://fake/ws", "WXYZ2345", fake.options()):
                raise AssertionError("entered")
        assert failed.value.code == "not_found"


async def test_an_exception_in_the_block_comes_out_as_raised(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeServer()
    with pytest.raises(KeyError):
        async with resumed_fake(fake):
            raise KeyError("mine")
    with pytest.raises(trio.TooSlowError):  # create's open_timeout: nobody answers
        async with client.create("ws://fake/ws", fake.options(open_timeout=5.0)):
            raise AssertionError("entered")


# --- real servers ----------------------------------------------------------------------


def fast(**overrides: Any) -> Options:
    """Options for real servers: short backoff, so a restart is noticed within a second or so."""
    settings: dict[str, Any] = {"backoff": Backoff(base=0.1, cap=1.0), "open_timeout": PATIENCE}
    return Options(**{**settings, **overrides})


async def messages(session: Session, count: int) -> list[Message]:
    """The next `count` messages of `session` (other events skipped)."""
    return [await next_of(session, Message) for _ in range(count)]


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds (at most PATIENCE s)."""
    for _ in range(int(PATIENCE / 0.01)):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"never {what}")


async def wait_pending(session: Session, count: int) -> None:
    """Wait until `count` sends are queued (the tasks that send them have run)."""
    await wait_until(lambda: session.pending >= count, f"{count} sends queued")


@dataclass
class Recorder:
    """A connector around the real one: records attempts and closes, and can hide acks from the client."""

    url: str | None = None  # where to connect instead of the session's URL (a load balancer's choice)
    hide_acks: int = 0  # how many of the next `message:ack` frames the client never sees
    attempts: list[float] = field(default_factory=list)
    closes: list[tuple[float, int]] = field(default_factory=list)

    def connector(self, url: str, connect_timeout: float) -> AbstractAsyncContextManager[Transport]:
        return self._connect(self.url or url, connect_timeout)

    async def ack_hidden(self) -> None:
        """Wait until every ack to hide was hidden (it arrived)."""
        await wait_until(lambda: not self.hide_acks, "the ack to hide came")

    @asynccontextmanager
    async def _connect(self, url: str, connect_timeout: float) -> AsyncIterator[Transport]:
        self.attempts.append(trio.current_time())
        async with client.websocket_connector(url, connect_timeout) as transport:
            yield _Recording(transport, self)


class _Recording:
    def __init__(self, inner: Transport, recorder: Recorder) -> None:
        self._inner = inner
        self._recorder = recorder

    async def send(self, text: str) -> None:
        await self._inner.send(text)

    async def receive(self) -> str:
        for _ in range(1000):
            try:
                text = await self._inner.receive()
            except TransportClosed as exc:
                self._recorder.closes.append((trio.current_time(), exc.code))
                raise
            if self._recorder.hide_acks and json.loads(text).get("type") == "message:ack":
                self._recorder.hide_acks -= 1
                continue
            return text
        raise AssertionError("1000 frames hidden")


@BOTH_STORES
async def test_create_join_and_exchange(tandem: Server) -> None:
    async with client.create(tandem.url, fast()) as a:
        assert a.state is State.OPEN and len(a.code) == 8 and not a.peers
        typed = f" {a.code[:4].lower()}-{a.code[4:]} "  # as a person types it: only the client forgives the "-"
        async with client.join(tandem.url, typed, fast()) as b:
            assert b.code == a.code and b.peers == (client.Peer(a.client_id, True),)
            assert (await next_of(a, client.Paired)).peers == (client.Peer(b.client_id, True),)
            with trio.fail_after(PATIENCE):
                assert await a.send({"text": "hello"}) == 1
                assert await b.send(["back", 2]) == 2
                assert await a.send("again") == 3
            got_b = await messages(b, 2)
            assert [(m.seq, m.data, m.sender) for m in got_b] == [
                (1, {"text": "hello"}, a.client_id),
                (3, "again", a.client_id),
            ]
            got_a = await messages(a, 1)
            assert (got_a[0].seq, got_a[0].data, got_a[0].sender) == (2, ["back", 2], b.client_id)
            assert got_a[0].mid is not None and got_b[0].ts > 0
            # B's block ends without leaving: B goes offline and stays a member.
        assert await next_of(a, client.Presence) == client.Presence(b.client_id, False)
        assert a.peers == (client.Peer(b.client_id, False),)
        async with client.resume(tandem.url, b.save(), fast()) as b:
            assert await next_of(a, client.Presence) == client.Presence(b.client_id, True)
            with trio.fail_after(PATIENCE):
                await b.leave()  # for good
            assert b.state is State.CLOSED and "left" in str(b.error)
            with pytest.raises(SessionClosed), trio.fail_after(PATIENCE):
                await b.send("after leaving")
            assert await next_of(a, client.PeerLeft) == client.PeerLeft(b.client_id)
            assert not a.peers
    with pytest.raises(RequestFailed) as failed:
        async with client.join(tandem.url, "ZZZZ9999", fast()):
            raise AssertionError("joined a session that does not exist")
    assert failed.value.code == "not_found"


@BOTH_STORES
async def test_kill_9_and_restart_lose_nothing_and_store_nothing_twice(tandem: Server) -> None:
    recorder = Recorder()
    async with (
        client.create(tandem.url, fast(connector=recorder.connector, max_pending=3)) as a,
        client.join(tandem.url, a.code, fast()) as b,
    ):
        acks: dict[str, int] = {}

        async def send(data: str) -> None:
            with trio.fail_after(3 * PATIENCE):
                acks[data] = await a.send(data)

        async with trio.open_nursery() as nursery:
            await send("one")
            recorder.hide_acks = 1  # "two" is stored but A never hears so
            nursery.start_soon(send, "two")
            assert [m.data for m in await messages(b, 2)] == ["one", "two"]
            await recorder.ack_hidden()  # B may see "two" before A's ack arrives
            tandem.kill()
            for n, data in enumerate(["three", "four"], start=2):  # queued while the server is down
                nursery.start_soon(send, data)
                await wait_pending(a, n)
            with pytest.raises(OutboxFull), trio.fail_after(PATIENCE):  # "two", "three", "four" wait
                await a.send("five")
            assert a.state is State.RECONNECTING
            tandem.start()  # same port, same DATA_DIR (or the same Redis)
        # "two" came back as a duplicate of seq 2; the others were stored once each, in order.
        assert acks == {"one": 1, "two": 2, "three": 3, "four": 4}
        assert [(m.seq, m.data) for m in await messages(b, 2)] == [(3, "three"), (4, "four")]
        with trio.fail_after(PATIENCE):
            assert await b.send("b") == 5
        assert [(m.seq, m.data) for m in await messages(a, 1)] == [(5, "b")]
        with trio.move_on_after(0.5):
            extra = await next_of(b, Message)
            raise AssertionError(f"delivered twice: {extra}")
        assert stored(tandem, a.code)["messages"] == 5
        assert len(recorder.attempts) >= 2


@BOTH_STORES
async def test_a_sigterm_drain_1012_is_followed_by_an_immediate_reconnect(
    tandem_factory: ServerFactory, store: str, tmp_path: Path
) -> None:
    first = tandem_factory(data_dir=tmp_path / "one")
    recorder = Recorder()
    # A reconnect that waited its backoff would wait 1.998 s: 1012 must not (the bounds below leave room for load).
    options = fast(connector=recorder.connector, backoff=Backoff(base=2.0, cap=2.0), random=lambda: 0.999)
    async with client.create(first.url, options) as a:
        with trio.fail_after(PATIENCE):
            assert await a.send("before") == 1
        second = None
        if store == "redis":  # another instance on the same Redis, where the load balancer now sends us
            second = tandem_factory(data_dir=tmp_path / "two")
            recorder.url = second.url
        first.signal(signal.SIGTERM)
        await until_state(a, State.RECONNECTING)
        closed_at, code = recorder.closes[-1]
        assert code == 1012
        if second is not None:  # Redis: resumed on the other instance within moments
            await until_state(a, State.OPEN)
            assert trio.current_time() - closed_at < 1.5
        assert await wait_exit(first) == 0
        await wait_until(lambda: any(t >= closed_at for t in recorder.attempts), "the client retried")
        retried_at = min(t for t in recorder.attempts if t >= closed_at)
        assert retried_at - closed_at < 1.0  # the first retry went out at once
        if second is None:  # SQLite: the same server comes back on its data
            first.start()
            await until_state(a, State.OPEN)
        assert await next_of(a, Resumed) == Resumed(1, True)
        with trio.fail_after(PATIENCE):
            assert await a.send("after") == 2


async def in_a_task(
    opening: AbstractAsyncContextManager[Session], *, task_status: trio.TaskStatus[tuple[Session, Ender]]
) -> None:
    """Hold a session open in a task of its own until the `Ender` it starts with is awaited."""
    stop, stopped = trio.Event(), trio.Event()

    async def end() -> None:
        stop.set()
        with trio.fail_after(PATIENCE):
            await stopped.wait()

    try:
        async with opening as session:
            task_status.started((session, end))
            await stop.wait()
    finally:
        stopped.set()


@BOTH_STORES
async def test_a_restarted_client_carries_on_from_its_saved_state(tandem: Server) -> None:
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        a, end_first_life = await nursery.start(
            in_a_task, client.create(tandem.url, fast(connector=recorder.connector))
        )
        async with client.join(tandem.url, a.code, fast()) as b:
            with trio.fail_after(PATIENCE):
                await b.send("b1")
                assert [m.data for m in await messages(a, 1)] == ["b1"]
                await b.send("b2")  # reaches A, but A stops before the application took it
                recorder.hide_acks = 1
                with trio.move_on_after(1.0):
                    await a.send("a1")  # stored; its ack hidden: still pending when A saves
                assert [m.data for m in await messages(b, 1)] == ["a1"]
                await recorder.ack_hidden()
            saved = json.loads(json.dumps(a.save()))
            assert (saved["code"], saved["client_id"]) == (a.code, a.client_id)
            assert saved["last_seq"] == 1 and [p["data"] for p in saved["pending"]] == ["a1"]
            await end_first_life()  # A's process ends
            assert await next_of(b, client.Presence) == client.Presence(str(saved["client_id"]), False)
            with trio.fail_after(PATIENCE):
                assert await b.send("b3") == 4
            async with client.resume(tandem.url, saved, fast()) as again:
                assert (again.code, again.client_id, again.pending) == (a.code, a.client_id, 1)
                got: list[Message] = []
                acked: list[Acked] = []
                for _ in range(20):
                    with trio.fail_after(PATIENCE):
                        event = await again.next_event()
                    if isinstance(event, Resumed):
                        assert event == Resumed(4, True)
                    got += [event] if isinstance(event, Message) else []
                    acked += [event] if isinstance(event, Acked) else []
                    if len(got) == 2 and acked:
                        break
                assert [(m.seq, m.data) for m in got] == [(2, "b2"), (4, "b3")]  # b1 not again
                assert acked == [Acked(saved["pending"][0]["mid"], 3, True)]  # a1 resent, stored once
                assert again.pending == 0 and again.save()["last_seq"] == 4
                with trio.move_on_after(0.5):
                    extra = await next_of(b, Message)
                    raise AssertionError(f"delivered twice: {extra}")
                assert stored(tandem, a.code)["messages"] == 4


@BOTH_STORES
async def test_rate_limited_sends_wait_retry_after_and_keep_their_order(tandem_factory: ServerFactory) -> None:
    limits = {"RATE_LIMIT_ENABLED": "1", "RATE_LIMIT_MESSAGES_USER": "3/1", "RATE_LIMIT_MESSAGES_IP": "off"}
    server = tandem_factory(**limits, HASH_KEY=f"client-test-{secrets.token_hex(8)}")  # limiter keys of its own
    async with client.create(server.url, fast()) as a, client.join(server.url, a.code, fast()) as b:
        acks: dict[int, int] = {}

        async def send(n: int) -> None:
            with trio.fail_after(PATIENCE):
                acks[n] = await a.send(n)

        def queued(count: int) -> Callable[[], bool]:
            return lambda: a.pending + len(acks) >= count

        async with trio.open_nursery() as nursery:
            for n in range(8):  # 3 a second: most of them are refused at first
                nursery.start_soon(send, n)
                await wait_until(queued(n + 1), f"send {n} queued")
        assert acks == {n: n + 1 for n in range(8)}  # each stored once, in the order sent
        assert [(m.seq, m.data) for m in await messages(b, 8)] == [(n + 1, n) for n in range(8)]
        refused = [e for e in await events_now(a) if isinstance(e, client.ServerError)]
        assert refused and all(e.code == "rate_limited" and e.retry_after for e in refused)
        assert a.state is State.OPEN


async def events_now(session: Session) -> list[client.Event]:
    """The events waiting in the session's buffer now."""
    found: list[client.Event] = []
    for _ in range(1000):
        with trio.move_on_after(0.05) as waited:
            found.append(await session.next_event())
        if waited.cancelled_caught:
            break
    return found


async def test_1009_drops_the_oversized_send_and_the_session_goes_on(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(MAX_MESSAGE_BYTES="1024")
    recorder = Recorder()
    async with (
        client.create(server.url, fast(connector=recorder.connector)) as a,
        client.join(server.url, a.code, fast()) as b,
    ):
        with pytest.raises(client.MessageTooLarge), trio.fail_after(PATIENCE):
            await a.send("x" * 2000)  # 65536 is the client's default: the server closes with 1009
        with trio.fail_after(PATIENCE):
            assert await a.send("small") == 1
        assert [m.data for m in await messages(b, 1)] == ["small"]
        assert stored(server, a.code)["messages"] == 1
        with pytest.raises(client.MessageTooLarge), trio.fail_after(PATIENCE):
            await a.send("x" * 2000)  # refused by the client now, without a second 1009
        assert len(recorder.attempts) == 2 and a.state is State.OPEN


async def test_no_retry_after_1008(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(MAX_CONSECUTIVE_ERRORS="1")
    recorder = Recorder()
    async with client.create(server.url, fast(connector=recorder.connector)) as a:
        nested: Any = 0
        for _ in range(300):  # deeper than the 254 levels the server accepts: bad_request, then 1008
            nested = [nested]
        with pytest.raises(RequestFailed) as failed, trio.fail_after(PATIENCE):
            await a.send(nested)
        assert failed.value.code == "bad_request"
        error = await closed_with(a)
        assert isinstance(error, ConnectionLost) and error.close_code == 1008
        await trio.sleep(1.0)  # a retry would have gone out within 0.1 s
        assert len(recorder.attempts) == 1


async def test_the_readme_example_works_as_written(tandem: Server) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### In Python: `client.py`\n", 1)[1].split("\n## ", 1)[0]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"ws://127.0.0.1:3001/ws"' in example
    script = example.replace('"ws://127.0.0.1:3001/ws"', repr(tandem.url))
    env = {**base_env(), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", script]
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["stored as seq 1", "1 {'text': 'hello'}"]


async def test_authentication_against_a_real_server_refreshes_before_expiry(tandem_factory: ServerFactory) -> None:
    """Protocol 1.1 auth: the token source is asked on connect and again before the token expires."""
    settings = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "AUTH_ISSUER": ISSUER, "AUTH_LEEWAY": "0"}
    server = tandem_factory(**settings)
    asked: list[float] = []

    async def short_lived() -> str:  # 4 s tokens: refreshed about a second before each expires
        asked.append(trio.current_time())
        return jwt_token(SECRET, claims(sub="ana", ttl=4))

    async def long_lived() -> str:
        return jwt_token(SECRET, claims(sub="ben"))

    recorder = Recorder()
    async with (
        client.create(server.url, fast(token=short_lived, connector=recorder.connector)) as a,
        client.join(server.url, a.code, fast(token=long_lived)) as b,
    ):
        with trio.fail_after(PATIENCE):
            assert await a.send("one") == 1
        await trio.sleep(5.5)  # past the first token's expiry: refreshed, so never closed with 1008
        with trio.fail_after(PATIENCE):
            assert await a.send("two") == 2
            assert [(await next_of(b, Message)).data for _ in range(2)] == ["one", "two"]
        assert a.state is State.OPEN and len(asked) >= 2
        assert len(recorder.attempts) == 1  # refreshed on its connection, never closed and reconnected
    with pytest.raises(RequestFailed) as refused:  # no token source: the server wants one
        async with client.create(server.url, fast()):
            pass
    assert refused.value.code == "unauthorized"
