"""JWT authentication (protocol 1.1): who a token's bearer is, when Tandem can prove it.

A token is verified with the one key its header's `alg` allows: HS256 with the shared secret, RS256, ES256
or EdDSA with the JWKS key of its `kid` and of that key type, so `none` and HS/RS confusion never verify.
Then `exp`, `nbf`, `iss`, `aud` and `sub` are checked against an injected clock. The JWKS is fetched in a
worker thread with a timeout and cached; an unknown `kid` fetches it again, at most once per cooldown.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
import trio

from config import Config
from logging_setup import Outage
from protocol import MAX_JWT_CHARS, SERVER_VERSION, AuthError, ErrorCode, ServerError

log = logging.getLogger("tandem.auth")

# The algorithm each key type verifies, and nothing else: a JWKS key is RSA
# (RS256), EC on P-256 (ES256) or Ed25519 (EdDSA); the shared secret is HS256.
HMAC_ALGORITHM = "HS256"
KEY_ALGORITHMS: dict[tuple[str, str | None], str] = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
}
ASYMMETRIC = frozenset(KEY_ALGORITHMS.values())
# The JWKS is fetched at most once per this many seconds, whatever asks for it
# (an unknown `kid`, a stale cache, a failed fetch): random `kid`s cost the key
# server nothing, and a rotated key is picked up within this time.
JWKS_COOLDOWN = 5.0
# A JWKS older than this is fetched again at its next use, so that a key
# removed there (revoked) stops working; until that fetch succeeds it is used.
JWKS_MAX_AGE = 600.0
# One fetch of the JWKS: connect and each read, and the whole call.
JWKS_TIMEOUT = 5.0
# A key set larger than this is refused (a real one is a few KiB).
JWKS_MAX_BYTES = 1 << 20
JWKS_MAX_KEYS = 100
# A `sub` is stored with each member; Supabase's are UUIDs (36 characters).
MAX_SUB_CHARS = 255

# Algorithm names an error may repeat (a token's `alg` is the client's text).
_JWA_NAMES = frozenset(f"{family}{bits}" for family in ("HS", "RS", "ES", "PS") for bits in (256, 384, 512)) | {
    "EdDSA",
    "ES256K",
}
# Signatures only: the claims are checked here, against the injected clock.
_JWS = jwt.PyJWS()


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token: its `sub` and its `exp`."""

    user: str
    expires: float  # `exp`, seconds since the Unix epoch

    @property
    def expires_at(self) -> int:
        """`exp` in ms, as `auth:ok` reports it."""
        return math.floor(self.expires * 1000)


@dataclass(frozen=True, slots=True)
class Settings:
    """What verification needs, derived from the AUTH_* settings and SUPABASE_URL."""

    secret: bytes | None  # HS256
    jwks_url: str | None  # RS256, ES256, EdDSA
    audiences: tuple[str, ...]  # accepted `aud` values; empty: not checked
    issuer: str | None  # the required `iss`; None: not checked
    leeway: float  # seconds of clock skew allowed on `exp` and `nbf`
    timeout: float  # AUTH_TIMEOUT

    @classmethod
    def from_config(cls, config: Config) -> Settings | None:
        """The settings in force, or None when authentication is off."""
        if not config.auth_enabled:
            return None
        jwks_url, issuer, audiences = config.auth_jwks_url, config.auth_issuer or None, config.auth_audience
        if config.supabase_url is not None:
            preset = supabase(config.supabase_url)
            jwks_url = preset.jwks_url
            issuer = issuer or preset.issuer
            audiences = audiences or preset.audiences
        secret = config.auth_jwt_secret.encode() if config.auth_jwt_secret else None
        return cls(secret, jwks_url, audiences, issuer, config.auth_leeway, config.auth_timeout)


def supabase(project_url: str) -> Settings:
    """What Supabase Auth uses for the project at `project_url` (https://REF.supabase.co)."""
    base = project_url.rstrip("/")
    return Settings(
        secret=None,
        jwks_url=f"{base}/auth/v1/.well-known/jwks.json",
        audiences=("authenticated",),
        issuer=f"{base}/auth/v1",
        leeway=0.0,
        timeout=0.0,
    )


# --- claims: pure -------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    """A claim that must be a NumericDate: its value, or None when it is not a finite number."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def check_claims(claims: Mapping[str, Any], now: float, settings: Settings) -> Identity:
    """The identity in verified `claims` at `now` (seconds since the Unix epoch), or AuthError naming
    the first check that failed: exp, nbf, iss, aud, sub."""
    exp, nbf = _number(claims.get("exp")), _number(claims.get("nbf"))
    if exp is None:
        raise AuthError("token has no exp")
    if now >= exp + settings.leeway:
        raise AuthError("token expired")
    if nbf is None and claims.get("nbf") is not None:
        raise AuthError("token nbf is not a number")
    if nbf is not None and now + settings.leeway < nbf:
        raise AuthError("token not yet valid (nbf)")
    if settings.issuer is not None and claims.get("iss") != settings.issuer:
        raise AuthError("wrong issuer")
    if settings.audiences:
        aud = claims.get("aud")
        given = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in settings.audiences for a in given):
            raise AuthError("wrong audience")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_CHARS:
        raise AuthError(f"token has no sub (a string of 1 to {MAX_SUB_CHARS} characters)")
    return Identity(sub, exp)


# --- keys ------------------------------------------------------------------------------------------


def key_algorithm(jwk: Mapping[str, Any]) -> str | None:
    """The one algorithm a JWK verifies here, or None for a key Tandem does not use
    (symmetric `oct` keys, other curves, a key whose own `alg` or `use` says otherwise)."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    algorithm = KEY_ALGORITHMS.get((kty, None) if kty == "RSA" else (kty, crv))  # type: ignore[arg-type]
    if algorithm is None or jwk.get("alg", algorithm) != algorithm or jwk.get("use", "sig") != "sig":
        return None
    return algorithm


def parse_jwks(body: bytes) -> dict[str | None, jwt.PyJWK]:
    """The usable keys of a JWKS document by `kid` (None: a key without one); ValueError if it is no JWKS.
    Keys Tandem does not use are skipped; of two keys with one `kid` the first stands."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("the key set is not JSON") from None
    listed = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(listed, list):
        raise ValueError("the key set has no `keys` list")
    keys: dict[str | None, jwt.PyJWK] = {}
    for jwk in listed[:JWKS_MAX_KEYS]:
        if not isinstance(jwk, dict):
            continue
        algorithm, kid = key_algorithm(jwk), jwk.get("kid")
        if algorithm is None or not (kid is None or isinstance(kid, str)) or kid in keys:
            continue
        try:
            keys[kid] = jwt.PyJWK(jwk, algorithm=algorithm)
        except jwt.PyJWTError:
            continue  # a malformed key: the others still count
    return keys


def fetch_url(url: str, timeout: float) -> bytes:
    """GET `url` (blocking, in a worker thread): its body, at most JWKS_MAX_BYTES; OSError or ValueError on failure."""
    headers = {"Accept": "application/json", "User-Agent": f"tandem/{SERVER_VERSION}"}
    request = urllib.request.Request(url, headers=headers)  # an operator's http(s) URL (config.py checks it)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read(JWKS_MAX_BYTES + 1)
    if len(body) > JWKS_MAX_BYTES:
        raise ValueError(f"the key set is larger than {JWKS_MAX_BYTES} bytes")
    return body


class KeySet:
    """The JWKS at `url`, cached.

    Fetched in a worker thread, at most once per `cooldown` seconds whatever
    asks (one fetch at a time; callers meanwhile wait for it): when a `kid` is
    unknown, or the keys are older than `max_age`. A failed fetch keeps the
    keys it had, so the key server being down stops only tokens of new keys.
    A `kid` is called unknown only after a fetch that began after it was asked
    for; within a cooldown it is "try again" (random `kid`s cost a few bytes).
    """

    def __init__(
        self,
        url: str,
        *,
        fetch: Callable[[str, float], bytes] = fetch_url,
        clock: Callable[[], float] = time.monotonic,
        cooldown: float = JWKS_COOLDOWN,
        max_age: float = JWKS_MAX_AGE,
        timeout: float = JWKS_TIMEOUT,
    ) -> None:
        self.url = url
        self._fetch = fetch
        self._clock = clock
        self._cooldown = cooldown
        self._max_age = max_age
        self._timeout = timeout
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched = -math.inf  # when the keys were fetched (clock)
        self._attempted = -math.inf  # when a fetch was last tried
        self._failed = False  # the last attempt failed
        self._lock = trio.Lock()
        self._outage = Outage(log, "jwks.failed", "jwks.recovered", clock)
        self.fetches = 0  # attempts, for tests and the log

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key of `kid` for `algorithm`.

        AuthError for another key type, or a `kid` that a fetch made since this
        call began does not hold. ServerError `unavailable` (retry after the
        cooldown) when the key server cannot be reached, or when the cooldown
        kept it from being asked: the key may have been published since.
        """
        asked = self._clock()
        if kid not in self._keys or asked - self._fetched >= self._max_age:
            await self._refresh()
        found = self._keys.get(kid)
        if found is None:
            wait = round(max(0.5, self._attempted + self._cooldown - self._clock()), 3)
            if self._failed:
                raise ServerError("the key server cannot be reached", ErrorCode.UNAVAILABLE, retry_after=wait)
            if self._attempted < asked:
                message = "unknown key id (kid), not in the key set fetched moments ago"
                raise ServerError(message, ErrorCode.UNAVAILABLE, retry_after=wait)
            raise AuthError("unknown key id (kid)" if kid is not None else "token has no key id (kid)")
        if found.algorithm_name != algorithm:
            raise AuthError(f"algorithm {algorithm} does not match the key's type")
        return found

    async def _refresh(self) -> None:
        async with self._lock:
            if self._clock() - self._attempted < self._cooldown:
                return  # fetched (or tried) moments ago, perhaps while this caller waited
            self._attempted = self._clock()
            self.fetches += 1
            try:
                with trio.fail_after(self._timeout + 1.0):
                    body = await trio.to_thread.run_sync(self._fetch, self.url, self._timeout, abandon_on_cancel=True)
                keys = parse_jwks(body)
            except (OSError, ValueError, trio.TooSlowError) as exc:
                self._failed = True
                self._outage.failed(type(exc).__name__ if isinstance(exc, trio.TooSlowError) else str(exc))
                return
            self._keys, self._fetched, self._failed = keys, self._clock(), False
            self._outage.recovered()
            log.info("jwks.fetched", extra={"fields": {"keys": len(keys), "kids": sorted(str(k) for k in keys)}})


def bearer(header: str) -> str:
    """The token of an `Authorization: Bearer <JWT>` header; AuthError for another scheme."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("the Authorization header must be `Bearer <JWT>`")
    if len(token) > MAX_JWT_CHARS:
        raise AuthError(f"token longer than {MAX_JWT_CHARS} characters")
    return token


# --- verification ------------------------------------------------------------------------------------


class Authenticator:
    """Verifies tokens with the configured keys; `clock` is the wall clock (seconds since the Unix epoch)."""

    def __init__(self, settings: Settings, keys: KeySet | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.keys = keys if keys is not None or settings.jwks_url is None else KeySet(settings.jwks_url)
        self.clock = clock

    @classmethod
    def from_config(cls, config: Config) -> Authenticator | None:
        settings = Settings.from_config(config)
        return None if settings is None else cls(settings)

    async def verify(self, token: str) -> Identity:
        """The identity `token` proves; AuthError naming the failed check (never the token), or
        ServerError `unavailable` when its key cannot be fetched."""
        try:
            header = _JWS.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        algorithm = header.get("alg")
        key: jwt.PyJWK | bytes
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise AuthError("unsigned token (alg none) refused")
        if algorithm == HMAC_ALGORITHM and self.settings.secret is not None:
            key = self.settings.secret
        elif algorithm in ASYMMETRIC and self.keys is not None:
            kid = header.get("kid")
            key = await self.keys.key(kid if isinstance(kid, str) else None, algorithm)
        else:  # another algorithm, or one whose key is not configured (HS256 without a secret)
            shown = algorithm if algorithm in _JWA_NAMES else "of the token"
            raise AuthError(f"algorithm {shown} is not accepted here")
        try:
            decoded = _JWS.decode_complete(token, key, algorithms=[algorithm])
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        try:
            claims = orjson.loads(decoded["payload"])
        except orjson.JSONDecodeError:
            raise AuthError("malformed token (claims)") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed token (claims)")
        return check_claims(claims, self.clock(), self.settings)

    def remaining(self, identity: Identity) -> float:
        """Seconds until `identity` expires (its `exp` plus AUTH_LEEWAY); 0 or less: expired."""
        return identity.expires + self.settings.leeway - self.clock()
