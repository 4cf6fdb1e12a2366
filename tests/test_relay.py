"""End-to-end tests of the relay against a real `python server.py` (PROTOCOL.md).

Every test talks to a real server process over real WebSockets and asserts
what a client can observe: replies, events, close codes, HTTP refusals, and
(for "nothing stays behind") what the store still holds. Every test runs
once per session store (`store` in conftest.py): SQLite and Redis.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from helpers import (
    BOTH_STORES,
    Client,
    Server,
    ServerFactory,
    assert_alive,
    assert_ms_near_now,
    assert_no_trace,
    connect,
    frames_until_close,
    now_ms,
    paired,
    resume,
    stored,
)
from trio_websocket import ConnectionRejected

pytestmark = BOTH_STORES

CODE_CHARS = frozenset("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
DATA_KINDS: list[Any] = [
    {"text": "héllo wörld ✓ 🎉", "nested": {"list": [1, 2.5, None, True, False, "x"], "empty": {}}},
    [1, "two", 3.25, None, [], {"k": "v"}],
    'plain string with "quotes", \\ backslash and \n newline',
    0,
    -12345678901234,
    3.141592653589793,
    True,
    False,
    None,
    {},
    [],
    "",
]


# --- helpers ------------------------------------------------------------------


def assert_valid_code(code: object) -> None:
    assert isinstance(code, str)
    assert 6 <= len(code) <= 12, code
    assert CODE_CHARS.issuperset(code), code


def clients_of(frame: dict[str, Any]) -> dict[str, bool]:
    """`clients` as {client_id: online}, checking its shape."""
    clients = frame["clients"]
    assert isinstance(clients, list)
    result: dict[str, bool] = {}
    for entry in clients:
        assert set(entry) == {"client_id", "online"}, entry
        assert isinstance(entry["online"], bool)
        result[entry["client_id"]] = entry["online"]
    assert len(result) == len(clients), clients
    return result


async def expect_error(client: Client, frame: dict[str, Any] | str, code: str, rid: Any = None) -> dict[str, Any]:
    """Send `frame` as is; the reply is an `error` with `code`, echoing `rid` (absent when None)."""
    await client.send(frame)
    reply = await client.recv()
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"], reply
    if rid is None:
        assert "id" not in reply, reply
    else:
        assert reply["id"] == rid, reply
        assert type(reply["id"]) is type(rid), reply
    return reply


async def expect_message(client: Client, code: str, seq: int, sender: str, data: Any) -> None:
    frame = await client.expect("message")
    assert set(frame) == {"type", "code", "seq", "from", "data", "ts"}, frame
    assert frame["code"] == code
    assert frame["seq"] == seq, frame
    assert frame["from"] == sender, frame
    assert frame["data"] == data, frame
    assert type(frame["data"]) is type(data), frame
    assert_ms_near_now(frame["ts"])


def send_frame_of_bytes(size: int) -> str:
    """A valid `message:send` frame of exactly `size` UTF-8 bytes, with fewer characters than bytes."""
    head, tail = '{"type":"message:send","id":1,"data":"', '"}'
    room = size - len(head) - len(tail)
    wide = room // 4  # "é" is 2 bytes: half the payload in multi-byte characters
    text = head + "é" * wide + "a" * (room - 2 * wide) + tail
    assert len(text.encode()) == size and len(text) < size
    return text


# --- 1. create, join, pairing, messages -----------------------------------------


async def test_create_join_pair_and_message_both_ways(tandem: Server) -> None:
    async with connect(tandem) as a, connect(tandem) as b:
        created = await a.create()
        code = created["code"]
        assert_valid_code(code)
        assert isinstance(created["client_id"], str) and created["client_id"]
        assert isinstance(created["token"], str) and len(created["token"]) >= 22  # >= 128 bits in base64
        assert isinstance(created["expires_at"], int) and created["expires_at"] > now_ms()

        joined = await b.join(code.lower())  # codes are case-insensitive
        assert joined["code"] == code
        assert isinstance(joined["client_id"], str) and joined["client_id"] != created["client_id"]
        assert isinstance(joined["token"], str) and joined["token"] != created["token"]
        assert joined["last_seq"] == 0
        a_id, b_id = created["client_id"], joined["client_id"]
        assert clients_of(joined) == {a_id: True, b_id: True}

        for client in (a, b):
            paired_frame = await client.expect("session:paired")
            assert paired_frame["code"] == code
            assert "id" not in paired_frame
            assert clients_of(paired_frame) == {a_id: True, b_id: True}

        seq = 0
        for data in DATA_KINDS:  # a to b: acks count 1..N in order
            seq += 1
            assert await a.message(data) == seq
            await expect_message(b, code, seq, a_id, data)
        for data in DATA_KINDS[:3]:  # and b to a, continuing the same sequence
            seq += 1
            assert await b.message(data) == seq
            await expect_message(a, code, seq, b_id, data)

        await a.nothing()  # no echo of a's own messages
        await b.nothing()


async def test_request_ids_are_echoed_as_sent(tandem: Server) -> None:
    async with connect(tandem) as a:
        for rid in ("x", "i" * 64, 0, -7, 2**60):
            await a.send({"type": "ping", "id": rid})
            reply = await a.expect("pong")
            assert reply["id"] == rid and type(reply["id"]) is type(rid)
        await a.send({"type": "ping"})
        reply = await a.expect("pong")
        assert "id" not in reply
        assert_ms_near_now(reply["ts"])


# --- 2. store and forward ------------------------------------------------------------


async def test_messages_sent_before_anyone_joined_are_forwarded_on_join(tandem: Server) -> None:
    async with connect(tandem) as a, connect(tandem) as b:
        created = await a.create()
        code, a_id = created["code"], created["client_id"]
        sent = [{"n": 1}, "two", [3]]
        assert [await a.message(data) for data in sent] == [1, 2, 3]

        joined = await b.join(code)
        assert joined["last_seq"] == 3
        for seq, data in enumerate(sent, 1):
            await expect_message(b, code, seq, a_id, data)
        paired_frame = await b.expect("session:paired")
        assert clients_of(paired_frame) == {a_id: True, joined["client_id"]: True}
        await b.nothing()

        await a.expect("session:paired")
        await a.nothing()  # a does not get its own stored messages back


# --- 3. errors ---------------------------------------------------------------------------


async def test_third_join_is_session_full(tandem: Server) -> None:
    async with paired(tandem) as (a, _b, created, _joined), connect(tandem) as c:
        await expect_error(c, {"type": "session:join", "id": "j3", "code": created["code"]}, "session_full", "j3")
        await assert_alive(c)
        assert await c.create()  # c is in no session: it may start its own
        await a.nothing()


async def test_join_of_unknown_code_is_not_found(tandem: Server) -> None:
    async with connect(tandem) as c:
        await expect_error(c, {"type": "session:join", "id": 5, "code": "ZZZZZZZZ"}, "not_found", 5)
        await assert_alive(c)


async def test_create_or_join_while_in_a_session_is_already_in_session(tandem: Server) -> None:
    async with paired(tandem) as (a, b, created, _joined), connect(tandem) as c:
        other = await c.create()
        await expect_error(a, {"type": "session:create", "id": "c1"}, "already_in_session", "c1")
        await assert_alive(a)
        await expect_error(a, {"type": "session:join", "id": "j1", "code": other["code"]}, "already_in_session", "j1")
        await assert_alive(a)
        await expect_error(b, {"type": "session:join", "id": 9, "code": created["code"]}, "already_in_session", 9)
        await assert_alive(b)
        assert await a.message("still paired") == 1  # the failed requests changed nothing
        await expect_message(b, created["code"], 1, created["client_id"], "still paired")
        await c.nothing()


async def test_send_or_leave_without_a_session_is_not_in_session(tandem: Server) -> None:
    async with connect(tandem) as c:
        await expect_error(c, {"type": "message:send", "id": "m", "data": 1}, "not_in_session", "m")
        await assert_alive(c)
        await expect_error(c, {"type": "session:leave", "id": 2}, "not_in_session", 2)
        await assert_alive(c)


async def test_resume_with_wrong_credentials_is_not_found(tandem: Server) -> None:
    # One answer for an unknown code and for wrong credentials (docs/security.md).
    async with paired(tandem) as (a, b, created, joined), connect(tandem) as c:
        code = created["code"]
        wrong_token = {
            "type": "session:resume",
            "id": "r1",
            "code": code,
            "client_id": joined["client_id"],
            "token": created["token"],  # a real token, but a's, not b's
            "last_seq": 0,
        }
        await expect_error(c, wrong_token, "not_found", "r1")
        await assert_alive(c)
        unknown_client = {**wrong_token, "id": "r2", "client_id": "no-such-client", "token": joined["token"]}
        await expect_error(c, unknown_client, "not_found", "r2")
        await assert_alive(c)
        # Nothing moved: both members are still connected on their own sockets.
        await a.nothing(0.1)
        await b.nothing(0.1)
        assert await b.message("ok") == 1
        await expect_message(a, code, 1, joined["client_id"], "ok")


@pytest.mark.parametrize(
    ("frame", "rid"),
    [
        pytest.param("{not json", None, id="malformed-json"),
        pytest.param("", None, id="empty-frame"),
        pytest.param("[1, 2]", None, id="array"),
        pytest.param("42", None, id="number"),
        pytest.param('"ping"', None, id="string"),
        pytest.param({"id": "n"}, "n", id="no-type"),
        pytest.param({"type": 7, "id": "t"}, "t", id="type-not-string"),
        pytest.param({"type": "session:join", "id": 1}, 1, id="join-no-code"),
        pytest.param({"type": "session:join", "id": 2, "code": 12345678}, 2, id="join-code-number"),
        pytest.param({"type": "session:join", "id": 3, "code": "ABC"}, 3, id="join-code-short"),
        pytest.param({"type": "session:join", "id": 4, "code": "ABCDEFGHJKMNP"}, 4, id="join-code-long"),
        pytest.param({"type": "session:join", "id": 5, "code": "ABCDEI"}, 5, id="join-code-letter-I"),
        pytest.param({"type": "session:join", "id": 6, "code": "abcdel"}, 6, id="join-code-letter-l"),
        pytest.param({"type": "session:join", "id": 7, "code": "ABC-EF"}, 7, id="join-code-dash"),
        pytest.param({"type": "message:send", "id": 8}, 8, id="send-no-data"),
        pytest.param(
            {"type": "session:resume", "id": 9, "code": "ABCDEF", "client_id": "x", "token": "y", "last_seq": "0"},
            9,
            id="resume-last-seq-string",
        ),
        pytest.param(
            {"type": "session:resume", "id": 10, "code": "ABCDEF", "client_id": "x", "token": "y", "last_seq": -1},
            10,
            id="resume-last-seq-negative",
        ),
        pytest.param(
            {"type": "session:resume", "id": 11, "code": "ABCDEF", "client_id": "x", "token": "y", "last_seq": True},
            11,
            id="resume-last-seq-bool",
        ),
        pytest.param(
            {"type": "session:resume", "id": 12, "code": "ABCDEF", "client_id": 1, "token": "y", "last_seq": 0},
            12,
            id="resume-client-id-number",
        ),
        pytest.param(
            {"type": "session:resume", "id": 13, "code": "ABCDEF", "client_id": "x", "last_seq": 0},
            13,
            id="resume-no-token",
        ),
        pytest.param({"type": "ping", "id": ""}, None, id="id-empty-not-echoed"),
        pytest.param({"type": "ping", "id": "i" * 65}, None, id="id-too-long-not-echoed"),
        pytest.param({"type": "ping", "id": 1.5}, None, id="id-float-not-echoed"),
        pytest.param({"type": "ping", "id": True}, None, id="id-bool-not-echoed"),
        pytest.param({"type": "ping", "id": ["x"]}, None, id="id-list-not-echoed"),
    ],
)
async def test_malformed_frames_are_bad_request(tandem: Server, frame: dict[str, Any] | str, rid: Any) -> None:
    async with connect(tandem) as c:
        await expect_error(c, frame, "bad_request", rid)
        await assert_alive(c)


async def test_unknown_type_is_unknown_type(tandem: Server) -> None:
    async with connect(tandem) as c:
        await expect_error(c, {"type": "session:destroy", "id": "u1"}, "unknown_type", "u1")
        await assert_alive(c)
        await expect_error(c, {"type": "PING"}, "unknown_type")
        await assert_alive(c)


# --- 4. repeated errors ----------------------------------------------------------------


async def test_consecutive_errors_close_with_1008_and_a_valid_request_resets_the_count(
    tandem_factory: ServerFactory,
) -> None:
    server = tandem_factory(MAX_CONSECUTIVE_ERRORS="3")
    async with connect(server) as c:
        for _ in range(2):  # two errors, then a valid request (not a ping), twice over: still open
            await expect_error(c, "nope", "bad_request")
            await expect_error(c, {"type": "bogus", "id": 1}, "unknown_type", 1)
            assert (await c.request("session:create"))["type"] == "session:created"
            assert (await c.request("session:leave"))["type"] == "session:left"
        for _ in range(3):
            await c.send("nope")
        frames, close_code = await frames_until_close(c, 5)
        assert close_code == 1008
        assert [f["type"] for f in frames] == ["error"] * len(frames) and len(frames) <= 3


# --- 5. leave -----------------------------------------------------------------------------


async def test_leave_notifies_the_peer_and_the_last_leave_ends_the_session(tandem: Server) -> None:
    async with paired(tandem) as (a, b, created, joined), connect(tandem) as c:
        code = created["code"]
        assert await a.message("before") == 1
        await expect_message(b, code, 1, created["client_id"], "before")

        left = await b.request("session:leave")
        assert left["type"] == "session:left" and left["code"] == code, left
        peer_left = await a.expect("session:peer_left")
        assert peer_left == {"type": "session:peer_left", "client_id": joined["client_id"]}
        await b.nothing(0.1)
        await expect_error(b, {"type": "message:send", "id": 1, "data": 1}, "not_in_session", 1)

        assert await a.message("alone") == 2  # the session lives on with one member
        await b.nothing(0.1)

        left = await a.request("session:leave")
        assert left["type"] == "session:left" and left["code"] == code, left
        await expect_error(c, {"type": "session:join", "id": "late", "code": code}, "not_found", "late")
        await expect_error(b, {"type": "session:join", "id": "back", "code": code}, "not_found", "back")
        assert_no_trace(tandem, [code])
        await assert_alive(a)
        assert await a.create()  # a is free again


# --- 6. drop and resume ----------------------------------------------------------------


async def test_dropped_member_resumes_and_gets_exactly_the_missed_messages(tandem: Server) -> None:
    async with connect(tandem) as a:
        created = await a.create()
        code, a_id = created["code"], created["client_id"]
        async with connect(tandem) as b:
            joined = await b.join(code)
            b_id = joined["client_id"]
            await b.expect("session:paired")
            await a.expect("session:paired")
            assert await a.message("seen") == 1
            await expect_message(b, code, 1, a_id, "seen")
            assert await b.message("own") == 2
            await expect_message(a, code, 2, b_id, "own")
        b_creds = {"code": code.lower(), "client_id": b_id, "token": joined["token"]}

        presence = await a.expect("session:presence")
        assert presence == {"type": "session:presence", "client_id": b_id, "online": False}
        missed = [{"m": 3}, "m4", [5]]
        assert [await a.message(data) for data in missed] == [3, 4, 5]

        async with connect(tandem) as b2:
            # b saw seq 1 from a; its own seq 2 is not replayed to it.
            resumed = await resume(b2, b_creds, 1, expect_resumed=False)
            assert resumed["type"] == "session:resumed", resumed
            assert resumed["code"] == code and resumed["client_id"] == b_id
            assert resumed["recovered"] is True and resumed["last_seq"] == 5
            assert clients_of(resumed) == {a_id: True, b_id: True}
            for seq, data in enumerate(missed, 3):
                await expect_message(b2, code, seq, a_id, data)
            await b2.nothing()
            presence = await a.expect("session:presence")
            assert presence == {"type": "session:presence", "client_id": b_id, "online": True}

            # Live again, both ways.
            assert await a.message("live") == 6
            await expect_message(b2, code, 6, a_id, "live")
            assert await b2.message("back") == 7
            await expect_message(a, code, 7, b_id, "back")

        assert (await a.expect("session:presence"))["online"] is False
        async with connect(tandem) as b3:
            resumed = await resume(b3, b_creds, 99, expect_resumed=False)  # above the newest seq: nothing to replay
            assert resumed["type"] == "session:resumed", resumed
            assert resumed["recovered"] is True and resumed["last_seq"] == 7
            await b3.nothing()
            assert (await a.expect("session:presence"))["online"] is True


async def test_resume_past_history_size_is_not_recovered_and_replays_the_newest(
    tandem_factory: ServerFactory,
) -> None:
    server = tandem_factory(HISTORY_SIZE="5")
    async with connect(server) as a:
        created = await a.create()
        code, a_id = created["code"], created["client_id"]
        async with connect(server) as b:
            joined = await b.join(code)
            await b.expect("session:paired")
            await a.expect("session:paired")
        assert (await a.expect("session:presence"))["online"] is False
        assert [await a.message(n) for n in range(1, 9)] == list(range(1, 9))

        async with connect(server) as b2:
            creds = {"code": code, "client_id": joined["client_id"], "token": joined["token"]}
            resumed = await resume(b2, creds, 0, expect_resumed=False)
            assert resumed["type"] == "session:resumed", resumed
            assert resumed["recovered"] is False and resumed["last_seq"] == 8
            for seq in range(4, 9):
                await expect_message(b2, code, seq, a_id, seq)
            await b2.nothing()


# --- 7. takeover -------------------------------------------------------------------------


async def test_resume_while_online_takes_over_and_closes_the_old_socket_with_1000(tandem: Server) -> None:
    async with paired(tandem) as (a, b, created, joined), connect(tandem) as b2:
        code, b_id = created["code"], joined["client_id"]
        resumed = await resume(b2, {**joined, "code": code}, 0, expect_resumed=False)
        assert resumed["type"] == "session:resumed", resumed
        assert resumed["client_id"] == b_id and resumed["last_seq"] == 0 and resumed["recovered"] is True
        assert clients_of(resumed) == {created["client_id"]: True, b_id: True}

        frames, close_code = await frames_until_close(b, 5)
        assert close_code == 1000
        assert frames == []

        assert (await a.expect("session:presence")) == {"type": "session:presence", "client_id": b_id, "online": True}
        assert await a.message("to the new socket") == 1
        await expect_message(b2, code, 1, created["client_id"], "to the new socket")
        assert await b2.message("from the new socket") == 2
        await expect_message(a, code, 2, b_id, "from the new socket")
        await a.nothing()


# --- 8 and 9. expiry, and nothing left in the store -----------------------------------


async def test_idle_session_expires_for_online_members_who_stay_connected(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(SESSION_IDLE_TIMEOUT="1", SWEEP_INTERVAL="0.1")
    async with paired(server) as (a, b, created, _joined), connect(server) as c:
        code = created["code"]
        assert await a.message("hi") == 1
        await b.expect("message")
        started = trio.current_time()
        for client in (a, b):
            client.patience = 10
            expired = await client.expect("session:expired")
            assert expired == {"type": "session:expired", "code": code, "reason": "idle"}
        assert trio.current_time() - started >= 0.8  # not before the idle timeout

        await expect_error(a, {"type": "message:send", "id": 1, "data": "x"}, "not_in_session", 1)
        await expect_error(a, {"type": "session:leave", "id": 2}, "not_in_session", 2)
        await expect_error(c, {"type": "session:join", "id": 3, "code": code}, "not_found", 3)
        await expect_error(b, {"type": "session:join", "id": 4, "code": code}, "not_found", 4)
        assert_no_trace(server, [code])

        fresh = await b.create()  # the socket stayed open and is free for a new session
        assert fresh["code"] != code
        await c.join(fresh["code"])
        await c.expect("session:paired")
        await b.expect("session:paired")
        await a.nothing(0.1)


async def test_session_expires_at_its_ttl_even_while_active(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(SESSION_IDLE_TIMEOUT="1", SESSION_TTL="1.5", SWEEP_INTERVAL="0.1")
    async with connect(server) as a, connect(server) as c:
        a.patience = 10
        created = await a.create()
        code = created["code"]
        started = trio.current_time()
        expired: dict[str, Any] | None = None
        replies: list[dict[str, Any]] = []
        with trio.fail_after(8):
            rid = 0
            while expired is None:  # a message every 0.3 s: the idle timeout never fires
                rid += 1
                await a.send({"type": "message:send", "id": rid, "data": rid})
                while True:
                    frame = await a.recv()
                    if frame["type"] == "session:expired":
                        expired = frame
                    else:
                        assert frame.get("id") == rid, frame
                        replies.append(frame)
                        break
                if expired is None:
                    with trio.move_on_after(0.3):
                        expired = await a.expect("session:expired")
        elapsed = trio.current_time() - started
        assert expired == {"type": "session:expired", "code": code, "reason": "ttl"}
        assert 1.4 <= elapsed < 3, elapsed
        assert len(replies) >= 4
        # Every message was acknowledged in order, except that the last one may
        # have raced the expiry.
        acks = [r for r in replies if r["type"] == "message:ack"]
        assert [r["seq"] for r in acks] == list(range(1, len(acks) + 1))
        assert replies[: len(acks)] == acks, replies
        assert len(acks) >= len(replies) - 1, replies
        if len(acks) < len(replies):
            assert replies[-1]["type"] == "error" and replies[-1]["code"] in ("not_found", "not_in_session")

        await expect_error(a, {"type": "message:send", "id": "after", "data": 1}, "not_in_session", "after")
        await expect_error(c, {"type": "session:join", "id": "j", "code": code}, "not_found", "j")
        assert_no_trace(server, [code])
        assert await a.create()


async def test_session_with_nobody_connected_still_expires(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(SESSION_IDLE_TIMEOUT="1", SWEEP_INTERVAL="0.1")
    async with connect(server) as a:
        created = await a.create()
        assert await a.message({"stored": True}) == 1
    code = created["code"]
    assert stored(server, code) == {"sessions": 1, "members": 1, "messages": 1}

    for _ in range(50):  # the sweeper removes it although nobody is there to tell
        if not stored(server, code)["sessions"]:
            break
        await trio.sleep(0.1)
    assert_no_trace(server, [code])

    async with connect(server) as a2:
        frame = {"type": "session:resume", "id": "r", "last_seq": 0}
        frame |= {k: created[k] for k in ("code", "client_id", "token")}
        await expect_error(a2, frame, "not_found", "r")
        await expect_error(a2, {"type": "session:join", "id": "j", "code": code}, "not_found", "j")
        await assert_alive(a2)


# --- 10. frames ---------------------------------------------------------------------------


async def test_binary_frame_closes_with_1003(tandem: Server) -> None:
    async with connect(tandem) as c:
        await c.create()
        await c.ws.send_message(b'{"type":"ping"}')
        frames, close_code = await frames_until_close(c, 5)
        assert close_code == 1003
        assert frames == []


async def test_frame_size_limit_counts_utf8_bytes(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(MAX_MESSAGE_BYTES="1024")
    async with connect(server) as a, connect(server) as b:
        created = await a.create()
        await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")

        exact = send_frame_of_bytes(1024)
        await a.send(exact)
        ack = await a.expect("message:ack")
        assert ack == {"type": "message:ack", "id": 1, "seq": 1}
        await expect_message(b, created["code"], 1, created["client_id"], orjson.loads(exact)["data"])

        await a.send(send_frame_of_bytes(1025))
        frames, close_code = await frames_until_close(a, 5)
        assert close_code == 1009
        assert frames == []
        assert (await b.expect("session:presence"))["online"] is False


async def test_huge_frame_closes_with_1009_promptly_and_the_server_keeps_serving(
    tandem_factory: ServerFactory,
) -> None:
    server = tandem_factory(MAX_MESSAGE_BYTES="1024")
    huge = orjson.dumps({"type": "message:send", "id": 1, "data": "x" * 2**20}).decode()
    with trio.fail_after(2):  # the close handshake completes: neither side is left hanging
        async with connect(server, max_message_size=2**22) as c:
            await c.create()
            await c.send(huge)
            frames, close_code = await frames_until_close(c, 2)
    assert close_code == 1009
    assert frames == []

    async with connect(server) as a, connect(server) as b:
        created = await a.create()
        await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
        assert await a.message("still serving") == 1
        await expect_message(b, created["code"], 1, created["client_id"], "still serving")


# --- 11. handshake: origin and subprotocol ----------------------------------------------


async def test_disallowed_origin_is_refused_with_403(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(ALLOWED_ORIGINS="https://good.example")
    with pytest.raises(ConnectionRejected) as refused:
        async with connect(server, extra_headers=[(b"Origin", b"https://evil.example")]):
            pytest.fail("the handshake should have been refused")
    assert refused.value.status_code == 403
    assert refused.value.body is not None
    body = orjson.loads(refused.value.body)
    assert isinstance(body, dict) and body

    async with connect(server, extra_headers=[(b"Origin", b"https://good.example")]) as c:
        await c.create()
        await assert_alive(c)


async def test_tandem_v1_subprotocol_is_selected_when_offered(tandem: Server) -> None:
    async with connect(tandem, subprotocols=["chat.v9", "tandem.v1"]) as c:
        assert c.ws.subprotocol == "tandem.v1"
        await c.create()
    async with connect(tandem) as c:
        assert c.ws.subprotocol is None  # not required
        await c.create()
