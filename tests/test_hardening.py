"""Hostile clients against a real server: code guessing, limit races, socket hoarding.

Each test is an attack kept small (bounded in count and time) and checks what
stops it: resume answers alike for unknown codes and wrong credentials, the
failure limits count an attempt before it runs (concurrent joins cannot pass
together), sockets are capped and timed out outside any session, repeated
JSON keys are refused. Both stores, unless noted.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from typing import Any

import orjson
import pytest
import redis
import trio
from helpers import (
    BOTH_STORES,
    SHARED_REDIS_URL,
    UNKNOWN_CODE,
    Server,
    ServerFactory,
    call,
    check_redis,
    connect,
    frames_until_close,
    paired,
    xff,
)
from trio_websocket import ConnectionClosed, ConnectionRejected

from limiter import MemoryLimiter, Pseudonyms, RedisLimiter, Rule, address_block
from redis_client import Connector

# Every limit on, at sizes a test can reach; each test turns off what it does not probe.
LIMITS = {
    "RATE_LIMIT_ENABLED": "1",
    "RATE_LIMIT_MESSAGES_USER": "off",
    "RATE_LIMIT_MESSAGES_IP": "off",
    "RATE_LIMIT_CONNECTIONS_IP": "off",
    "RATE_LIMIT_API_IP": "off",
    "RATE_LIMIT_JOIN_FAILURES_IP": "off",
    "RATE_LIMIT_CODE_FAILURES": "off",
    "MAX_CONSECUTIVE_ERRORS": "10000",
}


def resume_frame(code: str, client_id: str, token: str) -> dict[str, Any]:
    return {"code": code, "client_id": client_id, "token": token, "last_seq": 0}


def without_id(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != "id"}


def fresh_limiter_state(server_store: str) -> dict[str, str]:
    """On Redis, a key prefix of its own so that earlier runs' counts do not leak in."""
    if server_store != "redis":
        return {}
    return {"HASH_KEY": f"test-{uuid.uuid4().hex}"}


# --- 1. resume is no oracle ----------------------------------------------------------


@BOTH_STORES
async def test_resume_answers_alike_for_unknown_codes_and_wrong_credentials(
    tandem_factory: ServerFactory, store: str
) -> None:
    server = tandem_factory(**LIMITS, **fresh_limiter_state(store))
    async with paired(server) as (_a, _b, created, joined), connect(server) as probe:
        code = created["code"]
        unknown = await call(probe, "session:resume", **resume_frame(UNKNOWN_CODE, joined["client_id"], "x" * 43))
        wrong_token = await call(probe, "session:resume", **resume_frame(code, joined["client_id"], created["token"]))
        wrong_member = await call(probe, "session:resume", **resume_frame(code, "nobody", joined["token"]))
        assert without_id(unknown) == without_id(wrong_token) == without_id(wrong_member), (
            unknown,
            wrong_token,
            wrong_member,
        )
        assert unknown["type"] == "error" and unknown["code"] == "not_found"


@BOTH_STORES
async def test_resume_probes_are_limited_per_address(tandem_factory: ServerFactory, store: str) -> None:
    """The attack: probe codes with resumes, pinging in between to dodge the
    errors-in-a-row close. Of 200 probes, 5 are answered and the rest refused."""
    env = {**LIMITS, "RATE_LIMIT_JOIN_FAILURES_IP": "5/60", **fresh_limiter_state(store)}
    server = tandem_factory(**env)
    answers: list[str] = []
    async with connect(server) as owner, connect(server) as probe:
        code = (await call(owner, "session:create"))["code"]
        with trio.fail_after(20):
            for n in range(200):
                guess = code if n == 150 else f"ZZZZ{n:04d}".replace("0", "A")
                frame = await call(probe, "session:resume", **resume_frame(guess, "c", "t" * 43))
                answers.append(frame["code"])
                assert (await call(probe, "ping"))["type"] == "pong"
        assert answers.count("not_found") == 5, answers[:10]
        assert set(answers[5:]) == {"rate_limited"}
        # The same address cannot join the real code either while it is over its limit.
        refused = await call(probe, "session:join", code=code)
        assert refused["code"] == "rate_limited" and "join_failures_ip" in refused["message"]


@BOTH_STORES
async def test_pings_between_failures_do_not_reset_the_errors_in_a_row(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(MAX_CONSECUTIVE_ERRORS="3")
    async with connect(server) as c:
        for _ in range(2):
            assert (await call(c, "message:send", data=1))["code"] == "not_in_session"
            assert (await call(c, "ping"))["type"] == "pong"
        assert (await call(c, "message:send", data=1))["code"] == "not_in_session"
        assert await frames_until_close(c, 5) == ([], 1008)


# --- 2. the failure limits count first --------------------------------------------------


@BOTH_STORES
async def test_concurrent_failed_joins_cannot_pass_the_limit_together(
    tandem_factory: ServerFactory, store: str
) -> None:
    """40 sockets of one address send a wrong join at the same instant: each
    attempt is counted before it runs, so 10 are answered and 30 refused."""
    server = tandem_factory(**{**LIMITS, "RATE_LIMIT_JOIN_FAILURES_IP": "10/60"}, **fresh_limiter_state(store))
    answers: list[str] = []
    async with trio.open_nursery() as nursery:
        ready = trio.Event()

        async def guess(n: int) -> None:
            async with connect(server) as c:
                await ready.wait()
                answers.append((await call(c, "session:join", code=f"ZZZZ{n:04d}".replace("0", "A")))["code"])

        for n in range(40):
            nursery.start_soon(guess, n)
        await trio.sleep(1.0)  # every socket open
        ready.set()
    assert len(answers) == 40
    assert answers.count("not_found") == 10, sorted(answers)
    assert answers.count("rate_limited") == 30


@BOTH_STORES
async def test_a_successful_join_or_resume_costs_no_failure_budget(tandem_factory: ServerFactory, store: str) -> None:
    server = tandem_factory(**{**LIMITS, "RATE_LIMIT_JOIN_FAILURES_IP": "2/60"}, **fresh_limiter_state(store))
    for _ in range(4):  # twice the budget in successes
        async with paired(server) as (_a, b, created, joined):
            await b.ws.aclose()
            async with connect(server) as again:
                reply = await call(
                    again, "session:resume", **resume_frame(created["code"], joined["client_id"], joined["token"])
                )
                assert reply["type"] == "session:resumed", reply
    async with connect(server) as c:
        assert (await call(c, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"


# --- 3. per code ------------------------------------------------------------------------


@BOTH_STORES
async def test_a_code_refuses_joins_after_its_failures_but_its_members_resume(
    tandem_factory: ServerFactory, store: str
) -> None:
    server = tandem_factory(**{**LIMITS, "RATE_LIMIT_CODE_FAILURES": "3/60"}, **fresh_limiter_state(store))
    async with paired(server) as (_a, b, created, joined), connect(server) as attacker:
        code = created["code"]
        # Failed joins (the session is full) and a failed resume count against the code.
        assert (await call(attacker, "session:join", code=code))["code"] == "session_full"
        assert (await call(attacker, "session:join", code=code))["code"] == "session_full"
        wrong = await call(attacker, "session:resume", **resume_frame(code, joined["client_id"], "t" * 43))
        assert wrong["code"] == "not_found"
        refused = await call(attacker, "session:join", code=code)
        assert refused["code"] == "rate_limited" and "code_failures" in refused["message"], refused
        # Another code is untouched.
        other = (await call(attacker, "session:create"))["code"]
        assert other != code
        # The members themselves still get back in.
        await b.ws.aclose()
        async with connect(server) as b2:
            back = await call(b2, "session:resume", **resume_frame(code, joined["client_id"], joined["token"]))
            assert back["type"] == "session:resumed", back


# --- 4. sockets ---------------------------------------------------------------------------


@BOTH_STORES
async def test_sockets_per_address_and_in_total_are_capped(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(MAX_SOCKETS_IP="3", MAX_SOCKETS="5", TRUSTED_PROXIES="127.0.0.1")

    async def refused(headers: list[tuple[bytes, bytes]]) -> ConnectionRejected:
        with pytest.raises(ConnectionRejected) as rejected:
            async with connect(server, extra_headers=headers):
                pytest.fail("the handshake should have been refused")
        return rejected.value

    same_64 = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"]
    async with (
        connect(server, extra_headers=xff(same_64[0])),
        connect(server, extra_headers=xff(same_64[1])),
        connect(server, extra_headers=xff(same_64[2])),
    ):
        # A fourth from the same /64 is one too many, whatever its last 64 bits.
        rejection = await refused(xff("2001:db8:1:2:abcd::9"))
        assert rejection.status_code == 503
        body = orjson.loads(rejection.body or b"{}")
        assert body["error"]["code"] == "unavailable" and "max_sockets_ip" in body["error"]["message"]
        # Another /64 is another address; then the process's total is reached.
        async with (
            connect(server, extra_headers=xff("2001:db8:1:3::1")),
            connect(server, extra_headers=xff("198.51.100.7")),
        ):
            total = await refused(xff("198.51.100.8"))
            assert total.status_code == 503 and b"max_sockets" in (total.body or b"")
    # Closed sockets free their places.
    async with connect(server, extra_headers=xff(same_64[0])) as again:
        assert (await call(again, "ping"))["type"] == "pong"


@BOTH_STORES
async def test_a_socket_in_no_session_is_closed_after_the_idle_timeout(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(IDLE_SOCKET_TIMEOUT="0.6")
    async with connect(server) as idle, paired(server) as (a, b, _created, _joined):
        started = trio.current_time()
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
            while True:  # pinging keeps Hypercorn's read timeout away, not this one
                await call(idle, "ping")
                await trio.sleep(0.1)
        assert closed.value.reason is not None and closed.value.reason.code == 1000
        assert 0.5 <= trio.current_time() - started < 3
        # Members are kept, however quiet; after leaving, the clock starts again.
        assert await b.message("still here") == 1
        await a.expect("message")
        assert (await call(a, "session:leave"))["type"] == "session:left"
        with pytest.raises(ConnectionClosed), trio.fail_after(5):
            while True:
                await call(a, "ping")
                await trio.sleep(0.1)


@BOTH_STORES
async def test_the_default_connection_limit_lets_a_user_reload_the_page(tandem_factory: ServerFactory) -> None:
    """The defaults let one address connect 20 times in a row (page reloads);
    MAX_SOCKETS_IP bounds what it holds at once."""
    server = tandem_factory(RATE_LIMIT_ENABLED="1", HASH_KEY=f"test-{uuid.uuid4().hex}")
    for _ in range(20):
        async with connect(server) as c:
            assert (await call(c, "ping"))["type"] == "pong"


# --- 5. frames ----------------------------------------------------------------------------


@BOTH_STORES
async def test_a_repeated_key_is_refused_not_resolved(tandem: Server) -> None:
    async with paired(tandem) as (a, b, created, _joined):
        await a.send('{"type": "message:send", "id": 7, "data": 1, "type": "session:leave"}')
        reply = await a.recv()
        assert reply["type"] == "error" and reply["code"] == "bad_request" and "repeated key" in reply["message"]
        await a.send('{"type": "message:send", "data": {"to": "b", "to": "c"}}')
        assert (await a.recv())["code"] == "bad_request"
        # Still a member: nothing was sent, nothing left.
        assert await a.message("ok") == 1
        frame = await b.expect("message")
        assert frame["data"] == "ok" and frame["code"] == created["code"]


# --- 6. limiter keys --------------------------------------------------------------------


def test_limiter_keys_are_keyed_hashes_and_ipv6_counts_per_64() -> None:
    a, b = Pseudonyms(b"k" * 32), Pseudonyms(b"j" * 32)
    assert a.address("127.0.0.1") != b.address("127.0.0.1")  # enumerating addresses needs the key
    assert a.address("2001:db8::1") == a.address("2001:db8::ffff:1")
    assert a.address("2001:db8::1") != a.address("2001:db8:0:1::1")
    assert a.code("ABCD2345") != a.address("ABCD2345")
    assert address_block("::ffff:192.0.2.1") == "192.0.2.1"


async def test_refund_takes_back_one_hit_in_memory_and_in_redis() -> None:
    rule = Rule(f"refund-{uuid.uuid4().hex}", 2, 60.0)
    check_redis(SHARED_REDIS_URL)
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2.0)
    now = itertools.count(1)
    limiters: list[MemoryLimiter | RedisLimiter] = [
        MemoryLimiter(clock=lambda: float(next(now))),
        RedisLimiter(Connector.of(client)),
    ]
    try:
        for limiter in limiters:
            first = await limiter.hit(rule, "k")
            second = await limiter.hit(rule, "k")
            assert first.allowed and second.allowed
            assert not (await limiter.hit(rule, "k")).allowed
            await limiter.refund(rule, "k", second.stamp)
            assert (await limiter.hit(rule, "k")).allowed, type(limiter).__name__
            assert not (await limiter.hit(rule, "k")).allowed
    finally:
        client.delete(f"tandem:rl:{{{rule.name}:k}}")
        client.close()


@pytest.mark.parametrize("store", ["redis"], indirect=True)  # the embedded store has one process
async def test_instances_on_one_redis_share_one_generated_key(tandem_factory: ServerFactory, store: str) -> None:
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2.0)
    try:
        first = tandem_factory(**{**LIMITS, "RATE_LIMIT_JOIN_FAILURES_IP": "2/60"})
        shared = client.get("tandem:hash-key")
        assert isinstance(shared, bytes) and shared, "the first instance stores a shared key"
        second = tandem_factory(**{**LIMITS, "RATE_LIMIT_JOIN_FAILURES_IP": "2/60"})
        key = f"tandem:rl:{{join_failures_ip:{Pseudonyms(shared).address('127.0.0.1')}}}"
        client.delete(key)  # what earlier tests on this Redis counted for 127.0.0.1
        # Failures on one instance count on the other: both made the same key of 127.0.0.1.
        async with connect(first) as c1, connect(second) as c2:
            assert (await call(c1, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
            assert (await call(c2, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
            assert (await call(c1, "session:join", code=UNKNOWN_CODE))["code"] == "rate_limited"
        assert client.llen(key) == 2
        unkeyed = hashlib.sha256(b"tandem-ip:127.0.0.1").hexdigest()[:24]
        assert not list(client.scan_iter(match=f"tandem:rl:*{unkeyed}*", count=1000))
    finally:
        client.close()


@BOTH_STORES
async def test_guessing_failures_count_per_ipv6_site(tandem_factory: ServerFactory, store: str) -> None:
    """A /48 holds 65,536 /64s: rotating through them must not multiply the guessing budget."""
    server = tandem_factory(
        **{**LIMITS, "RATE_LIMIT_JOIN_FAILURES_IP": "2/60"}, TRUSTED_PROXIES="127.0.0.1", **fresh_limiter_state(store)
    )
    site = ["2001:db8:7:1::1", "2001:db8:7:2::1", "2001:db8:7:3::1"]
    answers = []
    for address in site:
        async with connect(server, extra_headers=xff(address)) as c:
            answers.append((await call(c, "session:join", code=UNKNOWN_CODE))["code"])
    assert answers == ["not_found", "not_found", "rate_limited"]
    async with connect(server, extra_headers=xff("2001:db8:8:1::1")) as other_site:
        assert (await call(other_site, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
