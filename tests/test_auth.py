"""Authentication (protocol 1.1) and `hello` against real `python server.py` processes.

Tokens are signed by keys made here (RS256, ES256, EdDSA, HS256) and the JWKS is served by an HTTP
endpoint on loopback (tests/jwt_keys.py) that counts its requests and can be stopped. Tests marked
BOTH_STORES run on the embedded store and on Redis with two instances (a member's `sub` is checked on
resume at the other instance, the per-`sub` limit counts across them). auth.py's logic alone, on an
injected clock, is tests/test_auth_unit.py.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from helpers import (
    BOTH_STORES,
    Client,
    Frame,
    Server,
    ServerFactory,
    assert_ms_near_now,
    connect,
    eventually,
    frames_until_close,
    http_get,
    log_lines,
    redis_client,
)
from jwt_keys import (
    AUDIENCE,
    ISSUER,
    SECRET,
    JwksServer,
    claims,
    forged_hs256,
    forged_none,
    jwks_server,
    signer,
    token,
)
from trio_websocket import ConnectionRejected

import auth
from redis_scripts import session_keys

RSA, EC, ED = signer("RS256"), signer("ES256"), signer("EdDSA")
NOT_FOUND = "no such session, or wrong client_id or token"


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with jwks_server(RSA, EC, ED) as server:
        yield server


def auth_settings(jwks: JwksServer | None, **more: str) -> dict[str, str]:
    """Authentication on: the test JWKS (if any), the HS256 secret, the tests' audience and issuer, no leeway."""
    settings = {"AUTH_JWT_SECRET": SECRET, "AUTH_AUDIENCE": AUDIENCE, "AUTH_ISSUER": ISSUER, "AUTH_LEEWAY": "0"}
    if jwks is not None:
        settings["AUTH_JWKS_URL"] = jwks.url
    return {**settings, **more}


def two(factory: ServerFactory, store: str, **settings: str) -> tuple[Server, Server]:
    """Two instances on one Redis; on SQLite one server twice."""
    first = factory(**settings)
    return first, factory(**settings) if store == "redis" else first


def bearer(jwt_text: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {jwt_text}".encode())]


async def authenticate(client: Client, jwt_text: str) -> Frame:
    reply = await client.request("auth", token=jwt_text)
    assert reply["type"] == "auth:ok", reply
    return reply


async def refused(client: Client, jwt_text: str, failed: str, code: str = "unauthorized") -> Frame:
    reply = await client.request("auth", token=jwt_text)
    assert (reply["type"], reply["code"]) == ("error", code), reply
    assert reply["message"].startswith(failed), reply
    return reply


async def still_unauthenticated(client: Client) -> None:
    reply = await client.request("session:create")
    assert (reply["type"], reply["code"], reply["message"]) == ("error", "unauthorized", "authenticate first (auth)")


async def rejected_upgrade(server: Server, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str], Any]:
    """An upgrade the server must refuse: (status, headers, JSON body)."""
    with pytest.raises(ConnectionRejected) as caught:
        async with connect(server, extra_headers=headers):
            pytest.fail("the upgrade should have been refused")
    rejection = caught.value
    names = {k.decode().lower(): v.decode() for k, v in rejection.headers or []}
    return int(rejection.status_code), names, orjson.loads(rejection.body or b"null")


def member_users(server: Server, code: str) -> dict[str, str | None]:
    """The `sub` the store recorded for each member of `code`."""
    if "REDIS_URL" not in server.env:
        path = server.data_dir / "tandem.sqlite3"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT client_id, user FROM members WHERE code = ?", (code,)).fetchall()
        return {client_id: user for client_id, user in rows}
    client = redis_client(server)
    try:
        fields: dict[bytes, bytes] = client.hgetall(session_keys(code)[0])  # type: ignore[assignment]
    finally:
        client.close()
    members = [f[2:].decode() for f in fields if f.startswith(b"m:")]
    return {m: (fields[f"u:{m}".encode()].decode() if f"u:{m}".encode() in fields else None) for m in members}


# --- hello ------------------------------------------------------------------------------------------------


async def test_hello_welcome_and_auth_off(tandem_factory: ServerFactory, tmp_path: Path) -> None:
    server = tandem_factory(MOTD="Maintenance at 02:00 UTC", HISTORY_SIZE="7", MAX_MESSAGE_BYTES="4096")
    # With authentication off an Authorization header is ignored, even a bad one.
    async with connect(server, extra_headers=bearer("not-a-jwt")) as client:
        welcome = await client.request("hello")
        assert_ms_near_now(welcome.pop("time"), 5_000)
        assert welcome == {
            "type": "welcome",
            "id": 1,
            "protocol": "1.1",
            "server": "tandem/0.1.0",
            "auth": "none",
            "limits": {
                "max_message_bytes": 4096,
                "history_size": 7,
                "session_idle_timeout": 1800.0,
                "session_ttl": 86400.0,
            },
            "motd": "Maintenance at 02:00 UTC",
        }
        created = await client.request("session:create")
        assert created["type"] == "session:created", created
        assert (await client.request("hello"))["type"] == "welcome"  # at any time, in a session too
        reply = await client.request("auth", token=token(SECRET, claims()))
        assert (reply["type"], reply["code"]) == ("error", "bad_request"), reply
    async with connect(tandem_factory(data_dir=tmp_path / "plain")) as client:  # no MOTD: no field
        assert "motd" not in await client.request("hello")


# --- every check, named ---------------------------------------------------------------------------------


async def test_each_bad_token_is_refused_naming_the_check(tandem_factory: ServerFactory, jwks: JwksServer) -> None:
    server = tandem_factory(**auth_settings(jwks, MAX_CONSECUTIVE_ERRORS="100"))
    now = time.time()
    async with connect(server) as client:
        welcome = await client.request("hello")
        assert welcome["auth"] == "required"
        assert (await client.request("ping"))["type"] == "pong"  # allowed before authentication
        await still_unauthenticated(client)
        for kind, fields in (
            ("message:send", {"data": 1}),
            ("session:leave", {}),
            ("session:join", {"code": "ABCDEFGH"}),
        ):
            reply = await client.request(kind, **fields)
            assert (reply["code"], reply["message"]) == ("unauthorized", "authenticate first (auth)"), reply
        cases = [
            (token(signer("ES256"), claims()), "unknown key id"),  # first: a fetch made for it does not hold it
            (token(RSA, claims(ttl=-5)), "token expired"),
            (token(EC, claims(nbf=int(now) + 120)), "token not yet valid"),
            (token(ED, claims(aud="another-service")), "wrong audience"),
            (token(RSA, claims(iss="https://evil.test/auth/v1")), "wrong issuer"),
            (token(signer("RS256", kid=RSA.kid), claims()), "bad signature"),  # its kid, another key
            (token("another-secret-of-at-least-32-characters", claims()), "bad signature"),
            (forged_none(claims()), "unsigned token (alg none) refused"),
            (forged_hs256(RSA, claims()), "bad signature"),  # HS/RS confusion: the public PEM as HMAC key
            (token(RSA, {k: v for k, v in claims().items() if k != "exp"}), "token has no exp"),
            (token(RSA, {k: v for k, v in claims().items() if k != "sub"}), "token has no sub"),
            ("abc.def", "malformed token"),
        ]
        for jwt_text, failed in cases:
            await refused(client, jwt_text, failed)
            await still_unauthenticated(client)
        for key in (RSA, EC, ED, SECRET):  # each algorithm, each key type
            exp = int(time.time()) + 300
            ok = await authenticate(client, token(key, claims(sub="alice", exp=exp)))
            assert (ok["user"], ok["expires_at"]) == ("alice", exp * 1000)
        assert (await client.request("session:create"))["type"] == "session:created"
    assert jwks.hits == 1


# --- sessions record the sub ---------------------------------------------------------------------------


@BOTH_STORES
async def test_members_sub_is_recorded_and_checked_on_resume(
    tandem_factory: ServerFactory, jwks: JwksServer, store: str
) -> None:
    one, other = two(tandem_factory, store, **auth_settings(jwks))
    alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    async with connect(one) as a:
        await authenticate(a, token(RSA, claims(sub=alice)))
        created = await a.create()
        async with connect(other, extra_headers=bearer(token(EC, claims(sub=bob)))) as b:  # no `auth` needed
            joined = await b.join(created["code"])
            await b.expect("session:paired")
            await a.expect("session:paired")
        assert (await a.expect("session:presence"))["online"] is False
        users = member_users(one, created["code"])
        assert users == {created["client_id"]: alice, joined["client_id"]: bob}
        await a.message({"text": "for bob"})
        creds = {"code": created["code"], "client_id": joined["client_id"], "token": joined["token"]}
        # Bob's credentials in another user's hands: the same answer as a wrong token, on either instance.
        for server in (one, other):
            async with connect(server) as mallory:
                await authenticate(mallory, token(ED, claims(sub=f"mallory-{uuid.uuid4()}")))
                reply = await mallory.request("session:resume", **creds, last_seq=0)
                assert (reply["type"], reply["code"], reply["message"]) == ("error", "not_found", NOT_FOUND)
        async with connect(other) as b:
            await authenticate(b, token(SECRET, claims(sub=bob)))  # bob again, with another key type
            resumed = await b.request("session:resume", **creds, last_seq=0)
            assert resumed["type"] == "session:resumed", resumed
            assert (await b.expect("message"))["data"] == {"text": "for bob"}


# --- refresh and expiry ------------------------------------------------------------------------------------


async def test_refresh_keeps_the_connection_and_only_the_same_sub(
    tandem_factory: ServerFactory, jwks: JwksServer
) -> None:
    server = tandem_factory(**auth_settings(jwks))
    async with connect(server) as client:
        first = await authenticate(client, token(RSA, claims(sub="carol", ttl=3)))
        started = time.monotonic()
        await client.create()
        await refused(client, token(RSA, claims(sub="dave")), "the token is for another user (sub)")
        await refused(client, token(RSA, claims(sub="carol", ttl=-1)), "token expired")
        await refused(client, forged_none(claims(sub="carol")), "unsigned token")
        assert await client.message("still carol") == 1  # the refusals left the first token in force
        fresh = await authenticate(client, token(EC, claims(sub="carol", ttl=60)))
        assert fresh["user"] == "carol" and fresh["expires_at"] > first["expires_at"]
        await trio.sleep(max(0.0, 4.0 - (time.monotonic() - started)))  # past the first token's exp
        assert await client.message("after the first token's exp") == 2


async def test_a_failed_refresh_does_not_outlive_the_old_token(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(**auth_settings(None))
    async with connect(server) as client:
        await authenticate(client, token(SECRET, claims(sub="erin", ttl=2)))
        await refused(client, token(SECRET, claims(sub="frank")), "the token is for another user")
        frames, code = await frames_until_close(client, within=6)
        assert code == 1008
        assert frames == [{"type": "error", "code": "unauthorized", "message": "token expired"}]


@BOTH_STORES
async def test_expiry_during_a_session_closes_1008_then_resume(
    tandem_factory: ServerFactory, jwks: JwksServer, store: str
) -> None:
    one, other = two(tandem_factory, store, **auth_settings(jwks))
    user = f"gina-{uuid.uuid4()}"
    async with connect(one) as a, connect(other) as b:
        await authenticate(a, token(ED, claims(sub=user, ttl=2)))
        await authenticate(b, token(RSA, claims(ttl=300)))
        created = await a.create()
        await b.join(created["code"])
        await a.expect("session:paired")
        await b.expect("session:paired")
        started = time.monotonic()
        frames, code = await frames_until_close(a, within=6)
        assert code == 1008 and time.monotonic() - started < 4
        assert frames == [{"type": "error", "code": "unauthorized", "message": "token expired"}]
        presence = await b.expect("session:presence")
        assert (presence["client_id"], presence["online"]) == (created["client_id"], False)
        async with connect(other) as again:  # the client comes back with a fresh token and resumes
            await authenticate(again, token(ED, claims(sub=user, ttl=300)))
            creds = {k: created[k] for k in ("code", "client_id", "token")}
            assert (await again.request("session:resume", **creds, last_seq=0))["type"] == "session:resumed"
            assert (await b.expect("session:presence"))["online"] is True


async def test_auth_timeout_closes_1008(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(**auth_settings(None, AUTH_TIMEOUT="1"))
    async with connect(server) as lazy, connect(server) as prompt:
        started = time.monotonic()
        await authenticate(prompt, token(SECRET, claims()))
        assert (await lazy.request("hello"))["type"] == "welcome"  # hello and pings do not count
        assert (await lazy.request("ping"))["type"] == "pong"
        frames, code = await frames_until_close(lazy, within=5)
        elapsed = time.monotonic() - started
        assert code == 1008 and 0.8 < elapsed < 3, elapsed
        assert frames == [
            {"type": "error", "code": "unauthorized", "message": "not authenticated within AUTH_TIMEOUT (1 s)"}
        ]
        await trio.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
        assert (await prompt.request("session:create"))["type"] == "session:created"  # past the timeout: still open


# --- the Authorization header ------------------------------------------------------------------------------


async def test_authorization_header_on_the_upgrade(tandem_factory: ServerFactory, jwks: JwksServer) -> None:
    server = tandem_factory(**auth_settings(jwks))
    async with connect(server, extra_headers=bearer(token(RSA, claims(sub="hana")))) as client:
        assert (await client.request("session:create"))["type"] == "session:created"
        assert (await authenticate(client, token(EC, claims(sub="hana"))))["user"] == "hana"  # a refresh
        await refused(client, token(EC, claims(sub="ivan")), "the token is for another user")
    for headers, failed in (
        (bearer(token(RSA, claims(ttl=-10))), "token expired"),
        (bearer(token(RSA, claims(aud="x"))), "wrong audience"),
        (bearer(forged_none(claims())), "unsigned token"),
        ([(b"Authorization", b"Basic aGFuYTpwYXNzd29yZA==")], "the Authorization header must be `Bearer <JWT>`"),
    ):
        status, names, body = await rejected_upgrade(server, headers)
        assert status == 401 and names["content-type"] == "application/json", (status, names)
        assert names["www-authenticate"] == 'Bearer error="invalid_token"'
        assert body["error"]["code"] == "unauthorized" and body["error"]["message"].startswith(failed), body
    # Never a token in the URL: the connection opens, unauthenticated.
    jwt_text = token(RSA, claims())
    for query in (f"?access_token={jwt_text}", f"?token={jwt_text}"):
        async with connect(server.url + query) as client:
            await still_unauthenticated(client)


# --- the per-sub message limit -------------------------------------------------------------------------------


@BOTH_STORES
async def test_message_limit_counts_per_sub_across_connections(tandem_factory: ServerFactory, store: str) -> None:
    limits = {"RATE_LIMIT_ENABLED": "1", "RATE_LIMIT_MESSAGES_USER": "3/60", "RATE_LIMIT_MESSAGES_IP": "off"}
    one, other = two(tandem_factory, store, **auth_settings(None, **limits))
    alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    async with connect(one) as a1, connect(other) as a2, connect(one) as b:
        for client, user in ((a1, alice), (a2, alice), (b, bob)):
            await authenticate(client, token(SECRET, claims(sub=user)))
            await client.create()  # each in a session of its own: the limit is the user's, not a member's
        await a1.message(1)
        await a2.message(2)
        await a1.message(3)
        for client in (a2, a1):
            reply = await client.request("message:send", data="over")
            assert (reply["type"], reply["code"]) == ("error", "rate_limited"), reply
            assert 0 < reply["retry_after"] <= 60
        for n in range(3):  # another user's budget is untouched
            await b.message(n)


# --- the key server ------------------------------------------------------------------------------------------


async def test_random_kids_fetch_the_jwks_at_most_once_per_cooldown(
    tandem_factory: ServerFactory, jwks: JwksServer
) -> None:
    settings = auth_settings(jwks, MAX_CONSECUTIVE_ERRORS="1000")
    del settings["AUTH_JWT_SECRET"]  # JWKS only: HS256 has no key at all
    server = tandem_factory(**settings)
    async with connect(server) as a, connect(server) as b:
        await authenticate(a, token(RSA, claims()))
        fetched_at = time.monotonic()
        assert jwks.hits == 1

        async def flood(client: Client, n: int) -> None:
            for i in range(n):
                reply = await client.request("auth", token=token(RSA, claims(), kid=f"random-{uuid.uuid4()}-{i}"))
                # Within the cooldown "try again" (unavailable), after a fetch for it "unauthorized".
                assert reply["type"] == "error" and reply["code"] in ("unavailable", "unauthorized"), reply
                assert reply["message"].startswith("unknown key id (kid)"), reply

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, a, 150)
            nursery.start_soon(flood, b, 150)
        elapsed = time.monotonic() - fetched_at
        assert jwks.hits <= 1 + math.ceil(elapsed / auth.JWKS_COOLDOWN), (jwks.hits, elapsed)
        await refused(a, forged_hs256(RSA, claims()), "algorithm HS256 is not accepted here")
        # A rotated key is picked up once the cooldown allows a fetch.
        rotated = signer("EdDSA")
        jwks.add(rotated)
        hits = jwks.hits

        async def accepted() -> Frame:
            return await b.request("auth", token=token(rotated, claims()))

        deadline = time.monotonic() + auth.JWKS_COOLDOWN + 3
        reply = await accepted()
        while reply["type"] != "auth:ok" and time.monotonic() < deadline:
            assert (reply["code"], reply["message"]) == (
                "unavailable",
                "unknown key id (kid), not in the key set fetched moments ago",
            ), reply
            await trio.sleep(reply["retry_after"])  # what a client does: try again after retry_after
            reply = await accepted()
        assert reply["type"] == "auth:ok", reply
        assert jwks.hits == hits + 1


@BOTH_STORES
async def test_cached_keys_keep_working_while_the_key_server_is_down(
    tandem_factory: ServerFactory, jwks: JwksServer, store: str
) -> None:
    one, other = two(tandem_factory, store, **auth_settings(jwks))
    for server in {one, other}:  # each instance caches the keys it fetched
        async with connect(server) as client:
            await authenticate(client, token(RSA, claims()))
    jwks.stop()
    await trio.sleep(auth.JWKS_COOLDOWN)  # so that a new kid makes the instances try the key server
    for server in {one, other}:
        async with connect(server, extra_headers=bearer(token(RSA, claims(sub="judy")))) as client:
            assert (await client.request("session:create"))["type"] == "session:created"
            assert (await authenticate(client, token(ED, claims(sub="judy"))))["user"] == "judy"
            # A key it never fetched: the server's fault, not the token's: unavailable, retry later.
            reply = await refused(client, token(EC, claims(), kid="new-kid"), "the key server cannot", "unavailable")
            assert 0 < reply["retry_after"] <= auth.JWKS_COOLDOWN
        status, names, body = await rejected_upgrade(server, bearer(token(EC, claims(), kid="new-kid")))
        assert (status, body["error"]["code"]) == (503, "unavailable") and int(names["retry-after"]) >= 1
    await eventually(lambda: len(log_lines(one, "jwks.failed")) == 1, True)


# --- tokens stay secret ---------------------------------------------------------------------------------------


async def test_tokens_never_appear_in_logs_or_metrics(tandem_factory: ServerFactory, jwks: JwksServer) -> None:
    server = tandem_factory(**auth_settings(jwks, LOG_LEVEL="DEBUG"))
    good = [token(key, claims(sub="kim")) for key in (RSA, EC, ED, SECRET)]
    bad = [
        token(RSA, claims(ttl=-5)),
        forged_none(claims()),
        forged_hs256(RSA, claims()),
        token(signer("ES256"), claims()),
    ]
    async with connect(server, extra_headers=bearer(good[0])) as client:
        for jwt_text in good[1:]:
            await authenticate(client, jwt_text)
        for jwt_text in bad:
            assert (await client.request("auth", token=jwt_text))["type"] == "error"
        await client.create()
    for jwt_text in bad:
        await rejected_upgrade(server, bearer(jwt_text))
    async with connect(f"{server.url}?access_token={good[1]}") as client:  # the access log shows paths at DEBUG
        await still_unauthenticated(client)
    _, _, metrics = await trio.to_thread.run_sync(http_get, f"{server.http}/metrics")
    output = server.output() + metrics.decode()
    assert "connection.close" in output
    for jwt_text in good + bad:
        _, payload, signature = jwt_text.split(".")
        for part in (jwt_text, payload, signature) if signature else (jwt_text, payload):
            assert part not in output, f"a token's part is in the log or /metrics: {part[:12]}..."
