"""The admin API (`/api/debug/*`) against real servers: on the embedded store, and on a
private Redis with two instances, where one instance lists, inspects and ends the
sessions of the other.

Listing is checked page by page (filters, cursors from either instance, bad
parameters), inspecting field by field, ending through every member's socket; the
token is checked for being required, compared, counted against `/api/*`'s limit and
never logged. A page's cost is checked in-process (at most LIST_BUDGET sessions
examined, whatever the store holds) and on Redis with `redis-cli monitor`
(nothing but ZSCAN and scripts). Redis down gives JSON 503s; a Redis Cluster
serves the same calls.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt_keys
import orjson
import pytest
import trio
from helpers import (
    BOTH_STORES,
    STORES,
    UNKNOWN_CODE,
    Server,
    ServerFactory,
    assert_alive,
    assert_ms_near_now,
    assert_no_trace,
    call,
    connect,
    eventually,
    http,
    http_request,
    log_lines,
    paired,
    resume,
)
from redis_servers import REDIS_CLI, RedisCluster3, RedisFactory, RedisServer

import session_store
from redis_store import RedisStore
from session_store import LIST_BUDGET, Event, SessionStore
from sqlite_store import SqliteStore

ADMIN_TOKEN = "admin-token-0123456789-abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WRONG_TOKEN = "wrong-token-0123456789-abcdef"
BODY = "message-body-that-no-answer-holds"
Servers = Callable[..., list[Server]]
# Authentication on, with the tests' HS256 secret, audience and issuer.
AUTH_SETTINGS = {"AUTH_JWT_SECRET": jwt_keys.SECRET, "AUTH_AUDIENCE": jwt_keys.AUDIENCE, "AUTH_ISSUER": jwt_keys.ISSUER}


@pytest.fixture
def servers(store: str, tandem_factory: ServerFactory, private_redis: RedisFactory, tmp_path: Path) -> Servers:
    """Start the servers of one test: one on the embedded store, or two on a private Redis
    (so that a listing sees this test's sessions only). Settings go to every server."""

    def start(**settings: str) -> list[Server]:
        env = {"ADMIN_TOKEN": ADMIN_TOKEN, **settings}
        if store == "sqlite":
            return [tandem_factory(**env)]
        redis_url = private_redis().url()
        return [tandem_factory(data_dir=tmp_path / f"data-{n}", REDIS_URL=redis_url, **env) for n in range(2)]

    return start


async def admin(
    server: Server, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One admin request: (status, headers, the JSON body or None)."""
    status, response_headers, body = await http(
        method, server.http + path, headers=AUTH if headers is None else headers
    )
    return status, response_headers, orjson.loads(body) if body else None


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and body["error"]["code"] == code and body["error"]["message"], body


async def listing(servers: list[Server], query: str) -> tuple[list[dict[str, Any]], int]:
    """Every session a listing gives, following `next_cursor` from instance to instance: (sessions, pages)."""
    found: list[dict[str, Any]] = []
    cursor = None
    for page in range(100):
        suffix = "" if cursor is None else f"&cursor={cursor}"
        status, _, body = await admin(servers[page % len(servers)], "GET", f"/api/debug/sessions?{query}{suffix}")
        assert status == 200, body
        assert set(body) == {"sessions", "next_cursor"}, body
        found += body["sessions"]
        cursor = body["next_cursor"]
        if cursor is None:
            return found, page + 1
    raise AssertionError("more than 100 pages")


# --- off, and the token ----------------------------------------------------------------------


async def test_the_admin_api_is_off_without_a_token_and_every_api_error_is_json(tandem_factory: ServerFactory) -> None:
    server = tandem_factory()  # no ADMIN_TOKEN
    for method, path in (
        ("GET", "/api/debug/sessions"),
        ("GET", f"/api/debug/sessions/{UNKNOWN_CODE}"),
        ("DELETE", f"/api/debug/sessions/{UNKNOWN_CODE}"),
    ):
        status, _, body = await admin(server, method, path)
        assert_error(status, body, 404, "not_found")
        assert "ADMIN_TOKEN" in body["error"]["message"]
    status, _, body = await admin(server, "GET", "/api/nothing-here")
    assert_error(status, body, 404, "not_found")
    status, headers, body = await admin(server, "POST", "/api/debug/sessions")
    assert_error(status, body, 405, "bad_request")
    assert "GET" in headers["allow"]
    # Outside /api/ Starlette's own answers stay as they were.
    status, _, raw = await http("GET", server.http + "/nothing-here")
    assert status == 404 and not raw.startswith(b"{")


@BOTH_STORES
async def test_a_missing_or_wrong_token_is_401_counted_against_the_api_limit_and_never_logged(
    servers: Servers,
) -> None:
    group = servers(RATE_LIMIT_ENABLED="1", RATE_LIMIT_API_IP="4/60")
    first, last = group[0], group[-1]
    attempts: list[tuple[Server, dict[str, str], str]] = [
        (first, {}, "Authorization"),
        (last, {"Authorization": f"Bearer {WRONG_TOKEN}"}, "wrong admin token"),
        (first, {"Authorization": f"Basic {ADMIN_TOKEN}"}, "Authorization"),  # the right secret, the wrong scheme
        (last, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, "wrong admin token"),
    ]
    for server, headers, message in attempts:
        status, response_headers, body = await admin(server, "GET", "/api/debug/sessions", headers)
        assert_error(status, body, 401, "unauthorized")
        assert message in body["error"]["message"]
        assert response_headers["www-authenticate"].startswith("Bearer")
        assert response_headers["ratelimit-policy"] == '"api_ip";q=4;w=60'
    # Four failures used the address's budget (on Redis, across both instances): the right token waits too.
    status, headers, body = await admin(first, "GET", "/api/debug/sessions")
    assert_error(status, body, 429, "rate_limited")
    assert "api_ip" in body["error"]["message"] and int(headers["retry-after"]) >= 1

    refusals = [line for server in group for line in log_lines(server, "admin.refused")]
    assert {line["reason"] for line in refusals} == {"missing", "wrong"}, refusals
    assert all(line["ip"].startswith("ip-") and line["action"] == "list" for line in refusals), refusals
    for server in group:
        assert ADMIN_TOKEN not in server.output() and WRONG_TOKEN not in server.output()


# --- list ----------------------------------------------------------------------------------------


@BOTH_STORES
async def test_list_filters_by_state_and_pages_with_cursors_from_either_instance(servers: Servers) -> None:
    group = servers()
    first, last = group[0], group[-1]
    async with connect(first) as w1, connect(last) as w2, connect(first) as w3, paired(last) as (a, b, created, _):
        waiting = [(await client.create())["code"] for client in (w1, w2, w3)]
        async with paired(first) as (_, _, created_2, _):
            paired_codes = [created["code"], created_2["code"]]
            assert await a.message(BODY) == 1
            await b.expect("message")

            sessions, pages = await listing(group, "limit=2")
            assert sorted(s["code"] for s in sessions) == sorted(waiting + paired_codes)
            assert pages == 3  # 5 sessions, 2 a page; on Redis the last page may come back short
            by_code = {s["code"]: s for s in sessions}
            for code in waiting:
                assert by_code[code]["state"] == "waiting" and len(by_code[code]["members"]) == 1
            one = by_code[created["code"]]
            assert one["state"] == "paired" and one["last_seq"] == 1
            assert one["members"] == [
                {"client_id": created["client_id"], "online": True, "user": None},
                {"client_id": one["members"][1]["client_id"], "online": True, "user": None},
            ]
            assert_ms_near_now(one["created_at"])
            assert one["expires_at"] > one["created_at"]

            found, _ = await listing(group, "state=waiting&limit=1")
            assert sorted(s["code"] for s in found) == sorted(waiting)
            found, _ = await listing(group, "state=paired")
            assert sorted(s["code"] for s in found) == sorted(paired_codes)
            assert all(s["state"] == "paired" for s in found)
            # Nothing of a member's secret, nor of a message, in any answer.
            status, _, raw = await http("GET", first.http + "/api/debug/sessions", headers=AUTH)
            assert status == 200 and created["token"].encode() not in raw and BODY.encode() not in raw
            assert b'"token"' not in raw and b'"data"' not in raw


@BOTH_STORES
async def test_bad_list_parameters_and_cursors_are_400(servers: Servers) -> None:
    group = servers()
    async with connect(group[0]) as w1, connect(group[-1]) as w2:
        for client in (w1, w2):
            await client.create()
        status, _, body = await admin(group[0], "GET", "/api/debug/sessions?state=waiting&limit=1")
        assert status == 200 and len(body["sessions"]) == 1 and body["next_cursor"]
        cursor = body["next_cursor"]
        for query in ("limit=0", "limit=1001", "limit=ten", "limit=-1", "state=open", "state=", "cursor=abc"):
            status, _, body = await admin(group[-1], "GET", f"/api/debug/sessions?{query}")
            assert_error(status, body, 400, "bad_request")
        encoded, _, mac = cursor.partition(".")

        def other(char: str) -> str:  # another base64 character; a first one, so no bit of it is padding
            return "B" if char == "A" else "A"

        for bad in (
            f"state=paired&cursor={cursor}",  # issued for another state
            f"cursor={cursor}",  # ... and for none
            f"state=waiting&cursor={encoded}.{other(mac[0])}{mac[1:]}",  # its MAC changed
            f"state=waiting&cursor={other(encoded[0])}{encoded[1:]}.{mac}",  # its position changed
        ):
            status, _, body = await admin(group[-1], "GET", f"/api/debug/sessions?{bad}")
            assert_error(status, body, 400, "bad_request")
            assert "cursor" in body["error"]["message"]
        status, _, body = await admin(group[-1], "GET", f"/api/debug/sessions?state=waiting&limit=1&cursor={cursor}")
        assert status == 200 and len(body["sessions"]) == 1


# --- inspect -----------------------------------------------------------------------------------


@BOTH_STORES
async def test_inspect_one_session_in_any_case_and_404_for_none(servers: Servers) -> None:
    group = servers()
    async with paired(group[0]) as (a, b, created, joined):
        code = created["code"]
        assert await a.message({"x": 1}) == 1
        await b.expect("message")
        assert await b.message("two") == 2
        await a.expect("message")
        await b.ws.aclose()  # b drops: offline, still a member
        await a.expect("session:presence")

        status, _, body = await admin(group[-1], "GET", f"/api/debug/sessions/{code.lower()}")
        assert status == 200, body
        assert body["code"] == code and body["state"] == "paired" and body["last_seq"] == 2
        assert body["members"] == [
            {"client_id": created["client_id"], "online": True, "user": None},
            {"client_id": joined["client_id"], "online": False, "user": None},
        ]
        assert_ms_near_now(body["created_at"])
        assert_ms_near_now(body["expires_at"], slack_ms=1900_000)
        assert body["expires_at"] > time.time() * 1000 + 1700_000  # SESSION_IDLE_TIMEOUT 1800 s after the last message
        assert set(body) == {"code", "state", "members", "last_seq", "created_at", "expires_at"}

    status, _, body = await admin(group[0], "GET", f"/api/debug/sessions/{UNKNOWN_CODE}")
    assert_error(status, body, 404, "not_found")
    for malformed in ("ABC", "ILLEGAL0", "A" * 13):
        status, _, body = await admin(group[0], "GET", f"/api/debug/sessions/{malformed}")
        assert_error(status, body, 400, "bad_request")


# --- end ---------------------------------------------------------------------------------------


@BOTH_STORES
async def test_ending_a_session_tells_its_members_on_every_instance_and_leaves_nothing(servers: Servers) -> None:
    """On Redis the first instance ends two sessions: one whose members are both on the
    other instance (the first holds no subscription of it), one split across both."""
    group = servers()
    first, last = group[0], group[-1]
    async with connect(last) as a, connect(last) as b, connect(first) as c, connect(last) as d, connect(first) as e:
        remote = await a.create()
        await b.join(remote["code"])
        split = await c.create()
        await d.join(split["code"])
        other = await e.create()  # not ended: must go on
        for client in (a, b, c, d):
            await client.expect("session:paired")
        assert await a.message("before") == 1
        await b.expect("message")

        for session in (remote, split):
            status, _, body = await admin(first, "DELETE", f"/api/debug/sessions/{session['code'].lower()}")
            assert status == 204 and body is None
        for client, session in ((a, remote), (b, remote), (c, split), (d, split)):
            expired = await client.expect("session:expired")
            assert expired == {"type": "session:expired", "code": session["code"], "reason": "ended"}
            await assert_alive(client)  # the socket stays open, in no session
            reply = await call(client, "message:send", data="after")
            assert reply["type"] == "error" and reply["code"] == "not_in_session", reply

        for session in (remote, split):
            for method in ("GET", "DELETE"):
                status, _, body = await admin(last, method, f"/api/debug/sessions/{session['code']}")
                assert_error(status, body, 404, "not_found")
        async with connect(last) as late:
            reply = await resume(late, remote, 0, expect_resumed=False)
            assert reply["type"] == "error" and reply["code"] == "not_found", reply
        assert_no_trace(first, [remote["code"], split["code"]])
        assert await e.message("still here") == 1
        status, _, body = await admin(first, "GET", f"/api/debug/sessions/{other['code']}")
        assert status == 200 and body["last_seq"] == 1

    ended = [line for server in group for line in log_lines(server, "session.ended")]
    assert sorted(line["reason"] for line in ended) == ["ended", "ended"], ended
    for server in group:  # the access log shows the path without its code
        assert remote["code"] not in server.output() and split["code"] not in server.output()
        paths = [line["path"] for line in log_lines(server, "http.request")]
        assert "/api/debug/sessions/{code}" in paths, paths


# --- what a page costs ----------------------------------------------------------------------


def start_monitor(server: RedisServer, log: Path) -> subprocess.Popen[bytes]:
    """`redis-cli monitor`: every command Redis runs, one line each, into `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([REDIS_CLI, "-p", str(server.port), "monitor"], stdout=out)


def monitored_commands(log: Path) -> list[str]:
    """The command names `redis-cli monitor` wrote to `log`, in lower case."""
    commands = []
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split('"')
        if len(parts) > 1:
            commands.append(parts[1].lower())
    return commands


async def test_a_redis_listing_walks_the_expiry_index_and_never_the_keyspace(
    private_redis: RedisFactory, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    redis_server = private_redis()
    server = tandem_factory(REDIS_URL=redis_server.url(), ADMIN_TOKEN=ADMIN_TOKEN)
    async with connect(server) as a, connect(server) as b, connect(server) as c:
        codes = [(await client.create())["code"] for client in (a, b, c)]
        log = tmp_path / "monitor.log"
        monitor = start_monitor(redis_server, log)
        try:
            await trio.sleep(0.3)  # the monitor is attached
            found, pages = await listing([server], "limit=1000")
            await trio.sleep(0.3)  # its lines are written
        finally:
            monitor.kill()
            monitor.wait(10)
    assert sorted(s["code"] for s in found) == sorted(codes) and pages == 1
    commands = monitored_commands(log)
    assert "zscan" in commands and "evalsha" in commands, commands
    assert not {"keys", "scan", "hscan", "sscan", "hgetall", "zrange"} & set(commands), commands
    # One ZSCAN per expiry bucket (16, each holding at most a few codes here).
    assert commands.count("zscan") == 16, commands


@pytest.mark.parametrize("kind", STORES)
async def test_a_page_examines_at_most_the_budget_whatever_the_store_holds(
    kind: str, private_redis: RedisFactory, tmp_path: Path
) -> None:
    """In-process: LIST_BUDGET + 100 waiting sessions and none paired. A listing of the
    paired ones examines at most LIST_BUDGET sessions a page: an empty page with a
    cursor first, then the rest; every waiting session is found once across pages."""

    def ignore(event: Event) -> None:
        pass

    count = LIST_BUDGET + 100
    settings: dict[str, Any] = {"history_size": 10, "idle_ms": 600_000, "ttl_ms": 600_000}
    opened: Any = (
        SqliteStore.open(tmp_path / "data", ignore, **settings)
        if kind == "sqlite"
        else RedisStore.open(private_redis().url(), ignore, cluster=False, **settings)
    )
    async with opened as store:
        assert isinstance(store, SessionStore)
        codes = iter(f"{n:08d}" for n in range(count))  # digits only: codes of the alphabet, distinct

        async def create(n: int) -> None:
            await store.create(lambda: next(codes), f"client{n}", b"x" * 32, f"conn{n}", int(time.time() * 1000))

        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(create, n)
        now = int(time.time() * 1000)
        page = await store.list_sessions(now, "paired", 10, None)
        assert page.sessions == () and page.after is not None  # stopped by the budget, not by the end
        pages = 1
        after: str | None = page.after
        while after is not None and pages < 10:
            page = await store.list_sessions(now, "paired", 10, after)
            assert page.sessions == ()
            pages, after = pages + 1, page.after
        assert after is None and pages >= 2
        seen: list[str] = []
        position: str | None = None
        for _ in range(count):
            page = await store.list_sessions(now, "waiting", 1000, position)
            seen += [s.code for s in page.sessions]
            position = page.after
            if position is None:
                break
        assert sorted(seen) == [f"{n:08d}" for n in range(count)]
        info = await store.inspect("00000007", now)
        assert info is not None and info.state == session_store.STATES[0] and info.members[0].client_id


async def test_while_redis_is_down_every_admin_call_is_a_json_503(
    private_redis: RedisFactory, tandem_factory: ServerFactory
) -> None:
    redis_server = private_redis(appendonly=True)  # the session outlives the restart
    server = tandem_factory(REDIS_URL=redis_server.url(), ADMIN_TOKEN=ADMIN_TOKEN)
    async with connect(server) as a:
        code = (await a.create())["code"]
        redis_server.stop()
        for method, path in (
            ("GET", "/api/debug/sessions"),
            ("GET", f"/api/debug/sessions/{code}"),
            ("DELETE", f"/api/debug/sessions/{code}"),
        ):
            started = time.monotonic()
            status, headers, body = await admin(server, method, path)
            assert_error(status, body, 503, "unavailable")
            assert int(headers["retry-after"]) >= 1 and time.monotonic() - started < 6
        redis_server.start()
        status, _, body = await eventually(
            lambda: http_request("GET", f"{server.http}/api/debug/sessions/{code}", headers=AUTH),
            until=lambda answer: answer[0] == 200,
            within=10,
        )
        assert orjson.loads(body)["code"] == code


async def test_on_a_redis_cluster_two_instances_list_inspect_and_end(
    cluster: RedisCluster3, tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    """The index's buckets and the sessions live on three masters: each ZSCAN and script goes
    to its node."""
    group = [
        tandem_factory(data_dir=tmp_path / f"d{n}", REDIS_URL=cluster.url, REDIS_CLUSTER="1", ADMIN_TOKEN=ADMIN_TOKEN)
        for n in range(2)
    ]
    async with connect(group[0]) as w1, connect(group[1]) as w2, paired(group[1]) as (a, b, created, _):
        waiting = [(await client.create())["code"] for client in (w1, w2)]
        found, _ = await listing(group, "limit=1")
        assert sorted(s["code"] for s in found) == sorted([*waiting, created["code"]])
        found, _ = await listing(group, "state=paired")
        assert [s["code"] for s in found] == [created["code"]]
        status, _, _ = await admin(group[0], "DELETE", f"/api/debug/sessions/{created['code']}")
        assert status == 204
        for client in (a, b):
            assert (await client.expect("session:expired"))["reason"] == "ended"
        found, _ = await listing(group, "")
        assert sorted(s["code"] for s in found) == sorted(waiting)


@BOTH_STORES
async def test_with_authentication_on_each_member_shows_its_user(servers: Servers) -> None:
    group = servers(**AUTH_SETTINGS)
    alice, bob = jwt_keys.claims("alice"), jwt_keys.claims("bob")
    async with connect(group[0]) as a, connect(group[-1]) as b:
        for client, payload in ((a, alice), (b, bob)):
            reply = await client.request("auth", token=jwt_keys.token(jwt_keys.SECRET, payload))
            assert reply["type"] == "auth:ok", reply
        created = await a.create()
        joined = await b.join(created["code"])
        status, _, body = await admin(group[-1], "GET", f"/api/debug/sessions/{created['code']}")
        assert status == 200, body
        assert body["members"] == [
            {"client_id": created["client_id"], "online": True, "user": "alice"},
            {"client_id": joined["client_id"], "online": True, "user": "bob"},
        ]
        found, _ = await listing(group, "state=paired")
        assert [s["members"] for s in found] == [body["members"]]
