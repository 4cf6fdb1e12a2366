"""Idempotent sends (protocol 1.1, `mid`) against real servers, on both stores.

A resend with a `mid` the member already used is acknowledged with the stored
message's seq and `duplicate: true`, is never stored twice and never reaches
the peer twice: on one connection, after a reconnect, after `kill -9` and a
restart, and on another instance sharing the Redis.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from helpers import SHARED_REDIS_URL, STORES, Client, Server, ServerFactory, connect, paired

from protocol import Message, MessageAck, SendMessage, parse_request, serialize
from redis_scripts import session_keys, stored_message

BOTH = pytest.mark.parametrize("store", STORES, indirect=True)


async def send(client: Client, data: Any, mid: str | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"data": data}
    if mid is not None:
        frame["mid"] = mid
    reply = await client.request("message:send", **frame)
    assert reply["type"] == "message:ack", reply
    return reply


async def resume(client: Client, code: str, creds: dict[str, Any], last_seq: int) -> dict[str, Any]:
    reply = await client.request(
        "session:resume", code=code, client_id=creds["client_id"], token=creds["token"], last_seq=last_seq
    )
    assert reply["type"] == "session:resumed", reply
    return reply


@BOTH
async def test_a_resend_with_a_known_mid_is_acked_as_a_duplicate_and_stored_once(tandem: Server) -> None:
    async with paired(tandem) as (a, b, created, _joined):
        first = await send(a, {"text": "hello"}, "m-1")
        assert first["seq"] == 1 and "duplicate" not in first
        again = await send(a, {"text": "changed, ignored"}, "m-1")
        assert again["seq"] == 1 and again["duplicate"] is True
        message = await b.expect("message")
        assert (message["seq"], message["data"], message["mid"]) == (1, {"text": "hello"}, "m-1")
        await b.nothing(0.2)  # the duplicate is not delivered
        # Without a mid (or with null) nothing is de-duplicated; mids are per member.
        assert (await send(a, "x", None))["seq"] == 2
        assert (await send(a, "x", None))["seq"] == 3
        for seq in (2, 3):
            frame = await b.expect("message")
            assert frame["seq"] == seq and "mid" not in frame
        assert (await b.request("message:send", data="y", mid=None))["seq"] == 4
        own = await send(b, "b's", "m-1")
        assert own["seq"] == 5 and "duplicate" not in own
        assert [(await a.expect("message"))["seq"] for _ in range(2)] == [4, 5]
        assert (await send(a, "next", "m-2"))["seq"] == 6
        assert created["code"]


@BOTH
@pytest.mark.parametrize("mid", [65 * "m", 7, "", ["m"]])
async def test_a_malformed_mid_is_bad_request(tandem: Server, mid: object) -> None:
    async with paired(tandem) as (a, _b, _created, _joined):
        reply = await a.request("message:send", data=1, mid=mid)
        assert reply["type"] == "error" and reply["code"] == "bad_request" and "mid" in reply["message"]


@BOTH
async def test_a_resend_after_kill_9_and_a_restart_is_still_a_duplicate(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    server = tandem_factory()
    async with paired(server) as (a, b, created, joined):
        code = created["code"]
        assert (await send(a, "durable", "once"))["seq"] == 1
        await b.expect("message")
    server.kill()
    again = tandem_factory(data_dir=server.data_dir)
    async with connect(again) as a2, connect(again) as b2:
        await resume(a2, code, created, 0)
        await resume(b2, code, joined, 1)
        await a2.expect("session:presence")
        reply = await send(a2, "durable", "once")
        assert reply == {"type": "message:ack", "id": reply["id"], "seq": 1, "duplicate": True}
        await b2.nothing(0.2)
        assert (await send(a2, "new", "twice"))["seq"] == 2


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_a_resend_on_another_instance_is_a_duplicate(tandem_factory: ServerFactory, tmp_path: Path) -> None:
    s1 = tandem_factory(data_dir=tmp_path / "one")
    s2 = tandem_factory(data_dir=tmp_path / "two")
    async with paired(s1) as (a, b, created, _joined):
        assert (await send(a, "from s1", "k"))["seq"] == 1
        await b.expect("message")
        async with connect(s2) as a2:  # the sender moves: its resend lands on s2
            await resume(a2, created["code"], created, 0)
            assert (await b.expect("session:presence"))["online"] is True
            assert (await send(a2, "from s1", "k"))["duplicate"] is True
            await b.nothing(0.3)


@BOTH
async def test_a_mid_is_forgotten_with_its_message_when_history_moves_on(
    tandem_factory: ServerFactory, store: str
) -> None:
    server = tandem_factory(HISTORY_SIZE="3")
    async with paired(server) as (a, b, created, _joined):
        assert (await send(a, 0, "old"))["seq"] == 1
        for n in range(3):
            assert (await send(a, n, f"m{n}"))["seq"] == n + 2
        assert "duplicate" not in await send(a, 0, "old")  # seq 1 left history: stored again, as seq 5
        assert (await send(a, 2, "m2"))["duplicate"] is True  # seq 4 is still in history
        if store == "redis":  # the mids kept are those of the messages in history
            client = redis.Redis.from_url(SHARED_REDIS_URL)
            try:
                assert client.hlen(session_keys(created["code"])[3]) == 3
            finally:
                client.close()
        assert [(await b.expect("message"))["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]


@BOTH
async def test_a_duplicate_costs_no_message_budget(tandem_factory: ServerFactory, store: str) -> None:
    settings = {"RATE_LIMIT_ENABLED": "1", "RATE_LIMIT_MESSAGES_USER": "2/60", "RATE_LIMIT_MESSAGES_IP": "3/60"}
    settings["HASH_KEY"] = f"mid-budget-{uuid.uuid4().hex}"  # limiter keys of this test's own
    server = tandem_factory(**settings)
    async with paired(server) as (a, _b, _created, _joined):
        assert (await send(a, 1, "one"))["seq"] == 1
        for _ in range(3):
            assert (await send(a, 1, "one"))["duplicate"] is True
        assert (await send(a, 2, "two"))["seq"] == 2  # the second of two
        refused = await a.request("message:send", data=3, mid="three")
        assert refused["code"] == "rate_limited"


async def test_a_data_dir_from_before_mid_is_upgraded_in_place(tandem_factory: ServerFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    with sqlite3.connect(data_dir / "tandem.sqlite3") as db:  # the messages table as it was
        db.execute(
            "CREATE TABLE messages (code TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL,"
            " data BLOB NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY (code, seq)) WITHOUT ROWID"
        )
    server = tandem_factory(data_dir=data_dir)
    async with paired(server) as (a, _b, _created, _joined):
        assert (await send(a, 1, "x"))["seq"] == 1
        assert (await send(a, 1, "x"))["duplicate"] is True


def test_mid_parses_and_serialises() -> None:
    request = parse_request('{"type":"message:send","id":1,"data":[1],"mid":"a|b"}')
    assert request == SendMessage(1, b"[1]", "a|b")
    assert parse_request('{"type":"message:send","data":1,"mid":null}') == SendMessage(None, b"1", None)
    assert orjson.loads(serialize(MessageAck(1, 7, True))) == {
        "type": "message:ack",
        "id": 1,
        "seq": 7,
        "duplicate": True,
    }
    assert orjson.loads(serialize(MessageAck(1, 7))) == {"type": "message:ack", "id": 1, "seq": 7}
    frame = orjson.loads(serialize(Message("C", 1, "s", b"{}", 5, "a|b")))
    assert frame["mid"] == "a|b" and "mid" not in orjson.loads(serialize(Message("C", 1, "s", b"{}", 5)))


def test_history_entries_keep_a_mid_with_any_characters() -> None:
    entry = stored_message(b'3|99|cid|3|a|b|{"k":"|"}')
    assert (entry.seq, entry.ts, entry.sender, entry.mid, entry.data) == (3, 99, "cid", "a|b", b'{"k":"|"}')
    none = stored_message(b"4|99|cid|0||12")
    assert (none.mid, none.data) == (None, b"12")
    before_mid = stored_message(b'5|99|cid|"x|y"')  # written before `mid` existed
    assert (before_mid.mid, before_mid.data) == (None, b'"x|y"')
