"""E-mail invitations (`POST /api/send-email`) against real servers and a real SMTP server.

The test starts aiosmtpd (plain, STARTTLS with a login, or TLS from the start,
with a throw-away CA the server trusts through SSL_CERT_FILE) and reads what it
received: the text and HTML parts, the code, the join link, the headers. Bodies
crafted to inject headers are refused before anything is sent; the limits per
address, per session and per recipient hold, shared by two instances on Redis; a
mail server that is down or never answers costs a quick 503 and no budget; logs
show addresses only masked.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import jwt_keys
import orjson
import pytest
import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from helpers import (
    BOTH_STORES,
    UNKNOWN_CODE,
    Frame,
    Server,
    ServerFactory,
    connect,
    eventually,
    free_port,
    http,
    log_lines,
)
from redis_servers import RedisFactory, TlsFiles

FROM = "Tandem Invites <invites@tandem.test>"
PUBLIC_URL = "https://pair.example.com/"  # the trailing slash is dropped from links
SMTP_USER, SMTP_PASSWORD = "tandem", "smtp-pass-0123456789"


@dataclass
class Inbox:
    """What the SMTP server received, and who logged in."""

    envelopes: list[Envelope] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    secure: list[bool] = field(default_factory=list)  # per message: did it come over TLS
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # aiosmtpd's name
        with self.lock:
            self.envelopes.append(envelope)
            transport = server.transport
            self.secure.append(transport is not None and transport.get_extra_info("ssl_object") is not None)
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login = (auth_data.login.decode(), auth_data.password.decode())
        with self.lock:
            self.logins.append(login)
        return AuthResult(success=login == (SMTP_USER, SMTP_PASSWORD))

    def count(self) -> int:
        with self.lock:
            return len(self.envelopes)

    def messages(self) -> list[EmailMessage]:
        with self.lock:
            contents = [e.original_content or b"" for e in self.envelopes]
        parsed = [email.message_from_bytes(c, policy=email.policy.default) for c in contents]
        return [m for m in parsed if isinstance(m, EmailMessage)]


SmtpFactory = Callable[..., tuple[Inbox, int]]


@pytest.fixture
def smtp() -> Iterator[SmtpFactory]:
    """Start SMTP servers: `smtp(port=None, **aiosmtpd options)` -> (inbox, port); stopped at the end."""
    controllers: list[Controller] = []

    def start(port: int | None = None, ssl_context: ssl.SSLContext | None = None, **options: Any) -> tuple[Inbox, int]:
        inbox = Inbox()
        if options.pop("login", False):
            options["authenticator"] = inbox.authenticate
        port = port or free_port()
        controller = Controller(
            inbox, hostname="127.0.0.1", port=port, ssl_context=ssl_context, server_hostname="smtp.test", **options
        )
        controller.start()
        controllers.append(controller)
        return inbox, port

    yield start
    for controller in controllers:
        controller.stop()


def email_settings(smtp_port: int, scheme: str = "smtp", login: str = "", **settings: str) -> dict[str, str]:
    """A server's settings for e-mail through 127.0.0.1:`smtp_port` (limits on, as required)."""
    return {
        "SMTP_URL": f"{scheme}://{login}127.0.0.1:{smtp_port}",
        "EMAIL_FROM": FROM,
        "PUBLIC_URL": PUBLIC_URL,
        "RATE_LIMIT_ENABLED": "1",
        "RATE_LIMIT_CONNECTIONS_IP": "1000/60",
        **settings,
    }


@pytest.fixture
def email_servers(
    store: str, tandem_factory: ServerFactory, private_redis: RedisFactory, tmp_path: Path
) -> Callable[..., list[Server]]:
    """Servers of one test: one on the embedded store, or two on a private Redis (their limits
    are this test's alone)."""

    def start(**settings: str) -> list[Server]:
        if store == "sqlite":
            return [tandem_factory(**settings)]
        url = private_redis().url()
        return [tandem_factory(data_dir=tmp_path / f"data-{n}", REDIS_URL=url, **settings) for n in range(2)]

    return start


async def invite(server: Server, creds: Frame, to: object, **fields: object) -> tuple[int, dict[str, str], Any]:
    """POST /api/send-email for the member `creds` (code, client_id, token): (status, headers, JSON body)."""
    body = {"code": creds["code"], "client_id": creds["client_id"], "token": creds["token"], "to": to, **fields}
    status, headers, raw = await http("POST", server.http + "/api/send-email", body)
    return status, headers, orjson.loads(raw) if raw else None


def assert_error(answer: tuple[int, dict[str, str], Any], status: int, code: str) -> None:
    assert answer[0] == status, answer
    assert answer[2]["error"]["code"] == code and answer[2]["error"]["message"], answer


def assert_masked_only(servers: list[Server], *addresses: str) -> None:
    """No log shows any of `addresses`; `email.*` lines show them masked (`a***@domain`)."""
    for server in servers:
        text = server.output()
        for address in addresses:
            assert address not in text and address.lower() not in text.lower(), address
        for line in log_lines(server, "email.sent") + log_lines(server, "email.failed"):
            assert "***@" in line["to"] and line["session"].startswith("code-"), line


# --- the message -----------------------------------------------------------------------------


@BOTH_STORES
async def test_an_invitation_arrives_with_text_html_code_and_link(
    smtp: SmtpFactory, email_servers: Callable[..., list[Server]]
) -> None:
    inbox, port = smtp()
    group = email_servers(**email_settings(port))
    to = "carol.smith+pair@example.com"
    async with connect(group[0]) as a:
        created = await a.create()
        code = created["code"]
        answer = await invite(group[-1], {**created, "code": code.lower()}, to)  # on Redis: the other instance
        assert answer[0] == 202 and answer[2] == {"status": "sent"}, answer
        assert answer[1]["ratelimit-policy"] == '"api_ip";q=60;w=60'
    assert inbox.count() == 1
    envelope = inbox.envelopes[0]
    assert envelope.rcpt_tos == [to] and envelope.mail_from == "invites@tandem.test"
    assert inbox.secure == [False]  # this server offers no TLS
    message = inbox.messages()[0]
    assert message["To"] == to and message["From"] == FROM
    assert code in message["Subject"] and message["Message-ID"].endswith("@tandem.test>")
    assert message["Auto-Submitted"] == "auto-generated" and message["Date"]
    assert message.get_content_type() == "multipart/alternative"
    link = f"https://pair.example.com/#{code}"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    plain_text, html_text = str(text.get_content()), str(html.get_content())
    assert link in plain_text and code in plain_text
    assert f'href="{link}"' in html_text and f"<strong>{code}</strong>" in html_text
    assert created["token"] not in plain_text + html_text + str(message)
    sent = [line for server in group for line in log_lines(server, "email.sent")]
    assert [line["to"] for line in sent] == ["c***@example.com"], sent
    assert_masked_only(group, to)


async def test_crafted_addresses_codes_and_bodies_are_400_and_send_nothing(
    smtp: SmtpFactory, tandem_factory: ServerFactory
) -> None:
    inbox, port = smtp()
    server = tandem_factory(**email_settings(port, RATE_LIMIT_EMAIL_RECIPIENT="1/86400"))
    victim = "dave@example.com"
    async with connect(server) as a:
        created = await a.create()
        for to in (
            f"{victim}\r\nBcc: eve@example.com",
            f"{victim}\nSubject: free money",
            f"Dave <{victim}>",
            f'"Dave" <{victim}>',
            f"{victim}, eve@example.com",
            f"{victim};eve@example.com",
            "dave@localhost",
            "dave@exam ple.com",
            "dave(comment)@example.com",
            "d%eve@example.com",
            "dävé@example.com",
            "@example.com",
            "",
            ["dave@example.com"],
            None,
            "x" * 250 + "@example.com",
        ):
            assert_error(await invite(server, created, to), 400, "bad_request")
        for code in (f"{created['code']}\r\nBcc: eve@example.com", "ABC", 12345678):
            assert_error(await invite(server, created, victim, code=code), 400, "bad_request")
        for fields in ({"token": None}, {"client_id": ""}, {"token": "t" * 129}):
            assert_error(await invite(server, created, victim, **fields), 400, "bad_request")
        url = server.http + "/api/send-email"
        for raw in (b"not json", b"[1, 2]", b'{"code": ' + b" " * 5000 + b'"x"}'):
            status, _, body = await http("POST", url, raw)
            assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_request", body
        status, _, body = await http("GET", url)
        assert status == 405 and orjson.loads(body)["error"]["code"] == "bad_request"
        assert inbox.count() == 0
        # None of those counted against the recipient's limit of 1: this one goes.
        answer = await invite(server, created, victim)
        assert answer[0] == 202, answer
    assert inbox.count() == 1
    [envelope] = inbox.envelopes
    assert envelope.rcpt_tos == [victim]
    message = inbox.messages()[0]
    assert message.get_all("To") == [victim] and message.get_all("Bcc") is None
    assert_masked_only([server], victim)


async def test_wrong_member_is_401_unknown_session_404_and_failures_count_like_a_failed_resume(
    smtp: SmtpFactory, tandem_factory: ServerFactory
) -> None:
    _, port = smtp()
    server = tandem_factory(**email_settings(port, RATE_LIMIT_JOIN_FAILURES_IP="3/60"))
    off = tandem_factory(data_dir=server.data_dir.parent / "off")  # no SMTP_URL
    async with connect(server) as a, connect(server) as b:
        created = await a.create()
        joined = await b.join(created["code"])
        await a.expect("session:paired")
        to = "erin@example.com"
        assert_error(await invite(server, {**created, "token": joined["token"]}, to), 401, "unauthorized")
        assert_error(await invite(server, {**created, "client_id": "nobody"}, to), 401, "unauthorized")
        assert_error(await invite(server, {**created, "code": UNKNOWN_CODE}, to), 404, "not_found")
        # Three failures: the address may not try again for a while, not even rightly.
        answer = await invite(server, created, to)
        assert_error(answer, 429, "rate_limited")
        assert "join_failures_ip" in answer[2]["error"]["message"] and int(answer[1]["retry-after"]) >= 1
    answer = await invite(off, created, to)
    assert_error(answer, 404, "not_found")
    assert "SMTP_URL" in answer[2]["error"]["message"]


# --- limits -----------------------------------------------------------------------------------


@BOTH_STORES
async def test_limits_per_session_and_per_recipient_hold_across_instances(
    smtp: SmtpFactory, email_servers: Callable[..., list[Server]]
) -> None:
    inbox, port = smtp()
    group = email_servers(
        **email_settings(port, RATE_LIMIT_EMAIL_SESSION="3/86400", RATE_LIMIT_EMAIL_RECIPIENT="2/86400")
    )
    first, last = group[0], group[-1]
    async with connect(first) as a, connect(last) as b:
        one, two = await a.create(), await b.create()
        assert (await invite(first, one, "frank@example.com"))[0] == 202
        assert (await invite(last, one, "frank@example.com"))[0] == 202
        # The recipient's third invitation, from another session, on either instance; also
        # as Frank+x@Example.COM (one mailbox): refused.
        for server, to in ((first, "frank@example.com"), (last, "Frank+x@Example.COM")):
            answer = await invite(server, two, to)
            assert_error(answer, 429, "rate_limited")
            assert "email_recipient" in answer[2]["error"]["message"]
            assert 86000 < int(answer[1]["retry-after"]) <= 86400
            assert answer[1]["ratelimit-policy"] == '"email_recipient";q=2;w=86400'
        # Refused invitations cost the session nothing: `two` still has its 3.
        for to in ("gina@example.com", "hank@example.com", "ivan@example.com"):
            assert (await invite(group[len(to) % len(group)], two, to))[0] == 202
        answer = await invite(first, two, "judy@example.com")
        assert_error(answer, 429, "rate_limited")
        assert "email_session" in answer[2]["error"]["message"]
        assert (await invite(last, one, "judy@example.com"))[0] == 202  # `one` has sent 2 of its 3
    assert sorted(to for e in inbox.envelopes for to in e.rcpt_tos) == sorted(
        ["frank@example.com"] * 2 + ["gina@example.com", "hank@example.com", "ivan@example.com", "judy@example.com"]
    )


@BOTH_STORES
async def test_every_send_counts_against_the_address_limit_of_the_api(
    smtp: SmtpFactory, email_servers: Callable[..., list[Server]]
) -> None:
    inbox, port = smtp()
    group = email_servers(**email_settings(port, RATE_LIMIT_API_IP="3/60"))
    async with connect(group[0]) as a:
        created = await a.create()
        assert (await invite(group[0], created, "kim@example.com"))[0] == 202
        assert_error(await invite(group[-1], created, "not an address"), 400, "bad_request")
        status, _, raw = await http("GET", group[-1].http + "/api/info")
        assert status == 200
        limits = orjson.loads(raw)["rate_limits"]
        assert limits["email_session"] == {"limit": 5, "window": 86400.0}
        assert limits["email_recipient"] == {"limit": 3, "window": 86400.0}
        answer = await invite(group[0], created, "lee@example.com")
        assert_error(answer, 429, "rate_limited")
        assert "api_ip" in answer[2]["error"]["message"] and int(answer[1]["retry-after"]) >= 1
    assert inbox.count() == 1


# --- the mail server down, slow, or over TLS ------------------------------------------------


async def test_a_mail_server_that_is_down_is_a_quick_503_and_costs_no_budget(
    smtp: SmtpFactory, tandem_factory: ServerFactory
) -> None:
    port = free_port()  # nothing listens there yet
    server = tandem_factory(**email_settings(port, RATE_LIMIT_EMAIL_SESSION="1/86400"))
    to = "mallory@example.com"
    async with connect(server) as a:
        created = await a.create()
        for _ in range(3):
            started = time.monotonic()
            answer = await invite(server, created, to)
            assert time.monotonic() - started < 2.0
            assert_error(answer, 503, "unavailable")
            assert int(answer[1]["retry-after"]) >= 1
        inbox, _ = smtp(port=port)  # the mail server comes up
        answer = await invite(server, created, to)
        assert answer[0] == 202, answer  # the session's one invitation was never spent
    assert inbox.count() == 1
    # The log lines are written after the answer: wait for them rather than race them.
    await eventually(lambda: len(log_lines(server, "email.server_back")), 1)
    assert len(log_lines(server, "email.server_down")) == 1
    assert len(log_lines(server, "email.failed")) == 3
    assert_masked_only([server], to)


async def test_a_mail_server_that_never_answers_is_a_503_within_smtp_timeout_and_blocks_nothing(
    tandem_factory: ServerFactory,
) -> None:
    """A listening socket that never accepts: the TCP handshake completes, the SMTP greeting
    never comes. Six invitations at once (more than the 4 sending threads) each get 503
    within SMTP_TIMEOUT, while the server goes on serving sockets."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        server = tandem_factory(**email_settings(port, SMTP_TIMEOUT="1", RATE_LIMIT_EMAIL_SESSION="10/86400"))
        async with connect(server) as a, connect(server) as b:
            created = await a.create()
            answers: list[tuple[int, float]] = []

            async def send(n: int) -> None:
                started = time.monotonic()
                answer = await invite(server, created, f"user{n}@example.com")
                answers.append((answer[0], time.monotonic() - started))

            async with trio.open_nursery() as nursery:
                for n in range(6):
                    nursery.start_soon(send, n)
                await trio.sleep(0.3)
                with trio.fail_after(1.0):  # the store's threads are not the mail's
                    assert (await b.create())["code"]
        assert [status for status, _ in answers] == [503] * 6, answers
        assert all(seconds < 3.0 for _, seconds in answers), answers


@pytest.fixture
def tls(tmp_path: Path) -> tuple[TlsFiles, ssl.SSLContext]:
    """A throw-away CA and a certificate for 127.0.0.1, and the SMTP server's TLS context."""
    files = TlsFiles(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    return files, context


async def test_starttls_with_a_login_and_tls_from_the_start(
    smtp: SmtpFactory, tandem_factory: ServerFactory, tls: tuple[TlsFiles, ssl.SSLContext], tmp_path: Path
) -> None:
    files, context = tls
    login = f"{SMTP_USER}:{SMTP_PASSWORD}@"
    starttls, port_1 = smtp(tls_context=context, require_starttls=True, login=True)
    # aiosmtpd counts only STARTTLS as TLS for AUTH: on an implicit-TLS port, allow it as is.
    implicit, port_2 = smtp(ssl_context=context, login=True, auth_require_tls=False)
    trusted = {"SSL_CERT_FILE": str(files.ca)}
    servers = [
        tandem_factory(data_dir=tmp_path / "d1", **email_settings(port_1, "smtp", login), **trusted),
        tandem_factory(data_dir=tmp_path / "d2", **email_settings(port_2, "smtps", login), **trusted),
    ]
    for server, inbox in zip(servers, (starttls, implicit), strict=True):
        async with connect(server) as a:
            created = await a.create()
            answer = await invite(server, created, "nina@example.com")
            assert answer[0] == 202, answer
        assert inbox.count() == 1 and inbox.secure == [True]
        assert inbox.logins == [(SMTP_USER, SMTP_PASSWORD)]
        assert SMTP_PASSWORD not in server.output()


async def test_credentials_are_never_sent_without_tls_and_an_untrusted_certificate_fails(
    smtp: SmtpFactory, tandem_factory: ServerFactory, tls: tuple[TlsFiles, ssl.SSLContext], tmp_path: Path
) -> None:
    _, context = tls
    login = f"{SMTP_USER}:{SMTP_PASSWORD}@"
    plain, port_1 = smtp(login=True)  # offers no STARTTLS
    untrusted, port_2 = smtp(tls_context=context, require_starttls=True, login=True)
    servers = [  # neither trusts the test's CA (no SSL_CERT_FILE)
        tandem_factory(data_dir=tmp_path / "d1", **email_settings(port_1, "smtp", login)),
        tandem_factory(data_dir=tmp_path / "d2", **email_settings(port_2, "smtp", login)),
    ]
    for server, inbox in zip(servers, (plain, untrusted), strict=True):
        async with connect(server) as a:
            created = await a.create()
            assert_error(await invite(server, created, "olga@example.com"), 503, "unavailable")
        assert inbox.count() == 0 and inbox.logins == []
    errors = [line["error"] for server in servers for line in log_lines(server, "email.server_down")]
    assert "credentials" in errors[0] and "SSL" in errors[1], errors


async def test_a_message_the_mail_server_took_before_a_slow_goodbye_is_sent(
    smtp: SmtpFactory, tandem_factory: ServerFactory
) -> None:
    """The server takes the message, then hangs on QUIT: the invitation was sent (202), and
    its budget stays spent."""
    inbox, port = smtp()

    async def slow_quit(server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(3.0)  # aiosmtpd's handlers run on asyncio, in its thread
        return "221 Bye"

    inbox.handle_QUIT = slow_quit  # type: ignore[attr-defined]
    server = tandem_factory(**email_settings(port, SMTP_TIMEOUT="1", RATE_LIMIT_EMAIL_SESSION="1/86400"))
    async with connect(server) as a:
        created = await a.create()
        started = time.monotonic()
        answer = await invite(server, created, "pat@example.com")
        assert answer[0] == 202 and time.monotonic() - started < 2.5, answer
        assert_error(await invite(server, created, "quinn@example.com"), 429, "rate_limited")
    await eventually(inbox.count, 1)


@BOTH_STORES
async def test_with_authentication_on_the_request_needs_the_members_own_jwt(
    smtp: SmtpFactory, email_servers: Callable[..., list[Server]]
) -> None:
    inbox, port = smtp()
    settings = {"AUTH_JWT_SECRET": jwt_keys.SECRET, "AUTH_AUDIENCE": jwt_keys.AUDIENCE, "AUTH_ISSUER": jwt_keys.ISSUER}
    group = email_servers(**email_settings(port), **settings)
    alice = jwt_keys.token(jwt_keys.SECRET, jwt_keys.claims("alice"))
    async with connect(group[0]) as a:
        assert (await a.request("auth", token=alice))["type"] == "auth:ok"
        created = await a.create()
        body = {"code": created["code"], "client_id": created["client_id"], "token": created["token"]}
        url = group[-1].http + "/api/send-email"
        for jwt_text, failed in (
            (None, "the Authorization header"),
            (jwt_keys.token(jwt_keys.SECRET, jwt_keys.claims("mallory")), "wrong client_id or token"),
            (jwt_keys.token(jwt_keys.SECRET, jwt_keys.claims("alice", ttl=-60)), "token expired"),
            (jwt_keys.token("another-secret-of-at-least-32-chars!", jwt_keys.claims("alice")), "bad signature"),
        ):
            headers = {} if jwt_text is None else {"Authorization": f"Bearer {jwt_text}"}
            status, response_headers, raw = await http("POST", url, {**body, "to": "rita@example.com"}, headers)
            error = orjson.loads(raw)["error"]
            assert (status, error["code"]) == (401, "unauthorized"), (status, error)
            assert error["message"].startswith(failed), error
            if failed != "wrong client_id or token":  # a JWT that failed a check asks for another
                assert response_headers["www-authenticate"].startswith("Bearer")
        own = {"Authorization": f"Bearer {alice}"}
        status, _, raw = await http("POST", url, {**body, "to": "rita@example.com"}, own)
        assert status == 202, raw
    assert inbox.count() == 1
    for server in group:
        assert alice not in server.output()
