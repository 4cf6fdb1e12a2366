"""auth.py without a server: claims against an injected clock, algorithms per key type, the JWKS cache's
cooldown and outage behaviour with a fake fetch and clock, the settings, and the new frames.

The same behaviour against real servers, JWKS endpoint included, is tests/test_auth.py.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import trio
from helpers import ROOT
from jwt_keys import AUDIENCE, ISSUER, SECRET, Signer, claims, forged, forged_hs256, forged_none, signer, token

import auth
import config
import protocol
import redaction
from auth import Authenticator, Identity, KeySet, Settings, check_claims, parse_jwks
from protocol import AuthError, ServerError

NOW = 1_800_000_000.0  # the injected clock's "now", seconds since the Unix epoch
SETTINGS = Settings(
    secret=SECRET.encode(), jwks_url=None, audiences=(AUDIENCE,), issuer=ISSUER, leeway=30.0, timeout=10.0
)
RSA, EC, ED = signer("RS256"), signer("ES256"), signer("EdDSA")


def at(now: float = NOW, **fields: Any) -> dict[str, Any]:
    """Claims valid at `now`: sub u1, exp now + 300, the tests' audience and issuer; `fields` override."""
    return {"sub": "u1", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 300, **fields}


# --- claims ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "failed"),
    [
        ({"exp": NOW - 30}, "token expired"),  # exp + leeway reached
        ({"exp": NOW - 31}, "token expired"),
        ({"exp": None}, "token has no exp"),
        ({"exp": "1800000300"}, "token has no exp"),
        ({"exp": True}, "token has no exp"),
        ({"nbf": NOW + 31}, "token not yet valid (nbf)"),
        ({"nbf": "soon"}, "token nbf is not a number"),
        ({"iss": "https://other.test/auth/v1"}, "wrong issuer"),
        ({"iss": None}, "wrong issuer"),
        ({"aud": "other"}, "wrong audience"),
        ({"aud": ["other", 7]}, "wrong audience"),
        ({"aud": None}, "wrong audience"),
        ({"sub": None}, "token has no sub"),
        ({"sub": ""}, "token has no sub"),
        ({"sub": 42}, "token has no sub"),
        ({"sub": "x" * 256}, "token has no sub"),
    ],
)
def test_each_claim_check_names_itself(fields: dict[str, Any], failed: str) -> None:
    payload = {k: v for k, v in at(**fields).items() if v is not None}
    with pytest.raises(AuthError) as caught:
        check_claims(payload, NOW, SETTINGS)
    assert caught.value.message.startswith(failed)
    assert caught.value.code == protocol.ErrorCode.UNAUTHORIZED


def test_leeway_and_what_is_not_checked() -> None:
    assert check_claims(at(exp=NOW - 29), NOW, SETTINGS) == Identity("u1", NOW - 29)  # within the leeway
    assert check_claims(at(nbf=NOW + 30), NOW, SETTINGS).user == "u1"
    assert check_claims(at(aud=["other", AUDIENCE]), NOW, SETTINGS).user == "u1"
    open_settings = Settings(None, None, (), None, 0.0, 10.0)  # no audience, no issuer configured
    assert check_claims({"sub": "u2", "exp": NOW + 1, "aud": "x"}, NOW, open_settings).expires_at == (NOW + 1) * 1000
    with pytest.raises(AuthError, match="expired"):
        check_claims({"sub": "u2", "exp": NOW}, NOW, open_settings)


# --- algorithms and keys ------------------------------------------------------------------------------


def jwks_body(*signers: Signer, extra: list[dict[str, Any]] | None = None) -> bytes:
    return orjson.dumps({"keys": [s.jwk for s in signers] + (extra or [])})


class FakeKeyServer:
    """A fetch for KeySet: serves `body` (or raises while `down`), counts calls; and the clock it runs on."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.down = False
        self.calls = 0
        self.now = 1000.0

    def fetch(self, url: str, timeout: float) -> bytes:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return self.body

    def clock(self) -> float:
        return self.now


def authenticator(
    server: FakeKeyServer | None = None, secret: bool = True, wall: Callable[[], float] = lambda: NOW
) -> Authenticator:
    keys = None if server is None else KeySet("https://keys.test/jwks.json", fetch=server.fetch, clock=server.clock)
    settings = Settings(SECRET.encode() if secret else None, None, (AUDIENCE,), ISSUER, 30.0, 10.0)
    return Authenticator(settings, keys, clock=wall)


async def test_each_algorithm_verifies_with_its_own_key_type() -> None:
    server = FakeKeyServer(jwks_body(RSA, EC, ED))
    verifier = authenticator(server)
    for key in (RSA, EC, ED, SECRET):
        identity = await verifier.verify(token(key, at(sub=f"via-{key if isinstance(key, str) else key.kid}")))
        assert identity.expires_at == (NOW + 300) * 1000
    assert server.calls == 1  # one fetch served every kid


async def refused(verifier: Authenticator, jwt_text: str, failed: str) -> None:
    with pytest.raises(AuthError) as caught:
        await verifier.verify(jwt_text)
    assert caught.value.message.startswith(failed), caught.value.message
    assert not jwt_text or jwt_text not in caught.value.message


async def test_none_confusion_and_foreign_keys_are_refused() -> None:
    server = FakeKeyServer(jwks_body(RSA, EC))
    with_secret, without_secret = authenticator(server), authenticator(server, secret=False)
    await refused(with_secret, forged_none(at()), "unsigned token (alg none) refused")
    await refused(with_secret, forged({"alg": "NONE"}, at()), "unsigned token")
    await refused(with_secret, forged({"typ": "JWT"}, at()), "unsigned token")  # no alg at all
    # HS/RS confusion: the RSA public key (public by definition) as HMAC secret.
    await refused(with_secret, forged_hs256(RSA, at()), "bad signature")
    await refused(without_secret, forged_hs256(RSA, at()), "algorithm HS256 is not accepted here")
    # A token claiming RS256 with the kid of an EC key, and one with an algorithm no key type has.
    await refused(with_secret, token(RSA, at(), kid=EC.kid), "algorithm RS256 does not match the key's type")
    await refused(with_secret, forged({"alg": "PS256", "kid": RSA.kid}, at()), "algorithm PS256 is not accepted here")
    await refused(with_secret, forged({"alg": "X" * 100}, at()), "algorithm of the token is not accepted here")
    other = signer("RS256", kid=RSA.kid)  # same kid, another key: the signature cannot verify
    await refused(with_secret, token(other, at()), "bad signature")
    await refused(with_secret, token("another-secret-of-at-least-32-chars!", at()), "bad signature")
    await refused(with_secret, "not.a.jwt", "malformed token")
    await refused(with_secret, "", "malformed token")
    await refused(with_secret, token(SECRET, at(exp=NOW - 60)), "token expired")  # claims after the signature
    await refused(authenticator(None), token(RSA, at()), "algorithm RS256 is not accepted here")  # no JWKS


async def try_again(verifier: Authenticator, jwt_text: str, failed: str) -> float:
    """`unavailable` (the server's side: retry), naming why; its retry_after."""
    with pytest.raises(ServerError) as caught:
        await verifier.verify(jwt_text)
    assert caught.value.code == protocol.ErrorCode.UNAVAILABLE and caught.value.message.startswith(failed)
    assert caught.value.retry_after is not None and 0.5 <= caught.value.retry_after <= auth.JWKS_COOLDOWN
    return caught.value.retry_after


async def test_unknown_kids_fetch_at_most_once_per_cooldown() -> None:
    server = FakeKeyServer(jwks_body(RSA))
    verifier = authenticator(server)
    await refused(verifier, token(RSA, at(), kid="random-first"), "unknown key id")  # an empty cache: fetched
    assert server.calls == 1
    await verifier.verify(token(RSA, at()))
    server.now += 0.5  # asked after the fetch
    for n in range(200):  # a flood of random kids within one cooldown: no fetch at all, "try again"
        await try_again(verifier, token(RSA, at(), kid=f"random-{n}"), "unknown key id (kid), not in the key set")
    assert server.calls == 1
    rotated = signer("ES256")
    server.body = jwks_body(RSA, rotated)
    server.now += 1
    assert await try_again(verifier, token(rotated, at()), "unknown key id") == auth.JWKS_COOLDOWN - 1.5
    server.now += auth.JWKS_COOLDOWN - 1.5
    assert (await verifier.verify(token(rotated, at()))).user == "u1"  # picked up once the cooldown is over
    assert server.calls == 2
    server.now += auth.JWKS_COOLDOWN
    await refused(verifier, token(RSA, at(), kid="random-again"), "unknown key id (kid)")  # fetched: truly unknown
    assert server.calls == 3


async def test_cached_keys_work_while_the_key_server_is_down() -> None:
    server = FakeKeyServer(jwks_body(RSA))
    verifier = authenticator(server)
    await verifier.verify(token(RSA, at()))
    server.down = True
    server.now += auth.JWKS_MAX_AGE  # stale: a refetch is due, and fails
    assert (await verifier.verify(token(RSA, at(sub="u2")))).user == "u2"
    assert server.calls == 2
    # A key it never had: the server's fault, retry later (within the cooldown no fetch is even tried).
    await try_again(verifier, token(signer("ES256"), at()), "the key server cannot be reached")
    server.now += auth.JWKS_COOLDOWN
    await try_again(verifier, token(signer("ES256"), at()), "the key server cannot be reached")
    assert server.calls == 3
    server.down = False
    server.now += auth.JWKS_COOLDOWN
    server.body = jwks_body(EC)  # RSA was removed (revoked): it stops working at the next fetch
    await refused(verifier, token(RSA, at()), "unknown key id")
    assert (await verifier.verify(token(EC, at()))).user == "u1"


async def test_a_slow_key_server_costs_at_most_the_timeout() -> None:
    def hang(url: str, timeout: float) -> bytes:
        import time

        time.sleep(timeout + 2)
        return b"{}"

    keys = KeySet("https://keys.test/jwks.json", fetch=hang, timeout=0.2)
    verifier = Authenticator(Settings(None, None, (), None, 0.0, 10.0), keys)
    with trio.fail_after(3):
        with pytest.raises(ServerError):
            await verifier.verify(token(RSA, at()))


def test_parse_jwks_keeps_only_keys_it_can_use() -> None:
    oct_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"}
    rsa_enc = {**signer("RS256").jwk, "kid": "enc", "use": "enc"}
    rsa_as_ps = {**signer("RS256").jwk, "kid": "ps", "alg": "PS256"}
    p384 = {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"}
    broken = {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"}
    duplicate = {**signer("RS256").jwk, "kid": RSA.kid}
    unusable: list[Any] = [oct_key, rsa_enc, rsa_as_ps, p384, broken, duplicate, "x"]
    keys = parse_jwks(jwks_body(RSA, EC, ED, extra=unusable))
    usable = {kid: key.algorithm_name for kid, key in keys.items()}
    assert usable == {RSA.kid: "RS256", EC.kid: "ES256", ED.kid: "EdDSA"}
    assert keys[RSA.kid].key.public_numbers() == RSA.private.public_key().public_numbers()  # the first of a kid
    for body in (b"not json", b"[]", b'{"keys": {}}'):
        with pytest.raises(ValueError):
            parse_jwks(body)
    assert parse_jwks(b'{"keys": []}') == {}


def test_bearer_header() -> None:
    assert auth.bearer("Bearer abc.def.ghi") == auth.bearer("  bearer   abc.def.ghi ") == "abc.def.ghi"
    for header in ("Basic dXNlcg==", "Bearer", "Bearer ", "abc.def.ghi", "Bearer " + "x" * 20000):
        with pytest.raises(AuthError):
            auth.bearer(header)


# --- settings -----------------------------------------------------------------------------------------


def load(**env: str) -> config.Config:
    return config.load(env, dotenv=None)


def test_authentication_is_on_exactly_with_a_key_source() -> None:
    assert not load().auth_enabled and auth.Settings.from_config(load()) is None
    for name, value in (
        ("AUTH_JWT_SECRET", SECRET),
        ("AUTH_JWKS_URL", "https://keys.example.com/jwks.json"),
        ("SUPABASE_URL", "https://abcdefgh.supabase.co"),
    ):
        assert load(**{name: value}).auth_enabled, name


def test_supabase_preset_and_overrides() -> None:
    settings = auth.Settings.from_config(load(SUPABASE_URL="https://abcdefgh.supabase.co/"))
    assert settings is not None and settings.secret is None
    assert settings.jwks_url == "https://abcdefgh.supabase.co/auth/v1/.well-known/jwks.json"
    assert (settings.issuer, settings.audiences) == ("https://abcdefgh.supabase.co/auth/v1", ("authenticated",))
    legacy = auth.Settings.from_config(
        load(SUPABASE_URL="http://localhost:54321", AUTH_JWT_SECRET=SECRET, AUTH_AUDIENCE="a, b", AUTH_LEEWAY="5")
    )
    assert legacy is not None and legacy.secret == SECRET.encode()
    assert (legacy.issuer, legacy.audiences, legacy.leeway) == ("http://localhost:54321/auth/v1", ("a", "b"), 5.0)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AUTH_JWKS_URL": "https://keys.example.com/j", "SUPABASE_URL": "https://a.supabase.co"}, "AUTH_JWKS_URL"),
        ({"AUTH_AUDIENCE": "authenticated"}, "AUTH_AUDIENCE"),  # would do nothing: authentication is off
        ({"AUTH_ISSUER": "https://issuer.test"}, "AUTH_ISSUER"),
        ({"AUTH_LEEWAY": "5"}, "AUTH_LEEWAY"),
        ({"AUTH_TIMEOUT": "3"}, "AUTH_TIMEOUT"),
        ({"AUTH_JWT_SECRET": "hunter2-hunter2"}, "AUTH_JWT_SECRET"),
        ({"SUPABASE_URL": "abcdefgh.supabase.co"}, "SUPABASE_URL"),
        ({"AUTH_JWKS_URL": "file:///etc/jwks.json"}, "AUTH_JWKS_URL"),
        ({"MOTD": "x" * 1001}, "MOTD"),
    ],
)
def test_bad_combinations_stop_the_server_naming_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(env, dotenv=None)
    assert caught.value.name == named and "\n" not in str(caught.value)
    assert "hunter2" not in str(caught.value)  # a secret is never shown


def test_defaults_at_their_values_do_not_count_as_set() -> None:
    assert not load(AUTH_LEEWAY="30", AUTH_TIMEOUT="10").auth_enabled  # .env.example lists them
    assert SECRET not in repr(load(AUTH_JWT_SECRET=SECRET))


# --- frames, version, logs -------------------------------------------------------------------------------


def test_hello_and_auth_frames() -> None:
    assert protocol.parse_request('{"type": "hello", "id": 1}') == protocol.Hello(1)
    assert protocol.parse_request('{"type": "auth", "token": "a.b.c"}') == protocol.Authenticate(None, "a.b.c")
    for bad in ('{"type": "auth"}', '{"type": "auth", "token": ""}', '{"type": "auth", "token": 5}'):
        with pytest.raises(protocol.ClientError) as caught:
            protocol.parse_request(bad)
        assert caught.value.code == protocol.ErrorCode.BAD_REQUEST
    limits = protocol.Limits(65536, 100, 1800.0, 86400.0)
    welcome = orjson.loads(protocol.serialize(protocol.Welcome("h", "none", limits, 123)))
    assert welcome == {
        "type": "welcome",
        "id": "h",
        "protocol": "1.1",
        "server": f"tandem/{protocol.SERVER_VERSION}",
        "auth": "none",
        "limits": {
            "max_message_bytes": 65536,
            "history_size": 100,
            "session_idle_timeout": 1800.0,
            "session_ttl": 86400.0,
        },
        "time": 123,
    }
    assert orjson.loads(protocol.serialize(protocol.Welcome(None, "required", limits, 1, "hi")))["motd"] == "hi"
    ok = orjson.loads(protocol.serialize(protocol.AuthOk(2, "u1", 1_800_000_300_000)))
    assert ok == {"type": "auth:ok", "id": 2, "user": "u1", "expires_at": 1_800_000_300_000}


def test_server_version_is_the_projects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["version"] == protocol.SERVER_VERSION


def test_jwts_are_hidden_in_free_text() -> None:
    jwt_text = token(RSA, claims(sub="u1"))
    for text in (f"token {jwt_text} refused", f"Authorization: Bearer {jwt_text}", f"x={jwt_text[:40]}.e30.sig"):
        shown = redaction.hide_credentials(text)
        assert "eyJ" not in shown and jwt_text.rsplit(".", 1)[1] not in shown, shown
