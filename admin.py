"""The admin API, `/api/debug/*`: list, inspect and end sessions (PROTOCOL.md, "Admin").

Off (404) unless ADMIN_TOKEN is set; then every request needs `Authorization:
Bearer ADMIN_TOKEN`, compared in constant time, else 401 (logged, never the
token). Each request counts against RATE_LIMIT_API_IP before anything else,
failed ones included. A cursor is the store's position signed with the key the
instances share, so any instance continues another's listing and one the
server did not issue is a 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

import lifecycle
from api import Api, ApiError, App, bad_request, session_code
from logging_setup import Throttle
from protocol import ErrorCode
from relay import now_ms
from session_store import STATES, SessionInfo

log = logging.getLogger("tandem.admin")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Asks for the admin token (RFC 6750) on a 401.
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tandem-admin"'}


def routes(app: App) -> list[BaseRoute]:
    """The admin API's routes, for server.py to mount."""
    return Admin(app).routes()


def session_json(info: SessionInfo) -> dict[str, object]:
    """SESSION of PROTOCOL.md: never a member's token, never a message."""
    return {
        "code": info.code,
        "state": info.state,
        "members": [{"client_id": m.client_id, "online": m.online, "user": m.user} for m in info.members],
        "last_seq": info.last_seq,
        "created_at": info.created_at,
        "expires_at": info.expires_at,
    }


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"`limit` must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


class Admin:
    def __init__(self, app: App) -> None:
        self.app = app
        self.api = Api(app)
        token = app.config.admin_token
        # Digests compared, so that the comparison takes as long for a token of any length.
        self._token = hashlib.sha256(token.encode()).digest() if token else None
        self._throttle = Throttle(log)  # a refused address is logged at most every 10 s

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/debug/sessions", self.api.endpoint(self.list_sessions), methods=["GET"]),
            Route("/api/debug/sessions/{code}", self.api.endpoint(self.session), methods=["GET", "DELETE"]),
        ]

    def _authorize(self, request: Request, action: str) -> None:
        """404 while the admin API is off; 401 without the right bearer token (logged, without it)."""
        if self._token is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "the admin API is off (no ADMIN_TOKEN)")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() == "bearer" and given:
            if hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._token):
                return
            reason, message = "wrong", "wrong admin token"
        else:
            reason, message = "missing", "the admin API needs Authorization: Bearer <admin token>"
        ip = self.api.client_ip(request)
        fields = {"reason": reason, "action": action, "ip": ip}
        self._throttle.log(logging.WARNING, "admin.refused", f"{reason}:{self.app.keys.address(ip)}", fields)
        raise ApiError(401, ErrorCode.UNAUTHORIZED, message, CHALLENGE)

    # -- cursors: "state|position", base64url, a dot, its MAC --

    def _cursor(self, state: str | None, position: str) -> str:
        payload = f"{state or '*'}|{position}"
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=") + "." + self.app.keys.mac(payload)

    def _position(self, cursor: str | None, state: str | None) -> str | None:
        """The store position `cursor` holds; 400 unless this server issued it, for this `state`."""
        if cursor is None:
            return None
        encoded, _, mac = cursor.partition(".")
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            payload = ""
        if not payload or not hmac.compare_digest(mac.encode(), self.app.keys.mac(payload).encode()):
            raise bad_request("`cursor` is not one this server issued")
        issued_for, _, position = payload.partition("|")
        if issued_for != (state or "*"):
            raise bad_request("`cursor` was issued for another `state`")
        return position

    # -- the endpoints --

    async def list_sessions(self, request: Request) -> Response:
        self._authorize(request, "list")
        params = request.query_params
        state = params.get("state")
        if state is not None and state not in STATES:
            raise bad_request("`state` must be `waiting` or `paired`")
        limit = _limit(params.get("limit"))
        after = self._position(params.get("cursor"), state)
        try:
            page = await self.app.store.list_sessions(now_ms(), state, limit, after)
        except ValueError:  # a signed cursor this store cannot read: another store's
            raise bad_request("`cursor` is not one this server issued") from None
        next_cursor = None if page.after is None else self._cursor(state, page.after)
        return JSONResponse({"sessions": [session_json(s) for s in page.sessions], "next_cursor": next_cursor})

    async def session(self, request: Request) -> Response:
        """GET: inspect one session; DELETE: end it."""
        ending = request.method == "DELETE"
        self._authorize(request, "end" if ending else "inspect")
        code = session_code(request.path_params["code"])
        if ending:
            if not await self.app.store.end(code, now_ms()):
                raise ApiError(404, ErrorCode.NOT_FOUND, "no such session, or it expired")
            self.app.report(lifecycle.SessionEnded(code))
            return Response(status_code=204)
        info = await self.app.store.inspect(code, now_ms())
        if info is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "no such session, or it expired")
        return JSONResponse(session_json(info))
