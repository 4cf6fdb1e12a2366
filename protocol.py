"""Tandem's wire protocol (PROTOCOL.md: version 1, and 1.1's `mid`, `hello` and `auth`), sans-IO.

Text in, typed requests out; typed server frames in, text out. Nothing here
does I/O, logs or reads a clock. Errors are typed by whose fault they are and
carry their wire code; `error_frame` is the one place that maps them to frames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final, NoReturn

import orjson

SUBPROTOCOL: Final = "tandem.v1"
# What `welcome` reports: the protocol version implemented, and this server's
# version (pyproject.toml's; tests/test_auth_unit.py checks they agree).
PROTOCOL_VERSION: Final = "1.1"
SERVER_VERSION: Final = "0.1.0"

# Limits on client input, each with its reason.
# Default frame limit of PROTOCOL.md: large enough for any chat or edit payload,
# small enough that a queue of frames per connection stays cheap.
DEFAULT_MAX_MESSAGE_BYTES: Final = 65536
# PROTOCOL.md: an `id` string holds 1 to 64 characters, and so does a `mid`.
MAX_ID_CHARS: Final = 64
MAX_MID_CHARS: Final = 64
# Codes are 6-12 characters of CODE_ALPHABET (PROTOCOL.md).
MIN_CODE_CHARS: Final = 6
MAX_CODE_CHARS: Final = 12
# Crockford's base32: 0-9 and A-Z without the ambiguous I, L, O, U.
CODE_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Server-issued client ids and tokens are far shorter; the bound only stops a
# client from making the server hash or compare megabytes.
MAX_CLIENT_ID_CHARS: Final = 64
MAX_TOKEN_CHARS: Final = 128
# A JWT in `auth`: an access token with its claims is a few KiB at most; the
# bound keeps a client from making the server decode megabytes.
MAX_JWT_CHARS: Final = 16384
# `last_seq` is a seq, and seqs count messages: 2**53 keeps it exact in every
# JSON implementation (a JavaScript client's Number).
MAX_SEQ: Final = 2**53 - 1

_CODE_CHARS: Final = frozenset(CODE_ALPHABET)
# Every string token of a JSON text, with the colon that makes it a key. In
# JSON each `"` outside a string opens one, so the tokens are found in order.
_JSON_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?')


class CloseCode(IntEnum):
    """WebSocket close codes that Tandem sends (PROTOCOL.md, Closing)."""

    NORMAL = 1000
    UNSUPPORTED_DATA = 1003  # a binary frame
    POLICY_VIOLATION = 1008  # auth missing, or abuse after repeated errors
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # graceful shutdown: reconnect and session:resume
    TRY_AGAIN_LATER = 1013  # overloaded, or too slow to read its frames


class ErrorCode(StrEnum):
    """The `code` of an `error` frame."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    NOT_FOUND = "not_found"
    SESSION_FULL = "session_full"
    ALREADY_IN_SESSION = "already_in_session"
    NOT_IN_SESSION = "not_in_session"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


RequestId = str | int | None


class TandemError(Exception):
    """A request failed with a wire error code; the connection stays open.

    `request_id` is the valid `id` of the frame being answered, if known.
    """

    def __init__(
        self,
        message: str,
        code: ErrorCode,
        *,
        request_id: RequestId = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after


class ClientError(TandemError):
    """The client's fault: a malformed frame, or a request its state forbids."""


class AuthError(ClientError):
    """Authentication failed or is missing: `unauthorized`, with the check that
    failed as the message (never the token)."""

    def __init__(self, message: str, *, request_id: RequestId = None) -> None:
        super().__init__(message, ErrorCode.UNAUTHORIZED, request_id=request_id)


class ServerError(TandemError):
    """Tandem's fault: a backend is down (`unavailable`) or a bug (`internal`)."""


class FrameRejected(Exception):
    """A frame the connection cannot survive: the server closes with `close_code`."""

    def __init__(self, message: str, close_code: CloseCode) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code


# --- client to server -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateSession:
    id: RequestId


@dataclass(frozen=True, slots=True)
class JoinSession:
    id: RequestId
    code: str


@dataclass(frozen=True, slots=True)
class ResumeSession:
    id: RequestId
    code: str
    client_id: str
    token: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class SendMessage:
    id: RequestId
    data: bytes  # the `data` value, serialised once as compact JSON
    mid: str | None = None  # the sender's idempotency key (protocol 1.1)


@dataclass(frozen=True, slots=True)
class LeaveSession:
    id: RequestId


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId


@dataclass(frozen=True, slots=True)
class Hello:
    id: RequestId


@dataclass(frozen=True, slots=True)
class Authenticate:
    id: RequestId
    token: str  # a JWT; never logged


Request = CreateSession | JoinSession | ResumeSession | SendMessage | LeaveSession | Ping | Hello | Authenticate


def utf8_length(text: str) -> int:
    """Length of `text` in UTF-8 bytes; O(1) for ASCII text."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def reject_binary() -> NoReturn:
    """A binary frame arrived: PROTOCOL.md closes with 1003."""
    raise FrameRejected("binary frames are not supported", CloseCode.UNSUPPORTED_DATA)


def parse_request(text: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """Parse one text frame into a request.

    Raises FrameRejected for a frame over `max_bytes` and ClientError for any
    other invalid frame (with `request_id` set when the frame had a valid id).
    """
    if len(text) > max_bytes or utf8_length(text) > max_bytes:
        raise FrameRejected(f"frame exceeds {max_bytes} bytes", CloseCode.MESSAGE_TOO_BIG)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ClientError("frame is not valid JSON", ErrorCode.BAD_REQUEST) from None
    if not isinstance(obj, dict):
        raise ClientError("frame must be a JSON object", ErrorCode.BAD_REQUEST)
    _reject_duplicate_keys(text, obj)
    request_id = _parse_id(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ClientError("`type` must be a string", ErrorCode.BAD_REQUEST, request_id=request_id)
    parse = _PARSERS.get(kind)
    if parse is None:
        raise ClientError("unknown type", ErrorCode.UNKNOWN_TYPE, request_id=request_id)
    try:
        return parse(obj, request_id)
    except _FieldError as err:
        raise ClientError(str(err), ErrorCode.BAD_REQUEST, request_id=request_id) from None


class _FieldError(Exception):
    pass


def _key_count(text: str | bytes) -> int:
    if isinstance(text, bytes):
        text = text.decode()
    colons = _JSON_STRING.findall(text)
    return len(colons) - colons.count("")


def _reject_duplicate_keys(text: str, obj: dict[str, object]) -> None:
    """JSON parsers keep the last of repeated keys, so `{"type": "message:send",
    "type": "session:leave"}` would be a leave: refuse any repeated key instead.

    The text's keys are counted and compared with the parsed objects' keys;
    only a frame with nested objects pays for re-serialising them.
    """
    in_text = _key_count(text)
    if in_text == len(obj):
        return
    try:
        parsed = orjson.dumps(obj)
    except orjson.JSONEncodeError:  # orjson writes at most 254 levels of nesting
        raise ClientError("frame is nested too deeply", ErrorCode.BAD_REQUEST) from None
    if in_text != _key_count(parsed):
        raise ClientError("frame has a repeated key", ErrorCode.BAD_REQUEST)


def _parse_id(obj: dict[str, object]) -> RequestId:
    if "id" not in obj:
        return None
    value = obj["id"]
    if isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ClientError(
        f"`id` must be a string of 1 to {MAX_ID_CHARS} characters or an integer",
        ErrorCode.BAD_REQUEST,
    )


def normalise_code(value: object) -> str:
    """A session code from the wire, upper-cased; _FieldError if malformed."""
    # isascii first: upper() maps some letters outside ASCII into the alphabet
    # ("ß" -> "SS"), and a code is only ever a case of CODE_ALPHABET.
    if not isinstance(value, str) or not value.isascii() or not MIN_CODE_CHARS <= len(value) <= MAX_CODE_CHARS:
        raise _FieldError(f"`code` must be a string of {MIN_CODE_CHARS} to {MAX_CODE_CHARS} characters")
    code = value.upper()
    if not _CODE_CHARS.issuperset(code):
        raise _FieldError("`code` may hold only 0-9 and A-Z without I, L, O, U")
    return code


def _string(obj: dict[str, object], name: str, max_chars: int) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise _FieldError(f"`{name}` must be a string of 1 to {max_chars} characters")
    return value


def _seq(obj: dict[str, object], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise _FieldError(f"`{name}` must be an integer from 0 to {MAX_SEQ}")
    return value


def _create(obj: dict[str, object], request_id: RequestId) -> Request:
    return CreateSession(request_id)


def _join(obj: dict[str, object], request_id: RequestId) -> Request:
    return JoinSession(request_id, normalise_code(obj.get("code")))


def _resume(obj: dict[str, object], request_id: RequestId) -> Request:
    return ResumeSession(
        request_id,
        code=normalise_code(obj.get("code")),
        client_id=_string(obj, "client_id", MAX_CLIENT_ID_CHARS),
        token=_string(obj, "token", MAX_TOKEN_CHARS),
        last_seq=_seq(obj, "last_seq"),
    )


def _send(obj: dict[str, object], request_id: RequestId) -> Request:
    if "data" not in obj:
        raise _FieldError("`data` is required")
    mid = obj.get("mid")
    if mid is not None and (not isinstance(mid, str) or not 1 <= len(mid) <= MAX_MID_CHARS):
        raise _FieldError(f"`mid` must be a string of 1 to {MAX_MID_CHARS} characters, or null")
    try:
        return SendMessage(request_id, orjson.dumps(obj["data"]), mid)
    except orjson.JSONEncodeError:  # orjson writes at most 254 levels of nesting
        raise _FieldError("`data` is nested too deeply") from None


def _leave(obj: dict[str, object], request_id: RequestId) -> Request:
    return LeaveSession(request_id)


def _ping(obj: dict[str, object], request_id: RequestId) -> Request:
    return Ping(request_id)


def _hello(obj: dict[str, object], request_id: RequestId) -> Request:
    return Hello(request_id)


def _auth(obj: dict[str, object], request_id: RequestId) -> Request:
    return Authenticate(request_id, _string(obj, "token", MAX_JWT_CHARS))


_PARSERS: Final = {
    "session:create": _create,
    "session:join": _join,
    "session:resume": _resume,
    "message:send": _send,
    "session:leave": _leave,
    "ping": _ping,
    "hello": _hello,
    "auth": _auth,
}


# --- server to client -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    client_id: str
    online: bool


@dataclass(frozen=True, slots=True)
class SessionCreated:
    id: RequestId
    code: str
    client_id: str
    token: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class SessionJoined:
    id: RequestId
    code: str
    client_id: str
    token: str
    clients: tuple[Member, ...]
    last_seq: int


@dataclass(frozen=True, slots=True)
class SessionResumed:
    id: RequestId
    code: str
    client_id: str
    clients: tuple[Member, ...]
    last_seq: int
    recovered: bool


@dataclass(frozen=True, slots=True)
class MessageAck:
    id: RequestId
    seq: int
    duplicate: bool = False  # a `mid` already stored: `seq` is the stored message's


@dataclass(frozen=True, slots=True)
class SessionLeft:
    id: RequestId
    code: str


@dataclass(frozen=True, slots=True)
class Pong:
    id: RequestId
    ts: int


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits `welcome` reports."""

    max_message_bytes: int
    history_size: int
    session_idle_timeout: float  # seconds
    session_ttl: float  # seconds


@dataclass(frozen=True, slots=True)
class Welcome:
    id: RequestId
    auth: str  # "none" or "required"
    limits: Limits
    time: int  # the server's clock, ms since the Unix epoch
    motd: str | None = None  # the operator's message of the day
    protocol: str = PROTOCOL_VERSION
    server: str = f"tandem/{SERVER_VERSION}"


@dataclass(frozen=True, slots=True)
class AuthOk:
    id: RequestId
    user: str  # the token's `sub`
    expires_at: int  # its `exp`, ms since the Unix epoch


@dataclass(frozen=True, slots=True)
class SessionPaired:
    code: str
    clients: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class Presence:
    client_id: str
    online: bool


@dataclass(frozen=True, slots=True)
class PeerLeft:
    client_id: str


@dataclass(frozen=True, slots=True)
class Message:
    code: str
    seq: int
    sender: str  # `from` on the wire
    data: bytes  # compact JSON, embedded as is
    ts: int
    mid: str | None = None


@dataclass(frozen=True, slots=True)
class SessionExpired:
    code: str
    reason: str  # "idle" or "ttl"


@dataclass(frozen=True, slots=True)
class Error:
    id: RequestId
    code: ErrorCode
    message: str
    retry_after: float | None = None


ServerFrame = (
    SessionCreated
    | SessionJoined
    | SessionResumed
    | MessageAck
    | SessionLeft
    | Pong
    | Welcome
    | AuthOk
    | SessionPaired
    | Presence
    | PeerLeft
    | Message
    | SessionExpired
    | Error
)


def error_frame(err: TandemError, request_id: RequestId) -> Error:
    """The `error` frame answering a failed request (the one mapping)."""
    rid = err.request_id if err.request_id is not None else request_id
    return Error(rid, err.code, err.message, err.retry_after)


def _clients(members: tuple[Member, ...]) -> list[dict[str, object]]:
    return [{"client_id": m.client_id, "online": m.online} for m in members]


def _with_id(request_id: RequestId, body: dict[str, object]) -> dict[str, object]:
    if request_id is not None:
        body["id"] = request_id
    return body


def _payload(frame: ServerFrame) -> dict[str, object]:
    match frame:
        case Message():
            message: dict[str, object] = {
                "type": "message",
                "code": frame.code,
                "seq": frame.seq,
                "from": frame.sender,
                "data": orjson.Fragment(frame.data),
                "ts": frame.ts,
            }
            if frame.mid is not None:
                message["mid"] = frame.mid
            return message
        case MessageAck():
            ack: dict[str, object] = {"type": "message:ack", "seq": frame.seq}
            if frame.duplicate:
                ack["duplicate"] = True
            return _with_id(frame.id, ack)
        case SessionCreated():
            return _with_id(
                frame.id,
                {
                    "type": "session:created",
                    "code": frame.code,
                    "client_id": frame.client_id,
                    "token": frame.token,
                    "expires_at": frame.expires_at,
                },
            )
        case SessionJoined():
            return _with_id(
                frame.id,
                {
                    "type": "session:joined",
                    "code": frame.code,
                    "client_id": frame.client_id,
                    "token": frame.token,
                    "clients": _clients(frame.clients),
                    "last_seq": frame.last_seq,
                },
            )
        case SessionResumed():
            return _with_id(
                frame.id,
                {
                    "type": "session:resumed",
                    "code": frame.code,
                    "client_id": frame.client_id,
                    "clients": _clients(frame.clients),
                    "last_seq": frame.last_seq,
                    "recovered": frame.recovered,
                },
            )
        case SessionLeft():
            return _with_id(frame.id, {"type": "session:left", "code": frame.code})
        case Pong():
            return _with_id(frame.id, {"type": "pong", "ts": frame.ts})
        case Welcome():
            welcome: dict[str, object] = {
                "type": "welcome",
                "protocol": frame.protocol,
                "server": frame.server,
                "auth": frame.auth,
                "limits": {
                    "max_message_bytes": frame.limits.max_message_bytes,
                    "history_size": frame.limits.history_size,
                    "session_idle_timeout": frame.limits.session_idle_timeout,
                    "session_ttl": frame.limits.session_ttl,
                },
                "time": frame.time,
            }
            if frame.motd is not None:
                welcome["motd"] = frame.motd
            return _with_id(frame.id, welcome)
        case AuthOk():
            return _with_id(frame.id, {"type": "auth:ok", "user": frame.user, "expires_at": frame.expires_at})
        case SessionPaired():
            return {"type": "session:paired", "code": frame.code, "clients": _clients(frame.clients)}
        case Presence():
            return {"type": "session:presence", "client_id": frame.client_id, "online": frame.online}
        case PeerLeft():
            return {"type": "session:peer_left", "client_id": frame.client_id}
        case SessionExpired():
            return {"type": "session:expired", "code": frame.code, "reason": frame.reason}
        case Error():
            body: dict[str, object] = {"type": "error", "code": str(frame.code), "message": frame.message}
            if frame.retry_after is not None:
                body["retry_after"] = frame.retry_after
            return _with_id(frame.id, body)


def serialize(frame: ServerFrame) -> str:
    """The text of one server frame."""
    return orjson.dumps(_payload(frame)).decode()
