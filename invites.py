"""E-mail invitations, `POST /api/send-email` (PROTOCOL.md, "Invite by e-mail").

A member, proved like `session:resume`, has the server e-mail one plain address
the session's code and join link. In order: the per-address API limit, the
body, the member's credentials (a failure counts against
RATE_LIMIT_JOIN_FAILURES_IP, as a failed resume does), then the per-session and
per-recipient limits, counted only now and refunded when the mail server did
not take the message. `Mailer` sends in worker threads of its own, under one
SMTP_TIMEOUT deadline: a mail server down or hanging is a 503, never a hang.
"""

from __future__ import annotations

import logging
from email.headerregistry import Address
from urllib.parse import urlsplit

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

import auth
import mailer
from api import Api, ApiError, App, bad_request, json_object, session_code, too_many
from limiter import IPV6_SITE, Rule
from logging_setup import Outage
from mailer import MailUnavailable, RecipientRefused, SmtpEndpoint
from protocol import AuthError, ClientError, ErrorCode
from relay import now_ms, token_hash

log = logging.getLogger("tandem.email")

MAX_BODY = 4096  # bytes of a request body: four short fields
MAX_CLIENT_ID, MAX_TOKEN = 64, 128  # as in `session:resume` (PROTOCOL.md)
# Sends in flight at most: a slow mail server holds these threads, never the
# ones the store and Redis calls run in (trio's default pool).
MAX_SENDING = 4
# What a 503 tells the client to wait while the mail server is unreachable.
RETRY_AFTER_S = 10
# Asks for a JWT (RFC 6750) on a 401 with authentication on.
CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def routes(app: App) -> list[BaseRoute]:
    """`POST /api/send-email`, for server.py to mount; 404 without SMTP_URL."""
    config = app.config
    sender: Mailer | None = None
    if config.smtp_url is not None and config.email_from is not None and config.public_url is not None:
        endpoint = mailer.smtp_endpoint(config.smtp_url)
        sender = Mailer(endpoint, mailer.sender(config.email_from), config.public_url, config.smtp_timeout)
    return Invites(app, sender).routes()


class Mailer:
    """Sends invitations through one SMTP server, each within `timeout` seconds."""

    def __init__(self, endpoint: SmtpEndpoint, from_: Address, public_url: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.from_ = from_
        self.public_url = public_url.rstrip("/")
        self.timeout = timeout
        # EHLO names the public host: smtplib would look this host's name up (DNS, slow).
        self.helo = urlsplit(public_url).hostname or "localhost"
        self._threads = trio.CapacityLimiter(MAX_SENDING)
        self.outage = Outage(log, "email.server_down", "email.server_back")

    def link(self, code: str) -> str:
        return f"{self.public_url}/#{code}"

    async def send(self, to: str, code: str) -> None:
        """E-mail `to` the invitation to session `code`; MailUnavailable or RecipientRefused if not taken."""
        message = mailer.invitation(self.from_, to, code, self.link(code))
        delivery = mailer.Delivery()
        try:
            # One deadline for the whole send, the wait for a free thread included. A
            # thread cut off ends on its own within its socket timeout, blocking nothing.
            with trio.fail_after(self.timeout):
                await trio.to_thread.run_sync(
                    mailer.deliver,
                    self.endpoint,
                    message,
                    self.timeout,
                    self.helo,
                    delivery,
                    limiter=self._threads,
                    abandon_on_cancel=True,
                )
        except trio.TooSlowError:
            if not delivery.accepted.is_set():  # else only its QUIT was slow: it was sent
                self.outage.failed("timed out")
                raise MailUnavailable("timed out") from None
        except MailUnavailable as exc:
            self.outage.failed(str(exc))
            raise
        self.outage.recovered()


def _plain(address: str) -> bool:
    try:
        mailer.plain_address(address)
    except ValueError:
        return False
    return True


class Invites:
    def __init__(self, app: App, sender: Mailer | None) -> None:
        self.app = app
        self.api = Api(app)
        self.mailer = sender

    def routes(self) -> list[BaseRoute]:
        return [Route("/api/send-email", self.api.endpoint(self.send_email), methods=["POST"])]

    async def send_email(self, request: Request) -> Response:
        if self.mailer is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, "e-mail invitations are off (no SMTP_URL)")
        body = await json_object(request, MAX_BODY)
        code = session_code(body.get("code"))
        client_id, token, to = body.get("client_id"), body.get("token"), body.get("to")
        if not isinstance(client_id, str) or not 1 <= len(client_id) <= MAX_CLIENT_ID:
            raise bad_request(f"`client_id` must be a string of 1 to {MAX_CLIENT_ID} characters")
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN:
            raise bad_request(f"`token` must be a string of 1 to {MAX_TOKEN} characters")
        if not isinstance(to, str) or not _plain(to):
            raise bad_request("`to` must be one plain e-mail address, such as bob@example.com")
        user = await self._user(request)
        await self._prove(request, code, client_id, token, user)
        counted = await self._count(code, to)
        try:
            await self.mailer.send(to, code)
        except (MailUnavailable, RecipientRefused) as exc:
            with trio.CancelScope(shield=True):
                await self._refund(counted)  # nothing was sent: it costs no e-mail budget
            log.info("email.failed", extra={"fields": {"session": code, "to": mailer.masked(to), "error": str(exc)}})
            if isinstance(exc, RecipientRefused):
                raise bad_request("the mail server refused this address") from None
            raise ApiError(
                503,
                ErrorCode.UNAVAILABLE,
                "the mail server is unavailable; try again later",
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        log.info("email.sent", extra={"fields": {"session": code, "to": mailer.masked(to)}})
        return JSONResponse({"status": "sent"}, 202)

    async def _user(self, request: Request) -> str | None:
        """With authentication on, the `sub` of the request's `Authorization: Bearer <JWT>`
        (401 naming the failed check, never the token; 503 while its key cannot be fetched)."""
        authenticator = self.app.services.auth
        if authenticator is None:
            return None
        try:
            identity = await authenticator.verify(auth.bearer(request.headers.get("authorization", "")))
        except AuthError as exc:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, exc.message, CHALLENGE) from None
        return identity.user

    async def _prove(self, request: Request, code: str, client_id: str, token: str, user: str | None) -> None:
        """The request comes from a member of live session `code` (held by `user`, with
        authentication on): else 404 (no such session) or 401. Counted against
        RATE_LIMIT_JOIN_FAILURES_IP first, refunded on success (or on the server's fault), as
        a resume is: a code guesser gains nothing here."""
        rule = self.app.limits.join_failures_ip
        site = self.app.keys.address(self.api.client_ip(request), IPV6_SITE)
        stamp = None
        if rule is not None:
            decision = await self.app.limiter.hit(rule, site)
            if not decision.allowed:
                raise too_many(rule, decision)
            stamp = decision.stamp
        refund = True
        try:
            await self.app.store.verify_member(code, client_id, token_hash(token), now_ms(), user)
        except ClientError as exc:
            refund = False
            status = 404 if exc.code == ErrorCode.NOT_FOUND else 401
            raise ApiError(status, exc.code, exc.message) from None
        finally:
            if refund and rule is not None and stamp is not None:
                with trio.CancelScope(shield=True):
                    await self.app.limiter.refund(rule, site, stamp)

    async def _count(self, code: str, to: str) -> list[tuple[Rule, str, float]]:
        """Count one invitation per session and per recipient (both, or neither: 429)."""
        keys = self.app.keys
        counted: list[tuple[Rule, str, float]] = []
        for rule, key in (
            (self.app.limits.email_session, keys.code(code)),
            (self.app.limits.email_recipient, keys.recipient(to)),
        ):
            if rule is None:
                continue
            decision = await self.app.limiter.hit(rule, key)
            if not decision.allowed:
                with trio.CancelScope(shield=True):
                    await self._refund(counted)
                raise too_many(rule, decision)
            counted.append((rule, key, decision.stamp))
        return counted

    async def _refund(self, counted: list[tuple[Rule, str, float]]) -> None:
        for rule, key, stamp in counted:
            await self.app.limiter.refund(rule, key, stamp)
