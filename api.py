"""What the JSON HTTP API under /api/ shares (admin.py, invites.py): errors, the limit, bodies.

`Api.endpoint` wraps every handler: the request first counts against
RATE_LIMIT_API_IP (429 past it; the RateLimit headers on every answer after),
then an `ApiError` or a store failure becomes `{"error": {"code", "message"}}`
with its status, and anything unexpected a logged JSON 500: never plain text.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

import lifecycle
import protocol
from config import Config
from limiter import Decision, Limiter, Limits, Pseudonyms, Rule, client_ip
from metrics import Metrics
from protocol import ErrorCode
from relay import Services
from session_store import SessionStore

log = logging.getLogger("tandem.api")

Handler = Callable[[Request], Awaitable[Response]]


class App(Protocol):
    """What the API needs of the server (server.Tandem)."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> SessionStore: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def limiter(self) -> Limiter: ...

    @property
    def keys(self) -> Pseudonyms: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def report(self) -> lifecycle.Report: ...

    @property
    def services(self) -> Services: ...  # its `auth`: None while authentication is off


class ApiError(Exception):
    """An HTTP error answer: `status`, and the body's `code` and `message`.

    `limit`: the rule that refused it (a 429), for the metrics.
    """

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        headers: dict[str, str] | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.limit = limit


def error_response(status: int, code: ErrorCode, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"code": str(code), "message": message}}, status, headers=headers)


def too_many(rule: Rule, decision: Decision) -> ApiError:
    """429 for a request `rule` refused, with Retry-After and the RateLimit headers."""
    return ApiError(
        429, ErrorCode.RATE_LIMITED, f"rate limit {rule.name} exceeded", decision.headers(rule), limit=rule.name
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, ErrorCode.BAD_REQUEST, message)


def session_code(value: object) -> str:
    """A session code from a path or a body, upper-cased; 400 if malformed."""
    try:
        return protocol.normalise_code(value)
    except Exception as exc:  # its one error (protocol._FieldError): says what a code is
        raise bad_request(str(exc)) from None


async def json_object(request: Request, max_bytes: int) -> dict[str, object]:
    """The request's body as a JSON object, read up to `max_bytes`; 400 otherwise."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise bad_request(f"the body is larger than {max_bytes} bytes")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("the body is not JSON") from None
    if not isinstance(value, dict):
        raise bad_request("the body is not a JSON object")
    return value


class Api:
    """The shared half of every /api/ endpoint, for one server."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._trusted = tuple(ipaddress.ip_network(n) for n in app.config.trusted_proxies)

    def client_ip(self, request: Request) -> str:
        """The client's address, through TRUSTED_PROXIES."""
        return client_ip(request.scope, self._trusted)

    async def _count(self, request: Request) -> dict[str, str]:
        """Count the request against RATE_LIMIT_API_IP: its RateLimit headers, or a 429."""
        rule = self.app.limits.api_ip
        if rule is None:
            return {}
        decision = await self.app.limiter.hit(rule, self.app.keys.address(self.client_ip(request)))
        if not decision.allowed:
            raise too_many(rule, decision)
        return decision.headers(rule)

    def endpoint(self, handler: Handler) -> Handler:
        """`handler` behind the API limit, with every failure answered in JSON."""

        name = getattr(handler, "__name__", "api")  # logged instead of the path, which may hold a code

        async def run(request: Request) -> Response:
            headers: dict[str, str] = {}
            try:
                headers = await self._count(request)
                response = await handler(request)
            except ApiError as exc:
                if exc.limit is not None:
                    self.app.metrics.rate_limited(exc.limit)
                else:
                    self.app.metrics.refused(exc.code)
                return error_response(exc.status, exc.code, exc.message, {**headers, **exc.headers})
            except protocol.TandemError as exc:  # the store: `unavailable` (a backend down) or `internal`
                self.app.metrics.refused(exc.code)
                if exc.code == ErrorCode.UNAVAILABLE:
                    retry = {"Retry-After": str(max(1, round(exc.retry_after or 1)))}
                    return error_response(503, exc.code, exc.message, {**headers, **retry})
                log.warning("api.failed", extra={"fields": {"handler": name, "error": exc.message}})
                return error_response(500, ErrorCode.INTERNAL, "internal error", headers)
            except Exception:
                log.exception("api.crashed", extra={"fields": {"handler": name}})
                self.app.metrics.refused(ErrorCode.INTERNAL)
                return error_response(500, ErrorCode.INTERNAL, "internal error", headers)
            response.headers.update(headers)
            return response

        return run


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's answer to an HTTPException (no such route, a method not allowed): in JSON
    under /api/, as every API error is; as Starlette would give it elsewhere."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.BAD_REQUEST
        return error_response(exc.status_code, code, exc.detail, exc.headers)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
