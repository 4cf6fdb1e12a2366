"""Rate limits (limiter.py): the sliding-window rule, its two implementations, and every limit end to end.

- One table of cases runs against `MemoryLimiter` (clock injected) and against the
  Lua of `RedisLimiter` on the Redis at 127.0.0.1:6379 (its explicit `now_ms`
  argument, unique keys), so the two follow one rule.
- Hypothesis: for random arrivals nothing admits more than `limit` in any span
  of `window`, nothing refuses below it, and a refusal's `retry_after` is
  exactly when the next request is admitted (memory, and a smaller run on Lua).
- `MemoryLimiter` on trio's MockClock across window boundaries.
- Real `python server.py` processes (conftest.py) with short windows, on SQLite
  and on Redis (a private redis-server, flushed per test, so that no other run's
  counts leak in; the append script's folded limits are what the Redis runs of
  the message tests exercise): each limit at its boundary and again once the
  window moved, 429 before the upgrade, 1008 after repeated refusals, "off",
  X-Forwarded-For, two instances on one Redis, the 3-master cluster, Redis down
  (fail-open and fail-closed), and a TTL on every limiter key.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import trio
import trio.testing
from helpers import (
    SHARED_REDIS_URL,
    UNKNOWN_CODE,
    Client,
    Server,
    ServerFactory,
    assert_alive,
    call,
    check_redis,
    connect,
    frames_until_close,
    http_get,
    log_lines,
    xff,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_servers import RedisCluster3, RedisServer
from trio_websocket import ConnectionRejected

from limiter import Decision, LimitKey, MemoryLimiter, RedisLimiter, Rule, redis_key
from redis_client import Connector

BOTH = pytest.mark.parametrize("store", ["sqlite", "redis"])
# Limiter keys: per rule and client (tandem:rl:{rule:key}) or per member, beside its session.
LIMITER_KEY_PATTERNS = ("tandem:rl:*", "tandem:{*}:rl:*")
LOG_WAIT = 5.0  # the log is written by a thread: how long a line may take to appear


# --- 1. the rule: one table of cases for `decide`/MemoryLimiter and for the Lua -------------


@dataclass(frozen=True)
class Step:
    """At `at` seconds after the case's start, `op` ("hit", "peek" or "record") is made.

    For hit and peek, the decision expected; record answers nothing (later peeks show it).
    """

    at: float
    op: str
    allowed: bool | None = None
    remaining: int = 0
    retry_after: float = 0.0
    reset: float = 0.0


def ok(at: float, remaining: int, reset: float, op: str = "hit") -> Step:
    return Step(at, op, True, remaining, 0.0, reset)


def no(at: float, retry_after: float, reset: float, op: str = "hit") -> Step:
    return Step(at, op, False, 0, retry_after, reset)


def rec(at: float) -> Step:
    return Step(at, "record")


# Times are exact binary fractions where a decision sits on a boundary, so that
# float seconds (memory) and integer ms (Lua) agree exactly.
CASES: dict[str, tuple[int, float, list[Step]]] = {
    # "3 per 2 s": the 4th inside the window is refused until the oldest leaves it.
    "boundary": (
        3,
        2.0,
        [
            ok(0.0, 2, 2.0),
            ok(0.5, 1, 2.0),
            ok(1.0, 0, 2.0),
            no(1.5, 0.5, 1.5),
            no(1.999, 0.001, 1.001),
            ok(2.0, 0, 2.0),  # the hit at 0.0 just left (t > now - window, strictly)
            no(2.25, 0.25, 1.75),
            ok(2.5, 0, 2.0),
            no(2.5, 0.5, 2.0),
            ok(5.0, 2, 2.0),  # the window is empty again
        ],
    ),
    # The default per-user limit, 10 per 60 s: never 11 in any 60 s span.
    "ten_per_minute": (
        10,
        60.0,
        [
            *[ok(6.0 * n, 9 - n, 60.0) for n in range(10)],  # at 0, 6, ..., 54
            no(59.5, 0.5, 54.5),  # the 11th within 60 s of the 1st
            ok(60.0, 0, 60.0),  # the 1st left
            no(60.0, 6.0, 60.0),  # the next slot opens when the 2nd (at 6) leaves
            no(65.75, 0.25, 54.25),
            ok(66.0, 0, 60.0),
        ],
    ),
    # Refused hits count nothing: hammering never pushes the admission later.
    "refusals_count_nothing": (
        2,
        4.0,
        [
            ok(0.0, 1, 4.0),
            ok(0.0, 0, 4.0),
            *[no(t, 4.0 - t, 4.0 - t) for t in (0.0, 0.25, 1.0, 2.0, 3.0, 3.75)],
            ok(4.0, 1, 4.0),
            ok(4.0, 0, 4.0),
            no(4.0, 4.0, 4.0),
        ],
    ),
    "limit_one": (
        1,
        1.0,
        [ok(0.0, 0, 1.0), no(0.5, 0.5, 0.5), no(0.75, 0.25, 0.25), ok(1.0, 0, 1.0), no(1.0, 1.0, 1.0)],
    ),
    # Peek asks without counting: how a join checks its IP's failures first.
    "peek": (
        2,
        2.0,
        [
            ok(0.0, 2, 0.0, "peek"),
            ok(0.0, 1, 2.0),
            ok(0.5, 1, 1.5, "peek"),
            ok(0.5, 1, 1.5, "peek"),
            ok(0.5, 0, 2.0),
            no(1.0, 1.0, 1.5, "peek"),
            no(1.0, 1.0, 1.5),
            ok(2.0, 1, 0.5, "peek"),
            ok(2.5, 2, 0.0, "peek"),
        ],
    ),
    # Record counts an event whatever the count (failed joins); only the newest `limit` are kept.
    "record": (
        3,
        10.0,
        [
            rec(0.0),
            rec(1.0),
            ok(1.5, 1, 9.5, "peek"),
            rec(2.0),
            no(3.0, 7.0, 9.0, "peek"),
            rec(4.0),  # over the limit: recorded anyway, and the refusal lasts longer
            no(10.0, 1.0, 4.0, "peek"),
            no(10.0, 1.0, 4.0),
            ok(11.0, 1, 3.0, "peek"),
            ok(12.0, 1, 10.0),  # the record at 2.0 left at 12.0
            ok(14.5, 2, 7.5, "peek"),
        ],
    ),
    # Requests at the same instant, and a long idle gap.
    "burst_then_idle": (
        4,
        60.0,
        [
            ok(0.0, 3, 60.0),
            ok(0.0, 2, 60.0),
            ok(0.0, 1, 60.0),
            ok(0.0, 0, 60.0),
            no(0.0, 60.0, 60.0),
            no(59.999, 0.001, 0.001),
            ok(60.0, 3, 60.0),
            ok(3600.0, 3, 60.0),
        ],
    ),
}


def assert_step(decision: Decision, step: Step, where: str) -> None:
    got = (decision.allowed, decision.remaining, decision.retry_after, decision.reset)
    want = (step.allowed, step.remaining, step.retry_after, step.reset)
    assert got[:2] == want[:2], f"{where}: {decision} != {step}"
    assert math.isclose(got[2], want[2], abs_tol=1e-6), f"{where}: {decision} != {step}"
    assert math.isclose(got[3], want[3], abs_tol=1e-6), f"{where}: {decision} != {step}"


@pytest.mark.parametrize("name", sorted(CASES))
async def test_table_memory(name: str) -> None:
    limit, window, steps = CASES[name]
    rule = Rule(name, limit, window)
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    for n, step in enumerate(steps):
        now[0] = 1000.0 + step.at  # any clock origin: monotonic time is arbitrary
        match step.op:
            case "hit":
                assert_step(await limiter.hit(rule, "k"), step, f"step {n}")
            case "peek":
                assert_step(await limiter.peek(rule, "k"), step, f"step {n}")
            case _:
                await limiter.record(rule, "k")


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[redis.Redis]:
    check_redis(SHARED_REDIS_URL)
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2.0)
    yield client
    client.close()


LUA_EPOCH_MS = 1_700_000_000_000  # now_ms is epoch ms, as Redis TIME gives it


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_lua(name: str, shared_redis: redis.Redis) -> None:
    limit, window, steps = CASES[name]
    rule = Rule(f"test-{name}-{uuid.uuid4().hex}", limit, window)  # a key of its own
    limiter = RedisLimiter(Connector.of(shared_redis))
    try:
        for n, step in enumerate(steps):
            decision = limiter._call(rule, "k", step.op, LUA_EPOCH_MS + round(step.at * 1000))
            if step.op != "record":
                assert_step(decision, step, f"step {n}")
        ttl = shared_redis.pttl(redis_key(rule, "k"))
        assert 0 < ttl <= window * 1000
    finally:
        shared_redis.delete(redis_key(rule, "k"))


# --- 2. properties over random arrivals -------------------------------------------------------


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(limit, window, arrival times), in integer units so that every boundary is exact."""
    limit = draw(st.integers(1, 6))
    window = draw(st.integers(1, 40))
    gaps = draw(st.lists(st.integers(0, 15), min_size=1, max_size=60))
    return limit, window, list(itertools.accumulate(gaps))


def next_admission(admitted: list[int], t: int, limit: int, window: int) -> int:
    """When, by the definition, a request after `t` is admitted: once the
    `limit`-th newest admitted request is `window` old."""
    inside = sorted((a for a in admitted if a > t - window), reverse=True)
    return t if len(inside) < limit else inside[limit - 1] + window


def check_decision(decision: Decision, admitted: list[int], t: int, limit: int, window: int) -> None:
    """The decision agrees with the definition; records an admission."""
    inside = sum(1 for a in admitted if a > t - window)
    if decision.allowed:
        assert inside < limit, (t, admitted)  # never more than `limit` in a window span
        assert decision.remaining == limit - inside - 1
        admitted.append(t)
    else:
        assert inside >= limit, (t, admitted)  # never refused below the limit
        assert decision.remaining == 0


def assert_no_span_over_limit(admitted: list[int], limit: int, window: int) -> None:
    # Any span [s, s + window) holding k admissions holds them in (a - window, a] of its last one, a.
    for a in admitted:
        assert sum(1 for b in admitted if a - window < b <= a) <= limit, (a, admitted)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals())
async def test_property_memory(case: tuple[int, int, list[int]]) -> None:
    limit, window, times = case
    rule = Rule("p", limit, window)
    now = [0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    admitted: list[int] = []
    for t in times:
        now[0] = t
        decision = await limiter.hit(rule, "k")
        check_decision(decision, admitted, t, limit, window)
        if not decision.allowed:
            retry_at = next_admission(admitted, t, limit, window)
            assert decision.retry_after == retry_at - t > 0
            now[0] = retry_at - 1  # one unit earlier: still refused, and told the rest
            earlier = await limiter.peek(rule, "k")
            assert not earlier.allowed and earlier.retry_after == 1
            now[0] = retry_at  # exactly then: admitted
            assert (await limiter.peek(rule, "k")).allowed
    assert_no_span_over_limit(admitted, limit, window)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals())
def test_property_lua(shared_redis: redis.Redis, case: tuple[int, int, list[int]]) -> None:
    limit, window, times = case
    rule = Rule(f"test-prop-{uuid.uuid4().hex}", limit, float(window))  # a unit is 1 s, or 1000 ms
    limiter = RedisLimiter(Connector.of(shared_redis))
    admitted: list[int] = []
    try:
        for t in times:
            at_ms = LUA_EPOCH_MS + t * 1000
            decision = limiter._call(rule, "k", "hit", at_ms)
            check_decision(decision, admitted, t, limit, window)
            if not decision.allowed:
                retry_ms = (next_admission(admitted, t, limit, window) - t) * 1000
                assert round(decision.retry_after * 1000) == retry_ms
                assert not limiter._call(rule, "k", "peek", at_ms + retry_ms - 1).allowed
                assert limiter._call(rule, "k", "peek", at_ms + retry_ms).allowed
    finally:
        shared_redis.delete(redis_key(rule, "k"))
    assert_no_span_over_limit(admitted, limit, window)


# --- 3. in memory: trio's clock, hit_all, the key bound -----------------------------------------


async def test_memory_limiter_on_trio_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    limiter = MemoryLimiter(clock=trio.current_time)
    rule = Rule("mock", 3, 10.0)
    start = trio.current_time()
    for n in range(3):  # at start+0, +1, +2
        decision = await limiter.hit(rule, "k")
        assert decision.allowed and decision.remaining == 2 - n
        await trio.sleep_until(start + n + 1)
    refused = await limiter.hit(rule, "k")  # start+3: the 4th within 10 s
    assert not refused.allowed and refused.retry_after == pytest.approx(7.0)
    await trio.sleep_until(start + 9.75)
    assert (await limiter.hit(rule, "k")).retry_after == pytest.approx(0.25)
    await trio.sleep_until(start + 10.0)  # the first hit leaves the window: exactly one slot
    assert (await limiter.hit(rule, "k")).allowed
    assert not (await limiter.hit(rule, "k")).allowed
    await trio.sleep_until(start + 11.0)
    assert (await limiter.hit(rule, "k")).allowed
    await trio.sleep_until(start + 12.0)
    assert (await limiter.hit(rule, "k")).allowed
    again = await limiter.hit(rule, "k")
    assert not again.allowed and again.retry_after == pytest.approx(8.0)  # the hit at +10 leaves at +20
    await trio.sleep(3600)
    assert (await limiter.hit(rule, "k")).remaining == 2
    assert trio.current_time() - start >= 3612  # the clock jumped; no real time passed


def test_memory_hit_all_counts_nothing_when_one_refuses() -> None:
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    user, ip = Rule("user", 5, 10.0), Rule("ip", 2, 10.0)
    keys = [LimitKey(user, "u"), LimitKey(ip, "i")]
    assert limiter.hit_all(keys) is None
    assert limiter.hit_all(keys) is None
    refused = limiter.hit_all(keys)
    assert refused is not None and refused.rule == "ip" and refused.decision.retry_after == 10.0
    # The refused request took nothing from the user's budget: 3 used of 5 after one more alone.
    assert limiter.hit_now(user, "u").remaining == 2


def test_memory_limiter_forgets_least_recently_used_keys() -> None:
    limiter = MemoryLimiter(clock=lambda: 0.0, max_keys=3)
    rule = Rule("r", 1, 60.0)
    for key in "abc":
        assert limiter.hit_now(rule, key).allowed
    assert not limiter.hit_now(rule, "a").allowed  # "a" is now the most recent
    assert limiter.hit_now(rule, "d").allowed  # evicts "b"
    assert limiter.hit_now(rule, "b").allowed  # forgotten, so fresh (evicts "c")
    assert not limiter.hit_now(rule, "a").allowed


async def test_redis_limiter_uses_redis_time_and_sets_a_ttl(shared_redis: redis.Redis) -> None:
    rule = Rule(f"test-live-{uuid.uuid4().hex}", 3, 1.0)
    limiter = RedisLimiter(Connector.of(shared_redis))
    try:
        for n in range(3):
            decision = await limiter.hit(rule, "k")
            assert decision.allowed and decision.remaining == 2 - n
        refused = await limiter.hit(rule, "k")
        assert not refused.allowed and 0.5 < refused.retry_after <= 1.0
        assert not (await limiter.peek(rule, "k")).allowed
        ttl = shared_redis.pttl(redis_key(rule, "k"))
        assert 0 < ttl <= 1000
        await trio.sleep(refused.retry_after + 0.05)
        assert (await limiter.hit(rule, "k")).allowed
    finally:
        shared_redis.delete(redis_key(rule, "k"))


async def test_redis_limiter_falls_back_to_memory_and_logs_once_per_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tandem.limiter")
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(
        server.url(), socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        limiter = RedisLimiter(Connector.of(client))
        closed = RedisLimiter(Connector.of(client), fail_closed=True)
        rule = Rule("outage", 2, 30.0)
        assert (await limiter.hit(rule, "k")).allowed
        server.stop()
        # Fail-open: this process's memory decides, from an empty window.
        assert [(await limiter.hit(rule, "k")).allowed for _ in range(3)] == [True, True, False]
        assert not (await limiter.peek(rule, "k")).allowed
        assert limiter.outage.down and limiter.fallbacks == 4
        # Fail-closed: refused with a retry_after.
        refusal = await closed.hit(rule, "other")
        assert not refusal.allowed and refusal.retry_after > 0
        assert not (await closed.hit(rule, "other")).allowed
        down = [r for r in caplog.records if r.getMessage() == "limiter.redis_down"]
        assert len(down) == 2  # once per limiter and outage, not once per check
        server.start()  # empty: this redis-server keeps nothing across a restart
        # Redis decides again (the fallback's window is full: it would refuse).
        assert [(await limiter.hit(rule, "k")).remaining for _ in range(2)] == [1, 0]
        assert not (await limiter.hit(rule, "k")).allowed
        assert not limiter.outage.down
        assert [r.getMessage() for r in caplog.records].count("limiter.redis_back") == 1
    finally:
        client.close()
        server.stop()


# --- 4. end to end: helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limiter_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the module's end-to-end tests (`limits_env` flushes it per test)."""
    server = RedisServer(tmp_path_factory.mktemp("limiter-redis")).start()
    yield server
    server.stop()


def limiter_keys(client: redis.Redis) -> dict[str, int]:
    """Every limiter key on one Redis node and its PTTL in ms (-1: none, -2: just expired)."""
    keys = {k for pattern in LIMITER_KEY_PATTERNS for k in client.scan_iter(match=pattern, count=1000)}
    return {k.decode(): int(client.pttl(k)) for k in keys}


def assert_every_key_expires(keys: dict[str, int], longest_window_ms: float) -> None:
    for key, ttl in keys.items():
        assert ttl == -2 or 0 < ttl <= longest_window_ms, f"{key} has PTTL {ttl}"


@pytest.fixture
def limits_env(store: str, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Settings that turn the limits on, with the store's: for "redis" a private
    redis-server, flushed first; afterwards every limiter key left must have a TTL."""
    env = {"RATE_LIMIT_ENABLED": "1"}
    if store != "redis":
        yield env
        return
    server: RedisServer = request.getfixturevalue("limiter_redis")
    client = server.client()
    try:
        client.flushall()
        yield {**env, "REDIS_URL": server.url()}
        assert_every_key_expires(limiter_keys(client), 86_400_000)
    finally:
        client.close()


async def wait_for_log(server: Server, name: str, at_least: int = 1) -> int:
    """Wait until the server logged `name` `at_least` times; how many times it did."""
    with trio.move_on_after(LOG_WAIT):
        for _ in range(int(LOG_WAIT / 0.05) + 1):
            if len(log_lines(server, name)) >= at_least:
                break
            await trio.sleep(0.05)
    count = len(log_lines(server, name))
    assert count >= at_least, f"{name} logged {count} times:\n{server.output()[-3000:]}"
    return count


async def send(client: Client, data: Any = "x") -> dict[str, Any]:
    return await call(client, "message:send", data=data)


def assert_acked(frame: dict[str, Any]) -> None:
    assert frame["type"] == "message:ack", frame


def assert_rate_limited(frame: dict[str, Any], rule: str, window: float) -> float:
    """An `error` rate_limited for `rule`; returns its retry_after."""
    assert frame["type"] == "error" and frame["code"] == "rate_limited", frame
    assert rule in frame["message"], frame
    retry_after = frame["retry_after"]
    assert isinstance(retry_after, int | float) and 0 < retry_after <= window, frame
    return float(retry_after)


async def refused_handshake(server: Server, headers: list[tuple[bytes, bytes]] | None = None) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as refused:
        async with connect(server, extra_headers=headers or []):
            pytest.fail("the handshake should have been refused")
    return refused.value


def assert_429(status: int, headers: dict[str, str], body: bytes | None, rule: str, limit: int, window: int) -> int:
    """HTTP 429 with Retry-After, the IETF draft RateLimit headers and a JSON error; returns Retry-After."""
    assert status == 429, (status, headers, body)
    retry_after = int(headers["retry-after"])
    assert 1 <= retry_after <= window, headers
    assert headers["ratelimit-policy"] == f'"{rule}";q={limit};w={window}', headers
    assert re.fullmatch(rf'"{rule}";r=0;t=\d+', headers["ratelimit"]), headers
    assert body is not None
    error = orjson.loads(body)["error"]
    assert error["code"] == "rate_limited" and rule in error["message"], body
    return retry_after


def assert_rejected_429(rejected: ConnectionRejected, rule: str, limit: int, window: int) -> int:
    headers = {k.decode().lower(): v.decode() for k, v in rejected.headers}
    return assert_429(rejected.status_code, headers, rejected.body, rule, limit, window)


async def api_info(server: Server, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(lambda: http_get(f"{server.http}/api/info", headers, timeout=5.0))


@asynccontextmanager
async def member(server: Server, headers: list[tuple[bytes, bytes]] | None = None) -> AsyncIterator[Client]:
    """A client alone in a fresh session of its own."""
    async with connect(server, extra_headers=headers or []) as client:
        assert (await call(client, "session:create"))["type"] == "session:created"
        yield client


# --- 5. end to end: each limit at its boundary ------------------------------------------------------


@BOTH
async def test_messages_per_user_boundary_and_retry_after(
    limits_env: dict[str, str], tandem_factory: ServerFactory
) -> None:
    server = tandem_factory(
        **limits_env,
        RATE_LIMIT_MESSAGES_USER="3/2",
        RATE_LIMIT_MESSAGES_IP="off",
        MAX_CONSECUTIVE_ERRORS="1000",  # this test probes while refused
    )
    async with member(server) as a:
        first_sent = time.monotonic()
        assert_acked(await send(a))
        await trio.sleep(0.5)
        assert_acked(await send(a))
        gap = time.monotonic() - first_sent  # at least the time between the 1st and 2nd as stored
        assert_acked(await send(a))
        refused = await send(a)  # the 4th within 2 s
        refused_at = time.monotonic()
        retry_after = assert_rate_limited(refused, "messages_user", 2.0)
        await assert_alive(a)  # the connection stays open and serves other requests
        # Probe every 50 ms: the first message admitted comes when retry_after said.
        admitted_at = None
        for _ in range(100):
            sent_at = time.monotonic()
            reply = await send(a)
            if reply["type"] == "message:ack":
                admitted_at = sent_at
                break
            left = assert_rate_limited(reply, "messages_user", 2.0)
            assert abs((refused_at + retry_after) - (time.monotonic() + left)) < 1.0
            await trio.sleep(0.05)
        assert admitted_at is not None, "never admitted again"
        assert abs(admitted_at - (refused_at + retry_after)) < 1.0
        assert admitted_at > refused_at + retry_after - 0.5  # and not much earlier
        # The first message left the window and its slot was taken; the next slot opens when
        # the 2nd message (0.5 s after the 1st) leaves: sliding, not a reset.
        again = assert_rate_limited(await send(a), "messages_user", 2.0)
        assert again <= gap + 0.001
        await assert_alive(a)


@BOTH
async def test_messages_per_ip_across_two_members(limits_env: dict[str, str], tandem_factory: ServerFactory) -> None:
    server = tandem_factory(**limits_env, RATE_LIMIT_MESSAGES_USER="2/2", RATE_LIMIT_MESSAGES_IP="3/2")
    async with member(server) as a, member(server) as b:  # two sessions, one address
        assert_acked(await send(a))
        assert_acked(await send(a))
        assert_rate_limited(await send(a), "messages_user", 2)  # a's own limit; counts nothing
        assert_acked(await send(b))  # the 3rd from this address
        retry_after = assert_rate_limited(await send(b), "messages_ip", 2)  # b sent 1: the address's limit
        assert_rate_limited(await send(a), "messages_user", 2)
        await assert_alive(a)
        await assert_alive(b)
        await trio.sleep(retry_after + 0.05)  # the window moved past a's 1st message
        assert_acked(await send(b))


@BOTH
async def test_repeated_rate_limited_closes_with_1008(
    limits_env: dict[str, str], tandem_factory: ServerFactory
) -> None:
    server = tandem_factory(
        **limits_env, RATE_LIMIT_MESSAGES_USER="2/30", RATE_LIMIT_MESSAGES_IP="off", MAX_CONSECUTIVE_ERRORS="3"
    )
    async with member(server) as a:
        assert_acked(await send(a))
        assert_acked(await send(a))
        for _ in range(2):
            assert_rate_limited(await send(a), "messages_user", 30)
        await assert_alive(a)  # a ping in between does not excuse them
        assert_rate_limited(await send(a), "messages_user", 30)  # the third
        assert await frames_until_close(a, 5) == ([], 1008)


@BOTH
async def test_connections_per_ip_get_429_before_the_upgrade(
    limits_env: dict[str, str], tandem_factory: ServerFactory
) -> None:
    server = tandem_factory(**limits_env, RATE_LIMIT_CONNECTIONS_IP="3/2")
    async with connect(server) as a, connect(server) as b, connect(server) as c:
        rejected = await refused_handshake(server)  # the 4th within 2 s
        retry_after = assert_rejected_429(rejected, "connections_ip", 3, 2)
        # No WebSocket was accepted for it: the log shows three opened, no fourth.
        await wait_for_log(server, "connection.open", 3)
        await trio.sleep(0.2)
        assert len(log_lines(server, "connection.open")) == 3
        for client in (a, b, c):  # those already open are not affected
            await assert_alive(client)
        await trio.sleep(retry_after)
        async with connect(server) as d:  # the window moved
            await assert_alive(d)
    assert len(log_lines(server, "connection.open")) >= 4


@BOTH
async def test_failed_joins_per_ip(limits_env: dict[str, str], tandem_factory: ServerFactory) -> None:
    server = tandem_factory(**limits_env, RATE_LIMIT_JOIN_FAILURES_IP="3/2")
    async with connect(server) as owner, connect(server) as b, connect(server) as c:
        code = (await call(owner, "session:create"))["code"]
        for _ in range(3):  # three unknown codes
            assert (await call(b, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
        # Over the limit: even the right code is refused, from any connection of this address.
        retry_after = assert_rate_limited(await call(b, "session:join", code=code), "join_failures_ip", 2.0)
        assert_rate_limited(await call(c, "session:join", code=code), "join_failures_ip", 2.0)
        await assert_alive(b)
        await trio.sleep(retry_after + 0.05)  # the window moved
        assert (await call(b, "session:join", code=code))["type"] == "session:joined"


@BOTH
async def test_api_per_ip(limits_env: dict[str, str], tandem_factory: ServerFactory) -> None:
    server = tandem_factory(**limits_env, RATE_LIMIT_API_IP="3/2")
    for n in range(3):
        status, headers, body = await api_info(server)
        assert status == 200, body
        assert headers["ratelimit-policy"] == '"api_ip";q=3;w=2', headers
        assert re.fullmatch(rf'"api_ip";r={2 - n};t=[12]', headers["ratelimit"]), headers
        assert "retry-after" not in headers
        assert orjson.loads(body)["rate_limits"]["api_ip"] == {"limit": 3, "window": 2.0}
    retry_after = assert_429(*await api_info(server), "api_ip", 3, 2)
    for _ in range(5):  # only /api is counted
        assert (await trio.to_thread.run_sync(lambda: http_get(f"{server.http}/health/live", timeout=5.0)))[0] == 200
    await trio.sleep(retry_after)
    assert (await api_info(server))[0] == 200


LIMIT_SETTINGS = (
    "RATE_LIMIT_MESSAGES_USER",
    "RATE_LIMIT_MESSAGES_IP",
    "RATE_LIMIT_CONNECTIONS_IP",
    "RATE_LIMIT_JOIN_FAILURES_IP",
    "RATE_LIMIT_CODE_FAILURES",
    "RATE_LIMIT_API_IP",
)


@BOTH
@pytest.mark.parametrize("how", ["each_off", "all_disabled"])
async def test_limits_off_admit_everything(how: str, limits_env: dict[str, str], tandem_factory: ServerFactory) -> None:
    if how == "each_off":  # every limit "off" ("0" means the same), the switch on
        settings = {name: "off" for name in LIMIT_SETTINGS} | {"RATE_LIMIT_API_IP": "0"}
    else:  # the smallest limits, and RATE_LIMIT_ENABLED=0
        settings = {name: "1/60" for name in LIMIT_SETTINGS} | {"RATE_LIMIT_ENABLED": "0"}
    server = tandem_factory(**(limits_env | settings))
    async with connect(server) as owner, connect(server) as b, connect(server) as c:
        code = (await call(owner, "session:create"))["code"]
        for _ in range(4):
            assert_acked(await send(owner))
        for _ in range(3):
            assert (await call(b, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
        assert (await call(b, "session:join", code=code))["type"] == "session:joined"
        for _ in range(3):
            assert_acked(await send(b))
        await assert_alive(c)
    for _ in range(3):
        status, headers, _body = await api_info(server)
        assert status == 200 and "ratelimit" not in headers and "ratelimit-policy" not in headers


# --- 6. the client's address: X-Forwarded-For only from a trusted proxy ------------------------------


async def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    tmp_path: Path, tandem_factory: ServerFactory
) -> None:
    limits = {"RATE_LIMIT_ENABLED": "1", "RATE_LIMIT_CONNECTIONS_IP": "2/30", "RATE_LIMIT_API_IP": "2/30"}
    # Nothing trusted (the default), and proxies listed that are not the peer (127.0.0.1).
    for n, trusted in enumerate(({}, {"TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"})):
        server = tandem_factory(data_dir=tmp_path / f"data-{n}", **limits, **trusted)
        async with connect(server, extra_headers=xff("203.0.113.1")), connect(server, extra_headers=xff("203.0.113.2")):
            for headers in (xff("203.0.113.3"), xff("198.51.100.7, 203.0.113.4"), None):
                assert_rejected_429(await refused_handshake(server, headers), "connections_ip", 2, 30)
        assert (await api_info(server, {"X-Forwarded-For": "203.0.113.1"}))[0] == 200
        assert (await api_info(server, {"X-Forwarded-For": "203.0.113.2"}))[0] == 200
        assert_429(*await api_info(server, {"X-Forwarded-For": "203.0.113.3"}), "api_ip", 2, 30)
        assert_429(*await api_info(server), "api_ip", 2, 30)


async def test_forwarded_for_from_a_trusted_proxy_gets_separate_budgets(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(
        RATE_LIMIT_ENABLED="1",
        TRUSTED_PROXIES="127.0.0.1",
        RATE_LIMIT_CONNECTIONS_IP="2/30",
        RATE_LIMIT_API_IP="2/30",
        RATE_LIMIT_MESSAGES_USER="off",
        RATE_LIMIT_MESSAGES_IP="2/30",
    )
    a, b = "203.0.113.1", "203.0.113.2"
    async with connect(server, extra_headers=xff(a)), connect(server, extra_headers=xff(a)):
        assert_rejected_429(await refused_handshake(server, xff(a)), "connections_ip", 2, 30)
        # What the client wrote left of the proxy's entry is ignored: the nearest untrusted hop counts.
        assert_rejected_429(await refused_handshake(server, xff(f"198.51.100.9, {a}")), "connections_ip", 2, 30)
        async with connect(server, extra_headers=xff(b)), connect(server, extra_headers=xff(f"{b}, 127.0.0.1")):
            assert_rejected_429(await refused_handshake(server, xff(b)), "connections_ip", 2, 30)
        async with connect(server) as proxy_itself:  # no header: the peer's own budget
            await assert_alive(proxy_itself)
    # Messages per IP follow the forwarded address too.
    async with member(server, xff("203.0.113.3")) as c, member(server, xff("203.0.113.4")) as d:
        assert_acked(await send(c))
        assert_acked(await send(c))
        assert_rate_limited(await send(c), "messages_ip", 30)
        assert_acked(await send(d))
    assert (await api_info(server, {"X-Forwarded-For": a}))[0] == 200
    assert (await api_info(server, {"X-Forwarded-For": a}))[0] == 200
    assert_429(*await api_info(server, {"X-Forwarded-For": a}), "api_ip", 2, 30)
    assert (await api_info(server, {"X-Forwarded-For": b}))[0] == 200


# --- 7. shared by every instance: one Redis, the 3-master cluster -----------------------------------

SHARED_LIMITS = {
    "RATE_LIMIT_ENABLED": "1",
    "TRUSTED_PROXIES": "127.0.0.1",  # so that one test can be several addresses
    "RATE_LIMIT_CONNECTIONS_IP": "3/30",
    "RATE_LIMIT_MESSAGES_USER": "3/30",
    "RATE_LIMIT_MESSAGES_IP": "4/30",
    "RATE_LIMIT_JOIN_FAILURES_IP": "2/30",
    "RATE_LIMIT_CODE_FAILURES": "5/30",
    "RATE_LIMIT_API_IP": "2/30",
}


async def assert_instances_share_limits(s1: Server, s2: Server) -> None:
    """Every limit counts requests to either instance together (SHARED_LIMITS)."""
    # Connections from one address, alternating instances.
    one = xff("203.0.113.30")
    async with connect(s1, extra_headers=one), connect(s2, extra_headers=one), connect(s1, extra_headers=one):
        assert_rejected_429(await refused_handshake(s2, one), "connections_ip", 3, 30)
        assert_rejected_429(await refused_handshake(s1, one), "connections_ip", 3, 30)
    # Messages from one address: the two members of a session, one on each instance.
    one = xff("203.0.113.31")
    async with connect(s1, extra_headers=one) as a, connect(s2, extra_headers=one) as b:
        created = await call(a, "session:create")
        assert (await call(b, "session:join", code=created["code"]))["type"] == "session:joined"
        for client in (a, a, b, b):
            assert_acked(await send(client))
        assert_rate_limited(await send(b), "messages_ip", 30)
        assert_rate_limited(await send(a), "messages_ip", 30)
    # One member's messages, before and after session:resume moved it to the other instance.
    async with connect(s1, extra_headers=xff("203.0.113.32")) as first:
        created = await call(first, "session:create")
        for _ in range(3):
            assert_acked(await send(first))
        assert_rate_limited(await send(first), "messages_user", 30)
        async with connect(s2, extra_headers=xff("203.0.113.33")) as moved:
            resume = {k: created[k] for k in ("code", "client_id", "token")}
            assert (await call(moved, "session:resume", **resume, last_seq=3))["type"] == "session:resumed"
            assert_rate_limited(await send(moved), "messages_user", 30)
    # Failed joins and API calls.
    one = xff("203.0.113.34")
    async with connect(s1, extra_headers=one) as j1, connect(s2, extra_headers=one) as j2:
        assert (await call(j1, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
        assert (await call(j2, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
        assert_rate_limited(await call(j1, "session:join", code=UNKNOWN_CODE), "join_failures_ip", 30)
        assert_rate_limited(await call(j2, "session:join", code=UNKNOWN_CODE), "join_failures_ip", 30)
    api = {"X-Forwarded-For": "203.0.113.35"}
    assert (await api_info(s1, api))[0] == 200
    assert (await api_info(s2, api))[0] == 200
    assert_429(*await api_info(s1, api), "api_ip", 2, 30)
    assert_429(*await api_info(s2, api), "api_ip", 2, 30)


@pytest.mark.parametrize("store", ["redis"])
async def test_two_instances_on_one_redis_share_the_limits(
    limits_env: dict[str, str], tandem_factory: ServerFactory
) -> None:
    s1 = tandem_factory(**(limits_env | SHARED_LIMITS))
    s2 = tandem_factory(**(limits_env | SHARED_LIMITS))
    await assert_instances_share_limits(s1, s2)


async def test_limits_on_a_three_master_cluster(cluster: RedisCluster3, tandem_factory: ServerFactory) -> None:
    settings = SHARED_LIMITS | {"REDIS_URL": cluster.url, "REDIS_CLUSTER": "1"}
    s1 = tandem_factory(**settings)
    s2 = tandem_factory(**settings)
    await assert_instances_share_limits(s1, s2)
    found: dict[str, int] = {}
    for node in cluster.nodes:  # every key, on whichever master holds its slot, expires
        client = node.client()
        try:
            found |= limiter_keys(client)
        finally:
            client.close()
    assert {key_rule(k) for k in found} == {
        "connections_ip",
        "messages_ip",
        "messages_user",
        "join_failures_ip",
        "code_failures",
        "api_ip",
    }
    assert_every_key_expires(found, 30_000)


# --- 8. Redis down: fail-open from memory, or fail-closed ---------------------------------------------


async def test_redis_down_fails_open_or_closed(tmp_path: Path, tandem_factory: ServerFactory) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        limits = {"RATE_LIMIT_ENABLED": "1", "REDIS_URL": redis_server.url(), "RATE_LIMIT_CONNECTIONS_IP": "3/30"}
        fail_open = tandem_factory(**limits)
        fail_closed = tandem_factory(**limits, RATE_LIMIT_FAIL_CLOSED="1")
        for server in (fail_open, fail_closed):  # counted in Redis: 2 of 3
            async with connect(server) as client:
                await assert_alive(client)
        redis_server.stop()

        # Fail-open (the default): this process's memory decides, from an empty window.
        for _ in range(3):
            async with connect(fail_open) as client:
                await assert_alive(client)
        for _ in range(2):
            assert_rejected_429(await refused_handshake(fail_open), "connections_ip", 3, 30)
        # Fail-closed: refused while Redis is down.
        for _ in range(3):
            rejected = await refused_handshake(fail_closed)
            assert rejected.status_code == 429
            assert int(dict(rejected.headers)[b"retry-after"]) >= 1
        # Logged once per outage, not once per request (5 and 3 checks made).
        for server in (fail_open, fail_closed):
            await wait_for_log(server, "limiter.redis_down")
        await trio.sleep(0.3)
        assert [line["fail_closed"] for line in log_lines(fail_open, "limiter.redis_down")] == [False]
        assert [line["fail_closed"] for line in log_lines(fail_closed, "limiter.redis_down")] == [True]

        redis_server.start()  # back, empty (it keeps nothing across a restart): Redis decides again
        async with connect(fail_closed) as client:
            await assert_alive(client)
        async with connect(fail_open) as client:  # its in-memory window is full: Redis said yes
            await assert_alive(client)
        # The outage's checks were counted: 5 and 3 decided without Redis.
        for server, fallbacks in ((fail_open, 5), (fail_closed, 3)):
            await wait_for_log(server, "limiter.redis_back")
            assert [line["fallbacks"] for line in log_lines(server, "limiter.redis_back")] == [fallbacks]
    finally:
        redis_server.stop()


# --- 9. every limiter key has a TTL ---------------------------------------------------------------------


def key_rule(key: str) -> str:
    """The rule of a limiter key: tandem:rl:{rule:key} or tandem:{CODE}:rl:rule:client_id."""
    if key.startswith("tandem:rl:{"):
        return key[len("tandem:rl:{") :].split(":", 1)[0]
    return key.split(":rl:", 1)[1].split(":", 1)[0]


async def test_every_limiter_key_has_a_ttl(limiter_redis: RedisServer, tandem_factory: ServerFactory) -> None:
    client = limiter_redis.client()
    try:
        client.flushall()
        server = tandem_factory(
            RATE_LIMIT_ENABLED="1", REDIS_URL=limiter_redis.url(), **{name: "5/20" for name in LIMIT_SETTINGS}
        )
        async with connect(server) as owner, connect(server) as b:
            created = await call(owner, "session:create")
            assert_acked(await send(owner))
            assert (await call(b, "session:join", code=UNKNOWN_CODE))["code"] == "not_found"
            joined = await call(b, "session:join", code=created["code"])
            assert_acked(await send(b))
        assert (await api_info(server))[0] == 200
        keys = limiter_keys(client)
        assert {key_rule(k) for k in keys} == {
            "connections_ip",
            "messages_ip",
            "messages_user",
            "join_failures_ip",
            "code_failures",
            "api_ip",
        }, keys
        code = created["code"]
        for client_id in (created["client_id"], joined["client_id"]):  # a member's, beside its session
            assert f"tandem:{{{code}}}:rl:messages_user:{client_id}" in keys, keys
        assert_every_key_expires(keys, 20_000)
        assert all(ttl > 0 for ttl in keys.values()), keys
    finally:
        client.close()
