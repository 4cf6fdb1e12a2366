"""Keys, tokens and a JWKS endpoint for the authentication tests: everything is signed by keys a test makes.

`Signer` holds a private key and its public JWK (RS256, ES256, EdDSA); `token` signs claims with a signer
or an HS256 secret; `forged_none` and `forged_hs256` build what an attacker would send. `JwksServer` serves
a JWKS on loopback from a thread, counts its requests and can be stopped (the key server is down).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SECRET = "test-secret-of-at-least-32-characters!"  # AUTH_JWT_SECRET (HS256)
AUDIENCE = "tandem-test"
ISSUER = "https://issuer.test/auth/v1"
_kids = itertools.count(1)


@dataclass(frozen=True)
class Signer:
    """A private key, the algorithm it signs with, and its public JWK (with `kid`)."""

    algorithm: str
    kid: str
    private: Any
    jwk: dict[str, Any]

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def signer(algorithm: str, kid: str | None = None) -> Signer:
    """A new key for `algorithm` (RS256, ES256 or EdDSA)."""
    private: Any
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        raise ValueError(algorithm)
    kid = kid or f"{algorithm.lower()}-{next(_kids)}"
    return Signer(algorithm, kid, private, {**jwk, "kid": kid, "use": "sig"})


def claims(sub: str | None = None, ttl: float = 300.0, **extra: Any) -> dict[str, Any]:
    """Claims that pass the tests' AUTH_AUDIENCE and AUTH_ISSUER: `sub` (a new one by default), exp now + `ttl`."""
    now = time.time()
    return {
        "sub": sub or f"user-{uuid.uuid4()}",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": int(now),
        "exp": int(now + ttl),
        **extra,
    }


def token(key: Signer | str, payload: dict[str, Any], kid: str | None = None) -> str:
    """`payload` signed by `key` (a Signer, or an HS256 secret); `kid` overrides the signer's."""
    if isinstance(key, str):
        return jwt.encode(payload, key, algorithm="HS256")
    return jwt.encode(payload, key.private, algorithm=key.algorithm, headers={"kid": kid or key.kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """A token with any header: unsigned (empty signature), or HMAC-SHA256 with `hmac_key`."""
    signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(payload))}"
    signature = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def forged_none(payload: dict[str, Any]) -> str:
    """`alg: none`: no signature at all."""
    return forged({"alg": "none", "typ": "JWT"}, payload)


def forged_hs256(rsa_key: Signer, payload: dict[str, Any]) -> str:
    """HS/RS confusion: HS256 keyed with the RSA key's public PEM (which anyone can fetch), its `kid`."""
    return forged({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, payload, rsa_key.public_pem())


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 in a thread: `url`, `hits` (requests served), `keys` (mutable)."""

    def __init__(self, *signers: Signer) -> None:
        self.keys: list[dict[str, Any]] = [s.jwk for s in signers]
        self.hits = 0
        self._lock = threading.Lock()
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with jwks._lock:
                    jwks.hits += 1
                    body = orjson.dumps({"keys": jwks.keys})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/auth/v1/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.running = True

    def add(self, key: Signer) -> None:
        with self._lock:
            self.keys.append(key.jwk)

    def stop(self) -> None:
        """The key server goes down: its port refuses connections from now on."""
        if self.running:
            self.running = False
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(10)


@contextmanager
def jwks_server(*signers: Signer) -> Iterator[JwksServer]:
    server = JwksServer(*signers)
    try:
        yield server
    finally:
        server.stop()
