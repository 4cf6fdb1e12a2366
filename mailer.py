"""E-mail for invitations: checked addresses, SMTP_URL, the message, one blocking delivery.

`invitation()` builds the message with the stdlib's EmailMessage (plain text and
HTML; a header value with a line break is refused) from checked parts only: a
session code, the join link and one plain address. `deliver()` runs smtplib (in
a worker thread: invites.py) and turns every failure into `MailUnavailable` or
`RecipientRefused`. Standard library only, so config.py checks settings with it.
"""

from __future__ import annotations

import html
import re
import smtplib
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"smtp": 587, "smtps": 465}
MAX_ADDRESS = 254  # RFC 5321: a path of 256 octets, minus the angle brackets
MAX_LOCAL_PART = 64
# A plain ASCII address, dot-atoms on both sides (no quoted local parts, no
# comments, no source routes: `%` and `!` once made relays forward mail elsewhere).
_LOCAL = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"({_LOCAL})@({_DOMAIN})")
# EMAIL_FROM: `address` or `Display Name <address>`.
_NAMED = re.compile(r"([^<>\"\\\x00-\x1f\x7f]*?)\s*<([^<>]*)>")


class MailUnavailable(Exception):
    """The mail server could not be reached, or did not take the message: try again later."""


class RecipientRefused(Exception):
    """The mail server refused the recipient for good (a 5xx reply to RCPT TO)."""


def plain_address(text: str) -> str:
    """`text` if it is one plain address (`local@domain.tld`, ASCII); else ValueError.

    A display name, a list, a comment, a quoted local part or a line break is refused.
    """
    match = _ADDRESS.fullmatch(text)
    if match is None or len(text) > MAX_ADDRESS or len(match.group(1)) > MAX_LOCAL_PART:
        raise ValueError("not one plain e-mail address")
    return text


def masked(address: str) -> str:
    """An address as logs may show it: `a***@example.com`."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def sender(text: str) -> Address:
    """EMAIL_FROM (`address` or `Display Name <address>`) as a header value; else ValueError."""
    named = _NAMED.fullmatch(text.strip())
    if named is None:
        return Address(addr_spec=plain_address(text.strip()))
    return Address(display_name=named.group(1).strip(), addr_spec=plain_address(named.group(2)))


@dataclass(frozen=True, slots=True)
class SmtpEndpoint:
    """SMTP_URL: where to send and how (implicit TLS, else STARTTLS when offered)."""

    host: str
    port: int
    implicit_tls: bool
    username: str | None
    password: str

    def __repr__(self) -> str:  # never the password
        scheme = "smtps" if self.implicit_tls else "smtp"
        return f"SmtpEndpoint({scheme}://{self.host}:{self.port}, user={'yes' if self.username else 'no'})"


def smtp_endpoint(url: str) -> SmtpEndpoint:
    """`smtp://[user[:password]@]host[:port]` or `smtps://…` (user and password percent-encoded); else ValueError."""
    parts = urlsplit(url)
    if (
        parts.scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in url)
    ):
        raise ValueError("not an smtp:// or smtps:// URL")
    return SmtpEndpoint(
        host=parts.hostname,
        port=parts.port or DEFAULT_PORTS[parts.scheme],  # a bad port raises ValueError here
        implicit_tls=parts.scheme == "smtps",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password or ""),
    )


def invitation(from_: Address, to: str, code: str, link: str) -> EmailMessage:
    """The invitation to session `code`: plain text and HTML, nothing in it from the requester
    but the recipient's (checked) address."""
    message = EmailMessage()  # email.policy.default: a header value with CR or LF raises ValueError
    message["Subject"] = f"You are invited to a Tandem session ({code})"
    message["From"] = from_
    message["To"] = Address(addr_spec=plain_address(to))
    message["Date"] = format_datetime(datetime.now(UTC))
    # The sender's domain: make_msgid would otherwise look this host's name up (DNS, slow).
    message["Message-ID"] = make_msgid("tandem", domain=from_.domain)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: auto-responders do not answer it
    message.set_content(
        "You are invited to a pairing session on Tandem.\n\n"
        f"Open this link to join:\n{link}\n\n"
        f"Or enter the code {code} on the Tandem page.\n\n"
        "If you did not expect this message, ignore it: nothing happens unless you open the link.\n"
    )
    href = html.escape(link, quote=True)
    message.add_alternative(
        "<!DOCTYPE html>\n<html><body>\n"
        "<p>You are invited to a pairing session on Tandem.</p>\n"
        f'<p><a href="{href}">Join the session</a></p>\n'
        f"<p>Or enter the code <strong>{html.escape(code)}</strong> on the Tandem page.</p>\n"
        "<p>If you did not expect this message, ignore it: nothing happens unless you open the link.</p>\n"
        "</body></html>\n",
        subtype="html",
    )
    return message


class Delivery:
    """What one send got to, shared with its thread: a send whose QUIT hangs after the
    server took the message is a success, not a 503."""

    def __init__(self) -> None:
        self.accepted = threading.Event()


def _refusal(exc: smtplib.SMTPRecipientsRefused) -> Exception:
    """A refused recipient: for good (every reply 5xx), or for now."""
    codes = [code for code, _ in exc.recipients.values()]
    if codes and all(code >= 500 for code in codes):
        return RecipientRefused(f"refused with {codes[0]}")
    return MailUnavailable(f"recipient deferred with {codes[0] if codes else '?'}")


def deliver(endpoint: SmtpEndpoint, message: EmailMessage, timeout: float, helo: str, delivery: Delivery) -> None:
    """In a worker thread: connect, STARTTLS when offered (or TLS from the start), log in, send.

    Credentials are never sent without TLS. Every error becomes MailUnavailable or
    RecipientRefused, whose text names no address.
    """
    context = ssl.create_default_context()  # system CAs (or SSL_CERT_FILE); the host name is checked
    client: smtplib.SMTP | None = None
    try:
        if endpoint.implicit_tls:
            client = smtplib.SMTP_SSL(endpoint.host, endpoint.port, helo, timeout=timeout, context=context)
        else:
            client = smtplib.SMTP(endpoint.host, endpoint.port, helo, timeout=timeout)
        client.ehlo()
        secure = endpoint.implicit_tls
        if not secure and client.has_extn("starttls"):
            client.starttls(context=context)
            client.ehlo()
            secure = True
        if endpoint.username is not None:
            if not secure:
                raise MailUnavailable("the mail server offers no TLS: credentials are not sent in clear")
            client.login(endpoint.username, endpoint.password)
        client.send_message(message)
        delivery.accepted.set()
    except smtplib.SMTPRecipientsRefused as exc:
        raise _refusal(exc) from None
    except smtplib.SMTPResponseException as exc:
        raise MailUnavailable(f"{type(exc).__name__} {exc.smtp_code}") from None
    except (OSError, smtplib.SMTPException) as exc:  # refused, reset, timed out, TLS failed, ...
        raise MailUnavailable(type(exc).__name__) from None
    finally:
        if client is not None:
            try:
                if delivery.accepted.is_set():
                    client.quit()
            except (OSError, smtplib.SMTPException):
                pass  # the message was taken: a lost QUIT changes nothing
            finally:
                client.close()
