"""Log redaction: what a log line may show of secrets, addresses and session codes.

`Redactor` builds every line: secret-named fields and bodies hidden, session codes
and client addresses turned into keyed hashes, credentials, e-mail addresses and
token-like runs masked in free text, long strings cut. No I/O: only its key changes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

from protocol import CODE_ALPHABET, MIN_CODE_CHARS, ErrorCode

# Longest string kept in a line; tracebacks get more room.
MAX_STRING = 2_000
MAX_EXCEPTION = 16_000
# Items kept from a list and depth kept in nested fields.
MAX_ITEMS = 50
MAX_DEPTH = 4

LINE_KEYS = frozenset({"timestamp", "level", "event", "logger", "exception"})
# Field names whose values never appear, whatever they hold.
SECRET_KEY_PARTS = ("token", "secret", "password", "passwd", "authorization", "cookie", "credential", "api_key")
BODY_KEYS = frozenset({"data", "body", "payload", "text", "content"})
# Field names that hold a client address.
IP_KEYS = frozenset({"ip", "client_ip", "remote_addr", "peer_ip"})
# Field names that hold a session code: whoever reads a code can join its waiting
# session, so a log shows a keyed hash of it. `code` also names close codes (ints)
# and error codes (`not_found`): those are kept.
CODE_KEYS = frozenset({"session", "code", "session_code"})
ERROR_CODES = frozenset(str(code) for code in ErrorCode)
# The server's own addresses (where it listens, its page's URL, its store):
# configuration, not client addresses. Passwords in them are masked before logging.
VERBATIM_KEYS = frozenset({"addresses", "metrics_address", "url", "store", "redis"})
REDACTED = "[redacted]"

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s/@:]*):([^\s/@]*)@")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}")
# A JWT (base64url `{"...` header, payload, signature): hidden whole, short or long.
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:access_token|token|api_key|key|secret|password|auth|signature|sig)=)[^&\s#]*")
_EMAIL = re.compile(
    r"(?<![\w.+-])([A-Za-z0-9])[A-Za-z0-9._%+-]*@([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+)"
)
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# A run of 32+ URL-safe characters in both cases looks like a secret (Tandem's
# tokens are 43): hidden even where no field name says so.
_SECRET_RUN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])")
# A session code where free text (an exception, a backend's error) shows one in
# a known frame: a Redis hash tag `{CODE}`, a JSON `"code":"CODE"`, PostgreSQL's
# `Key (code)=(CODE)`. Bare codes are not guessed at in free text.
_CODE_TAG = r'(\{|"code"\s*:\s*"|\(code\)=\()'
_TAGGED_CODE = re.compile(_CODE_TAG + "([" + re.escape(CODE_ALPHABET) + r"]{6,12})(?=[})\"])")
# The start of a tagged code that cutting a long string split: dropped, never shown in part.
_CUT_CODE = re.compile(_CODE_TAG + "[" + re.escape(CODE_ALPHABET) + "]{1,12}$")


class LogSubject(Protocol):
    """What a connection exposes to its log lines: its id and its session code (logged hashed)."""

    id: str
    code: str | None


class Redactor:
    """The one redaction step every line goes through.

    Values of secret-named fields and message bodies are replaced; session
    codes (code fields, the bound session, tagged codes in text) become a keyed
    hash; in every other string, IP addresses become a keyed hash (or their /24
    or /48 network), e-mail addresses are masked, URL passwords, auth headers,
    secret query parameters and token-like runs are hidden, and long strings
    are cut. Both hashes are HMAC-SHA256 with one key (`key`, replaceable).
    """

    def __init__(self, ip_mode: str, key: bytes) -> None:
        self.ip_mode = ip_mode
        self.key = key  # replaced whole (one assignment) by set_hash_key: threads see the old or the new

    def code(self, code: str) -> str:
        """A session code as it may appear in a log: `code-` and 16 hex digits of its HMAC."""
        digest = hmac.new(self.key, b"code:" + code.encode(), hashlib.sha256).hexdigest()
        return f"code-{digest[:16]}"

    def _code_field(self, key: str, value: object, depth: int) -> object:
        if not isinstance(value, str):
            return self.value(value, depth)  # a close code (int), None
        if key == "code" and (value in ERROR_CODES or (value.isdigit() and len(value) < MIN_CODE_CHARS)):
            return value  # an error code, or a close code as text: never a session code
        return self.code(value)

    def _tagged_code(self, match: re.Match[str]) -> str:
        return match.group(1) + self.code(match.group(2))

    def ip(self, address: str) -> str:
        """A client address as it may appear in a log."""
        try:
            parsed = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            return REDACTED
        if parsed.is_unspecified:
            return str(parsed)
        if self.ip_mode == "truncate":
            prefix = 24 if parsed.version == 4 else 48
            return str(ipaddress.ip_network(f"{parsed}/{prefix}", strict=False))
        digest = hmac.new(self.key, parsed.packed, hashlib.sha256).hexdigest()
        return f"ip-{digest[:16]}"

    def _ip_match(self, match: re.Match[str]) -> str:
        return self.ip(match.group(0)) if _is_ip(match.group(0)) else match.group(0)

    def text(self, value: str, limit: int = MAX_STRING) -> str:
        if len(value) > limit:
            head = _CUT_CODE.sub(r"\1", value[:limit])
            value = head + f"...[{len(value) - len(head)} more]"
        value = hide_credentials(value)
        if "code" in value or "{" in value:
            value = _TAGGED_CODE.sub(self._tagged_code, value)
        value = _EMAIL.sub(r"\1***@\2", value)
        value = _IPV4.sub(self._ip_match, value)
        if value.count(":") >= 2:
            value = _IPV6.sub(self._ip_match, value)
        return _SECRET_RUN.sub(_hide_secret_run, value)

    def field(self, key: str, value: object, depth: int = 0) -> object:
        lowered = key.lower()
        if any(part in lowered for part in SECRET_KEY_PARTS) or lowered in BODY_KEYS:
            return REDACTED
        if lowered in IP_KEYS and isinstance(value, str):
            return self.ip(value)
        if lowered in CODE_KEYS:
            return self._code_field(lowered, value, depth)
        return self.value(value, depth)

    def value(self, value: object, depth: int = 0) -> object:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return f"[{len(value)} bytes]"  # message bodies travel as bytes: never shown
        if depth >= MAX_DEPTH:
            return "[nested]"
        if isinstance(value, Mapping):
            return {str(k): self.field(str(k), v, depth + 1) for k, v in list(value.items())[:MAX_ITEMS]}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v, depth + 1) for v in list(value)[:MAX_ITEMS]]
        return self.text(str(value))

    def line(self, record: logging.LogRecord, subject: LogSubject | None = None) -> dict[str, object]:
        """The line for `record`: timestamp, level, event, logger, context, fields, exception."""
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "timestamp": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": self.text(record.getMessage()),
            "logger": record.name,
        }
        if subject is not None:
            line["conn"] = self.text(subject.id)
            if subject.code is not None:
                line["session"] = self.code(subject.code)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for raw_key, value in fields.items():
                key = str(raw_key)
                if key in VERBATIM_KEYS:  # addresses kept; a password in a URL never
                    line[key] = _URL_USERINFO.sub(r"\1\2:***@", value) if isinstance(value, str) else value
                else:
                    line[f"{key}_" if key in LINE_KEYS else key] = self.field(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            line["exception"] = self.text(text, MAX_EXCEPTION)
        elif record.exc_text:
            line["exception"] = self.text(record.exc_text, MAX_EXCEPTION)
        return line


def hide_credentials(text: str) -> str:
    """URL passwords, auth headers, JWTs and secret query parameters hidden: for text that is not a log line."""
    text = _URL_USERINFO.sub(r"\1\2:***@", text)
    text = _AUTH_SCHEME.sub(r"\1 " + REDACTED, text)
    text = _JWT.sub(REDACTED, text) if "eyJ" in text else text
    return _QUERY_SECRET.sub(r"\1" + REDACTED, text)


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _hide_secret_run(match: re.Match[str]) -> str:
    run = match.group(0)
    return REDACTED if run.lower() != run and run.upper() != run else run
