"""Unit tests for protocol.py, the sans-IO wire protocol (PROTOCOL.md).

Parsing: size limits, JSON and object checks, `id` and `type` rules, every
request type's fields. Serialising: every server frame's exact wire fields.
Hypothesis properties: no input makes `parse_request` raise anything but its
two documented exceptions, and any JSON `data` survives the relay unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CODE_ALPHABET,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CLIENT_ID_CHARS,
    MAX_CODE_CHARS,
    MAX_ID_CHARS,
    MAX_SEQ,
    MAX_TOKEN_CHARS,
    MIN_CODE_CHARS,
    ClientError,
    CloseCode,
    CreateSession,
    Error,
    ErrorCode,
    FrameRejected,
    JoinSession,
    LeaveSession,
    Member,
    Message,
    MessageAck,
    PeerLeft,
    Ping,
    Pong,
    Presence,
    Request,
    RequestId,
    ResumeSession,
    SendMessage,
    ServerError,
    ServerFrame,
    SessionCreated,
    SessionExpired,
    SessionJoined,
    SessionLeft,
    SessionPaired,
    SessionResumed,
    TandemError,
    error_frame,
    parse_request,
    reject_binary,
    serialize,
    utf8_length,
)

REQUEST_TYPES = (CreateSession, JoinSession, ResumeSession, SendMessage, LeaveSession, Ping)
TYPE_NAMES = ("session:create", "session:join", "session:resume", "message:send", "session:leave", "ping")
VALID_CODE = "ABCD2345"
CLIENT_ID = "c_0123456789"
TOKEN = "t" * 43

# Property tests run a few hundred examples each and never write a database
# into the working tree.
FAST = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def frame(**fields: Any) -> str:
    """The text of a client frame with these fields."""
    return orjson.dumps(fields).decode()


def parse(**fields: Any) -> Request:
    return parse_request(frame(**fields))


def client_error(text: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ClientError:
    with pytest.raises(ClientError) as info:
        parse_request(text, max_bytes)
    return info.value


def padded_ping(total_chars: int, pad_char: str = "a") -> str:
    """A valid ping frame of exactly `total_chars` characters."""
    head, tail = '{"type":"ping","pad":"', '"}'
    count = total_chars - len(head) - len(tail)
    assert count >= 0
    return head + pad_char * count + tail


def wire(server_frame: ServerFrame) -> dict[str, Any]:
    text = serialize(server_frame)
    assert isinstance(text, str)
    result = orjson.loads(text)
    assert isinstance(result, dict)
    return result


# --- size limits and binary frames ------------------------------------------


def test_reject_binary_closes_with_1003() -> None:
    with pytest.raises(FrameRejected) as info:
        reject_binary()
    assert info.value.close_code == CloseCode.UNSUPPORTED_DATA
    assert int(info.value.close_code) == 1003
    assert info.value.message


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    text = padded_ping(100)
    assert len(text) == 100
    assert parse_request(text, 100) == Ping(None)


def test_frame_one_char_over_the_limit_closes_with_1009() -> None:
    with pytest.raises(FrameRejected) as info:
        parse_request(padded_ping(101), 100)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG
    assert int(info.value.close_code) == 1009


def test_frame_far_over_the_limit_is_rejected_before_parsing() -> None:
    # Not even JSON: the size check comes first.
    with pytest.raises(FrameRejected) as info:
        parse_request("x" * 1000, 10)
    assert info.value.close_code == 1009


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_multibyte_frame_of_exactly_the_limit_in_bytes_is_accepted(char: str) -> None:
    width = len(char.encode())
    head_tail = len('{"type":"ping","pad":""}')
    text = padded_ping(head_tail + 10, char)
    limit = head_tail + 10 * width
    assert utf8_length(text) == limit
    assert parse_request(text, limit) == Ping(None)


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_multibyte_frame_over_the_limit_in_bytes_but_not_in_chars_is_rejected(char: str) -> None:
    head_tail = len('{"type":"ping","pad":""}')
    text = padded_ping(head_tail + 10, char)
    limit = utf8_length(text) - 1
    assert len(text) <= limit  # only the byte count exceeds the limit
    with pytest.raises(FrameRejected) as info:
        parse_request(text, limit)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG


def test_default_limit_is_65536_bytes() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 65536
    assert parse_request(padded_ping(65536)) == Ping(None)
    with pytest.raises(FrameRejected):
        parse_request(padded_ping(65537))
    # 2-byte characters: 65536 bytes accepted, one more byte rejected.
    head_tail = len('{"type":"ping","pad":""}')
    at_limit = padded_ping(head_tail + (65536 - head_tail) // 2, "é")
    assert utf8_length(at_limit) == 65536
    assert parse_request(at_limit) == Ping(None)
    with pytest.raises(FrameRejected):
        parse_request(at_limit[:-2] + 'é "}')


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0), ("abc", 3), ("é", 2), ("€", 3), ("😀", 4), ("a€😀", 8), ("\ud800", 3)],
)
def test_utf8_length(text: str, expected: int) -> None:
    assert utf8_length(text) == expected


# --- JSON and object --------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", "not json", "{'type': 'ping'}", '{"type":"ping",}', "NaN", '{"type":"ping"} x', '"\ud800"'],
)
def test_invalid_json_is_bad_request(text: str) -> None:
    err = client_error(text)
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id is None


def test_lone_surrogate_in_frame_is_bad_request() -> None:
    err = client_error('{"type":"ping","id":"a\ud800"}')
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id is None


@pytest.mark.parametrize("text", ["[]", '[{"type":"ping"}]', '"ping"', "1", "1.5", "true", "null"])
def test_non_object_is_bad_request(text: str) -> None:
    err = client_error(text)
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id is None


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"message:send","type":"session:leave"}',
        '{"type":"message:send", "data": 1, "type" : "session:leave"}',
        '{"type":"message:send","data":{"to":"a","to":"b"}}',
        '{"type":"message:send","data":[{"x":{"k":1,"k":2}}]}',
        '{"type":"ping","id":1,"id":2}',
        '{"type":"ping","extra":{"\\u0061":1,"a":2}}',  # one key written two ways
    ],
)
def test_a_repeated_key_anywhere_is_bad_request(text: str) -> None:
    err = client_error(text)
    assert err.code == ErrorCode.BAD_REQUEST and "repeated key" in err.message


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"message:send","data":{"a":"\\":","b":[{"a":"x"}],"c":{"a":{"a":1}}}}',
        '{"type":"message:send","data":"\\"type\\":"}',
        '{"type":"message:send","data":{"":1," ":2}}',
    ],
)
def test_keys_that_only_look_repeated_are_accepted(text: str) -> None:
    assert isinstance(parse_request(text), SendMessage)


def test_deep_data_with_an_object_inside_is_bad_request() -> None:
    text = '{"type":"message:send","data":{"a":' + "[" * 300 + "]" * 300 + "}}"
    err = client_error(text)
    assert err.code == ErrorCode.BAD_REQUEST and "nested too deeply" in err.message


def _pairs_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("repeated key")
    return dict(pairs)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object written as its pairs, repeats allowed."""


def _write(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "{" + ",".join(json.dumps(k) + ":" + _write(v) for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_write(v) for v in value) + "]"
    return json.dumps(value)


_json_values = st.recursive(
    st.none() | st.integers() | st.text(alphabet='ab":\\{}', max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(st.tuples(st.text(alphabet='ab":\\', max_size=2), inner), max_size=3).map(_Pairs)
    ),
    max_leaves=10,
)


@FAST
@given(_json_values)
def test_repeated_keys_are_found_like_a_strict_parser_finds_them(data: Any) -> None:
    text = '{"type":"message:send","data":' + _write(data) + "}"
    try:
        json.loads(text, object_pairs_hook=_pairs_without_repeats)
    except ValueError:
        strict_ok = False
    else:
        strict_ok = True
    try:
        parse_request(text)
    except ClientError as err:
        assert not strict_ok and "repeated key" in err.message, (text, err.message)
    else:
        assert strict_ok, text


def test_client_error_is_a_tandem_error() -> None:
    err = client_error("[]")
    assert isinstance(err, TandemError)
    assert err.retry_after is None
    assert err.message == str(err)


# --- id -----------------------------------------------------------------------


def test_absent_id_is_none() -> None:
    assert parse(type="ping") == Ping(None)


@pytest.mark.parametrize(
    "request_id",
    ["a", "req-1", "x" * MAX_ID_CHARS, "é" * MAX_ID_CHARS, "😀", 0, 1, -7, 2**53, 2**63 - 1, -(2**63), 2**64 - 1],
)
def test_valid_id_is_kept(request_id: RequestId) -> None:
    result = parse(type="ping", id=request_id)
    assert result == Ping(request_id)
    assert type(result.id) is type(request_id)


def test_id_limit_is_64_chars() -> None:
    assert MAX_ID_CHARS == 64


@pytest.mark.parametrize(
    "bad_id",
    ["", "x" * (MAX_ID_CHARS + 1), "é" * (MAX_ID_CHARS + 1), True, False, 1.0, 1.5, -0.5, None, [], [1], {}, {"a": 1}],
)
def test_invalid_id_is_bad_request_and_not_echoed(bad_id: object) -> None:
    err = client_error(frame(type="ping", id=bad_id))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id is None
    assert error_frame(err, None).id is None


def test_invalid_id_wins_over_unknown_type() -> None:
    err = client_error(frame(type="no:such", id=""))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id is None


# --- type -------------------------------------------------------------------


def test_missing_type_is_bad_request_with_id() -> None:
    err = client_error(frame(id="r1"))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == "r1"


def test_missing_type_without_id_is_bad_request() -> None:
    err = client_error("{}")
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id is None


@pytest.mark.parametrize("kind", [None, 1, True, 1.5, [], ["ping"], {"ping": 1}])
def test_non_string_type_is_bad_request_with_id(kind: object) -> None:
    err = client_error(frame(type=kind, id=5))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == 5


@pytest.mark.parametrize(
    "kind", ["", "PING", "Ping", " ping", "session", "session:created", "message", "pong", "error"]
)
def test_unknown_type_is_unknown_type_with_id(kind: str) -> None:
    err = client_error(frame(type=kind, id="abc"))
    assert err.code == ErrorCode.UNKNOWN_TYPE
    assert err.request_id == "abc"


def test_unknown_type_without_id() -> None:
    err = client_error(frame(type="nope"))
    assert err.code == ErrorCode.UNKNOWN_TYPE
    assert err.request_id is None


# --- requests without fields ------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("session:create", CreateSession), ("session:leave", LeaveSession), ("ping", Ping)],
)
@pytest.mark.parametrize("request_id", [None, "x", 3])
def test_fieldless_requests(kind: str, cls: type[Request], request_id: RequestId) -> None:
    fields: dict[str, Any] = {"type": kind}
    if request_id is not None:
        fields["id"] = request_id
    result = parse(**fields)
    assert type(result) is cls
    assert result.id == request_id


def test_extra_fields_are_ignored() -> None:
    assert parse(type="ping", id=1, foo="bar", data=[1], code=5) == Ping(1)
    assert parse(type="session:create", extra={"nested": True}) == CreateSession(None)
    assert parse(type="session:leave", id="z", last_seq="x") == LeaveSession("z")
    assert parse(type="session:join", code=VALID_CODE, token=1, x=None) == JoinSession(None, VALID_CODE)
    assert parse(type="message:send", data=1, code=[], seq=-1) == SendMessage(None, b"1")
    resumed = parse(
        type="session:resume", code=VALID_CODE, client_id=CLIENT_ID, token=TOKEN, last_seq=0, data={}, extra=1
    )
    assert resumed == ResumeSession(None, VALID_CODE, CLIENT_ID, TOKEN, 0)


def test_requests_are_frozen() -> None:
    result = parse(type="session:join", id=1, code=VALID_CODE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.id = 2  # type: ignore[misc]


# --- session:join and codes -------------------------------------------------


def test_join_valid() -> None:
    assert parse(type="session:join", id="j", code=VALID_CODE) == JoinSession("j", VALID_CODE)


def test_code_length_bounds() -> None:
    assert (MIN_CODE_CHARS, MAX_CODE_CHARS) == (6, 12)
    for code in ["A" * 6, "B" * 12, "0123456789AB", "Z9Z9Z9"]:
        assert parse(type="session:join", code=code) == JoinSession(None, code)


@pytest.mark.parametrize("code", ["", "A", "A" * 5, "A" * 13, "0123456789ABC", "A" * 100])
def test_code_of_wrong_length_is_bad_request(code: str) -> None:
    err = client_error(frame(type="session:join", id=9, code=code))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == 9


@pytest.mark.parametrize(
    ("given", "normalised"),
    [("abcdef", "ABCDEF"), ("abcd2345", "ABCD2345"), ("AbCdEf", "ABCDEF"), ("zyxwvt987654", "ZYXWVT987654")],
)
def test_code_is_case_insensitive_and_upper_cased(given: str, normalised: str) -> None:
    assert parse(type="session:join", code=given) == JoinSession(None, normalised)


def test_whole_code_alphabet_is_accepted() -> None:
    assert len(CODE_ALPHABET) == 32
    for start in range(0, len(CODE_ALPHABET), 8):
        chunk = CODE_ALPHABET[start : start + 8]
        assert parse(type="session:join", code=chunk) == JoinSession(None, chunk)
        assert parse(type="session:join", code=chunk.lower()) == JoinSession(None, chunk)


@pytest.mark.parametrize("letter", ["I", "L", "O", "U", "i", "l", "o", "u"])
def test_code_with_forbidden_letter_is_bad_request(letter: str) -> None:
    err = client_error(frame(type="session:join", id="f", code="ABCDE" + letter))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == "f"


@pytest.mark.parametrize(
    "code", ["ABC-DEF", "ABC DEF", "ABCDE!", "ABCDE\n", "ABCDEÉ", "ABCDE_", "\uff21\uff22\uff23\uff24\uff25\uff26"]
)
def test_code_with_other_characters_is_bad_request(code: str) -> None:
    err = client_error(frame(type="session:join", code=code))
    assert err.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("code", [None, 123456, 1.5, True, ["ABCDEF"], {"code": "ABCDEF"}])
def test_non_string_code_is_bad_request(code: object) -> None:
    err = client_error(frame(type="session:join", id=1, code=code))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == 1


def test_missing_code_is_bad_request() -> None:
    err = client_error(frame(type="session:join", id=2))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == 2


@pytest.mark.parametrize(
    "code",
    [
        "ßßßßßß",  # upper-cases to "SSSSSSSSSSSS"
        "\u017f" * 6,  # LATIN SMALL LETTER LONG S upper-cases to "S"
        "ABCDEFGHJKMß",  # 12 characters that upper-case to 13
        "ﬀﬀﬀﬀﬀﬀ",  # LATIN SMALL LIGATURE FF upper-cases to "FF"
    ],
)
def test_non_ascii_code_that_upper_cases_into_the_alphabet_is_bad_request(code: str) -> None:
    # PROTOCOL.md: a code is 6 to 12 characters of 0-9A-Z, case-insensitive.
    # None of these is any case of such a code.
    err = client_error(frame(type="session:join", code=code))
    assert err.code == ErrorCode.BAD_REQUEST


@FAST
@given(st.text(alphabet=CODE_ALPHABET + CODE_ALPHABET.lower() + "ILOUiolu-_ !é0", max_size=16))
def test_accepted_codes_are_exactly_the_valid_ones(code: str) -> None:
    valid = MIN_CODE_CHARS <= len(code) <= MAX_CODE_CHARS and set(code.upper()) <= set(CODE_ALPHABET)
    text = frame(type="session:join", id=1, code=code)
    if valid:
        assert parse_request(text) == JoinSession(1, code.upper())
    else:
        err = client_error(text)
        assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, 1)


# --- session:resume ---------------------------------------------------------


def resume_fields(**overrides: Any) -> dict[str, Any]:
    """The fields of a valid `session:resume` request, with `overrides`."""
    fields: dict[str, Any] = {
        "type": "session:resume",
        "id": "r",
        "code": VALID_CODE.lower(),
        "client_id": CLIENT_ID,
        "token": TOKEN,
        "last_seq": 7,
    }
    fields.update(overrides)
    return fields


def test_resume_valid() -> None:
    assert parse(**resume_fields()) == ResumeSession("r", VALID_CODE, CLIENT_ID, TOKEN, 7)


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "c"},
        {"client_id": "c" * MAX_CLIENT_ID_CHARS},
        {"client_id": "é" * MAX_CLIENT_ID_CHARS},
        {"token": "t"},
        {"token": "t" * MAX_TOKEN_CHARS},
        {"last_seq": 0},
        {"last_seq": 1},
        {"last_seq": MAX_SEQ},
        {"code": "ZZZZZZ"},
    ],
)
def test_resume_valid_bounds(overrides: dict[str, Any]) -> None:
    result = parse(**resume_fields(**overrides))
    assert isinstance(result, ResumeSession)
    expected = {"code": VALID_CODE, "client_id": CLIENT_ID, "token": TOKEN, "last_seq": 7, **overrides}
    assert result == ResumeSession("r", **expected)
    assert type(result.last_seq) is int


def test_resume_limits() -> None:
    assert (MAX_CLIENT_ID_CHARS, MAX_TOKEN_CHARS, MAX_SEQ) == (64, 128, 2**53 - 1)


@pytest.mark.parametrize(
    "overrides",
    [
        {"code": "ABCDE"},
        {"code": "ABCDEO"},
        {"code": 123456},
        {"code": None},
        {"client_id": ""},
        {"client_id": "c" * (MAX_CLIENT_ID_CHARS + 1)},
        {"client_id": 5},
        {"client_id": None},
        {"client_id": ["c"]},
        {"token": ""},
        {"token": "t" * (MAX_TOKEN_CHARS + 1)},
        {"token": 5},
        {"token": None},
        {"token": {"t": 1}},
        {"last_seq": -1},
        {"last_seq": 2**53},
        {"last_seq": 2**63 - 1},
        {"last_seq": 2**64 - 1},
        {"last_seq": True},
        {"last_seq": False},
        {"last_seq": 1.0},
        {"last_seq": 0.5},
        {"last_seq": "1"},
        {"last_seq": None},
        {"last_seq": [1]},
    ],
)
def test_resume_invalid_field_is_bad_request_with_id(overrides: dict[str, Any]) -> None:
    err = client_error(frame(**resume_fields(**overrides)))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == "r"


@pytest.mark.parametrize("missing", ["code", "client_id", "token", "last_seq"])
def test_resume_missing_field_is_bad_request(missing: str) -> None:
    fields = resume_fields()
    del fields[missing]
    err = client_error(frame(**fields))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == "r"


# --- message:send -----------------------------------------------------------


def test_send_without_data_is_bad_request_with_id() -> None:
    err = client_error(frame(type="message:send", id=11))
    assert err.code == ErrorCode.BAD_REQUEST
    assert err.request_id == 11


@pytest.mark.parametrize(
    "data",
    [
        None,
        True,
        False,
        0,
        -1,
        2**53,
        2**64 - 1,
        -(2**63),
        1.5,
        -0.25,
        1e300,
        "",
        "hello",
        'héllo 😀 "quoted" \\ \n',
        [],
        [1, "two", None, [3.5, {"four": 4}]],
        {},
        {"a": 1, "b": [True, None], "c": {"d": {"e": "f"}}},
    ],
)
def test_send_data_of_every_json_kind(data: Any) -> None:
    result = parse(type="message:send", id="m", data=data)
    assert result == SendMessage("m", orjson.dumps(data))
    assert isinstance(result, SendMessage)
    assert orjson.loads(result.data) == data


def test_send_data_is_compact_json_bytes() -> None:
    text = '{"type": "message:send", "id": 1, "data": { "b" : [1, 2.50, "x y"] , "a" : null }}'
    result = parse_request(text)
    assert result == SendMessage(1, b'{"b":[1,2.5,"x y"],"a":null}')


def test_send_data_keeps_non_ascii_as_utf8() -> None:
    result = parse_request('{"type":"message:send","data":"\\u00e9\\ud83d\\ude00"}')
    assert result == SendMessage(None, '"é😀"'.encode())


def test_send_data_nested_254_deep_is_accepted() -> None:
    depth = 254
    result = parse_request('{"type":"message:send","id":1,"data":' + "[" * depth + "]" * depth + "}")
    assert isinstance(result, SendMessage)
    assert result.data == b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [255, 300, 1000])
def test_send_data_nested_too_deep_is_a_client_error(depth: int) -> None:
    # A small, valid JSON frame (orjson.loads accepts up to 1024 levels), but
    # orjson.dumps refuses data nested 255 or more levels deep. Whatever the
    # server decides, parse_request may only raise ClientError or FrameRejected.
    text = '{"type":"message:send","id":1,"data":' + "[" * depth + "]" * depth + "}"
    try:
        result = parse_request(text)
    except (ClientError, FrameRejected):
        return
    assert result == SendMessage(1, b"[" * depth + b"]" * depth)


def test_frame_nested_beyond_the_json_depth_limit_is_bad_request() -> None:
    depth = 1100
    err = client_error('{"type":"message:send","id":1,"data":' + "[" * depth + "]" * depth + "}")
    assert err.code == ErrorCode.BAD_REQUEST


# --- serialize ----------------------------------------------------------------

ALICE = Member("c_alice", True)
BOB = Member("c_bob", False)
CLIENTS = (ALICE, BOB)
CLIENTS_WIRE = [{"client_id": "c_alice", "online": True}, {"client_id": "c_bob", "online": False}]


@pytest.mark.parametrize("request_id", ["r-1", 0, 42, -1])
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda rid: SessionCreated(rid, "ABCDEF", "c_alice", "tok", 1700000000000),
            {
                "type": "session:created",
                "code": "ABCDEF",
                "client_id": "c_alice",
                "token": "tok",
                "expires_at": 1700000000000,
            },
        ),
        (
            lambda rid: SessionJoined(rid, "ABCDEF", "c_bob", "tok2", CLIENTS, 3),
            {
                "type": "session:joined",
                "code": "ABCDEF",
                "client_id": "c_bob",
                "token": "tok2",
                "clients": CLIENTS_WIRE,
                "last_seq": 3,
            },
        ),
        (
            lambda rid: SessionResumed(rid, "ABCDEF", "c_bob", CLIENTS, 0, False),
            {
                "type": "session:resumed",
                "code": "ABCDEF",
                "client_id": "c_bob",
                "clients": CLIENTS_WIRE,
                "last_seq": 0,
                "recovered": False,
            },
        ),
        (lambda rid: MessageAck(rid, 1), {"type": "message:ack", "seq": 1}),
        (lambda rid: SessionLeft(rid, "ABCDEF"), {"type": "session:left", "code": "ABCDEF"}),
        (lambda rid: Pong(rid, 1700000000123), {"type": "pong", "ts": 1700000000123}),
        (
            lambda rid: Error(rid, ErrorCode.NOT_FOUND, "no such session"),
            {"type": "error", "code": "not_found", "message": "no such session"},
        ),
    ],
)
def test_direct_replies_carry_id_only_when_set(
    make: Callable[[RequestId], ServerFrame], expected: dict[str, Any], request_id: RequestId
) -> None:
    assert wire(make(None)) == expected
    assert wire(make(request_id)) == {**expected, "id": request_id}


def test_session_resumed_recovered_true() -> None:
    assert wire(SessionResumed("x", "ABCDEF", "c", (), 9, True)) == {
        "type": "session:resumed",
        "id": "x",
        "code": "ABCDEF",
        "client_id": "c",
        "clients": [],
        "last_seq": 9,
        "recovered": True,
    }


@pytest.mark.parametrize(
    ("server_frame", "expected"),
    [
        (SessionPaired("ABCDEF", CLIENTS), {"type": "session:paired", "code": "ABCDEF", "clients": CLIENTS_WIRE}),
        (Presence("c_bob", False), {"type": "session:presence", "client_id": "c_bob", "online": False}),
        (Presence("c_bob", True), {"type": "session:presence", "client_id": "c_bob", "online": True}),
        (PeerLeft("c_bob"), {"type": "session:peer_left", "client_id": "c_bob"}),
        (SessionExpired("ABCDEF", "idle"), {"type": "session:expired", "code": "ABCDEF", "reason": "idle"}),
        (SessionExpired("ABCDEF", "ttl"), {"type": "session:expired", "code": "ABCDEF", "reason": "ttl"}),
        (
            Message("ABCDEF", 5, "c_alice", b'{"text":"hi"}', 1700000000456),
            {
                "type": "message",
                "code": "ABCDEF",
                "seq": 5,
                "from": "c_alice",
                "data": {"text": "hi"},
                "ts": 1700000000456,
            },
        ),
    ],
)
def test_events_have_exactly_their_fields_and_no_id(server_frame: ServerFrame, expected: dict[str, Any]) -> None:
    assert wire(server_frame) == expected


def test_message_embeds_data_bytes_unchanged() -> None:
    data = b'{"z":1,"a":[true,null,"\xc3\xa9"],"m":{"k":2.5}}'
    text = serialize(Message("ABCDEF", 1, "c_alice", data, 0))
    assert data.decode() in text
    assert orjson.loads(text)["data"] == {"z": 1, "a": [True, None, "é"], "m": {"k": 2.5}}
    assert list(orjson.loads(text)["data"]) == ["z", "a", "m"]  # key order kept


@pytest.mark.parametrize("data", [b"null", b"0", b'""', b"[]", b"{}", b"-1.5", b"true"])
def test_message_embeds_scalar_data(data: bytes) -> None:
    assert wire(Message("ABCDEF", 1, "c", data, 0))["data"] == orjson.loads(data)


def test_clients_keep_their_order() -> None:
    assert wire(SessionPaired("ABCDEF", (BOB, ALICE)))["clients"] == CLIENTS_WIRE[::-1]


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_code_is_its_wire_string(code: ErrorCode) -> None:
    assert wire(Error(None, code, "m")) == {"type": "error", "code": code.value, "message": "m"}


@pytest.mark.parametrize("retry_after", [0.0, 0.5, 1.0, 30.0])
def test_error_has_retry_after_only_when_set(retry_after: float) -> None:
    body = wire(Error("q", ErrorCode.RATE_LIMITED, "slow down", retry_after))
    assert body == {
        "type": "error",
        "id": "q",
        "code": "rate_limited",
        "message": "slow down",
        "retry_after": retry_after,
    }
    assert "retry_after" not in wire(Error("q", ErrorCode.RATE_LIMITED, "slow down"))


def test_error_codes_match_protocol() -> None:
    assert {code.value for code in ErrorCode} == {
        "bad_request",
        "unknown_type",
        "not_found",
        "session_full",
        "already_in_session",
        "not_in_session",
        "unauthorized",
        "rate_limited",
        "unavailable",
        "internal",
    }


def test_close_codes_match_protocol() -> None:
    assert {code.value for code in CloseCode} == {1000, 1003, 1008, 1009, 1011, 1012, 1013}


def test_serialize_is_compact_text() -> None:
    assert serialize(Pong(1, 2)) == '{"type":"pong","ts":2,"id":1}'


# --- error_frame ------------------------------------------------------------


def test_error_frame_prefers_the_errors_request_id() -> None:
    err = ClientError("bad", ErrorCode.BAD_REQUEST, request_id="from-err")
    assert error_frame(err, "passed") == Error("from-err", ErrorCode.BAD_REQUEST, "bad", None)


def test_error_frame_prefers_a_falsy_errors_request_id() -> None:
    err = ClientError("bad", ErrorCode.BAD_REQUEST, request_id=0)
    assert error_frame(err, "passed").id == 0


def test_error_frame_falls_back_to_the_passed_id() -> None:
    err = ClientError("nope", ErrorCode.NOT_FOUND)
    assert error_frame(err, 17) == Error(17, ErrorCode.NOT_FOUND, "nope", None)


def test_error_frame_without_any_id() -> None:
    err = ClientError("bad", ErrorCode.UNKNOWN_TYPE)
    frame_ = error_frame(err, None)
    assert frame_ == Error(None, ErrorCode.UNKNOWN_TYPE, "bad", None)
    assert wire(frame_) == {"type": "error", "code": "unknown_type", "message": "bad"}


def test_error_frame_carries_retry_after_of_server_errors() -> None:
    err = ServerError("store down", ErrorCode.UNAVAILABLE, retry_after=2.5)
    frame_ = error_frame(err, "u")
    assert frame_ == Error("u", ErrorCode.UNAVAILABLE, "store down", 2.5)
    assert wire(frame_) == {
        "type": "error",
        "id": "u",
        "code": "unavailable",
        "message": "store down",
        "retry_after": 2.5,
    }


def test_error_frame_of_a_parse_error_echoes_the_frame_id() -> None:
    err = client_error(frame(type="session:join", id="j1", code="bad"))
    assert wire(error_frame(err, None)) == {"type": "error", "id": "j1", "code": "bad_request", "message": err.message}


# --- properties ---------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Three valid values in four, else anything: enough valid frames to reach every parser."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else junk)


valid_ids = st.text(min_size=1, max_size=MAX_ID_CHARS) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
id_values = mostly(
    valid_ids,
    st.text(max_size=70)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), max_size=2),
)
frame_fields = st.fixed_dictionaries(
    {
        "type": mostly(st.sampled_from(TYPE_NAMES), st.sampled_from(["", "PING", "pong"]) | st.text(max_size=20)),
        "id": id_values,
        "code": mostly(
            st.text(alphabet=CODE_ALPHABET + CODE_ALPHABET.lower(), min_size=MIN_CODE_CHARS, max_size=MAX_CODE_CHARS),
            st.text(alphabet=CODE_ALPHABET + "ILOUilou-", min_size=4, max_size=14) | json_values,
        ),
        "client_id": mostly(st.text(min_size=1, max_size=MAX_CLIENT_ID_CHARS), st.text(max_size=70) | json_scalars),
        "token": mostly(st.text(min_size=1, max_size=MAX_TOKEN_CHARS), st.text(max_size=130) | json_scalars),
        "last_seq": mostly(
            st.integers(min_value=0, max_value=MAX_SEQ),
            st.integers(min_value=-5, max_value=2**64 - 1) | st.sampled_from([-1, MAX_SEQ + 1]) | json_values,
        ),
        "data": json_values,
    }
)


@st.composite
def json_frames(draw: st.DrawFn) -> str:
    """A JSON object with some of the request fields, valid or not, and extra keys."""
    fields = draw(frame_fields)
    for key in draw(st.sets(st.sampled_from(sorted(fields)), max_size=3)):
        del fields[key]
    extra = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3))
    return orjson.dumps({**extra, **fields}).decode()


any_text = mostly(json_frames(), st.text() | st.text(st.characters() | st.characters(categories=["Cs"])))
limits = mostly(st.just(DEFAULT_MAX_MESSAGE_BYTES), st.integers(min_value=0, max_value=1000))


def is_valid_id(value: object) -> bool:
    if isinstance(value, str):
        return 1 <= len(value) <= MAX_ID_CHARS
    return isinstance(value, int) and not isinstance(value, bool)


@FAST
@given(any_text, limits)
def test_parse_request_raises_only_its_documented_errors(text: str, max_bytes: int) -> None:
    try:
        result = parse_request(text, max_bytes)
    except FrameRejected as err:
        assert err.close_code == CloseCode.MESSAGE_TOO_BIG
        assert utf8_length(text) > max_bytes
        return
    except ClientError as err:
        assert err.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE)
        assert err.request_id is None or is_valid_id(err.request_id)
        assert err.retry_after is None
        if err.code == ErrorCode.UNKNOWN_TYPE:
            obj = orjson.loads(text)
            assert isinstance(obj["type"], str) and obj["type"] not in TYPE_NAMES
        # Whatever it is, it maps to a frame that serialises.
        assert wire(error_frame(err, None))["type"] == "error"
        return
    assert isinstance(result, REQUEST_TYPES)
    assert utf8_length(text) <= max_bytes
    obj = orjson.loads(text)
    assert TYPE_NAMES[REQUEST_TYPES.index(type(result))] == obj["type"]
    assert result.id == obj.get("id")
    if isinstance(result, SendMessage):
        assert result.data == orjson.dumps(obj["data"])


@FAST
@given(json_values, id_values.filter(is_valid_id))
def test_any_json_data_round_trips_through_the_relay(data: Any, request_id: RequestId) -> None:
    request = parse_request(frame(type="message:send", id=request_id, data=data))
    assert isinstance(request, SendMessage)
    assert request.id == request_id
    assert request.data == orjson.dumps(data)
    relayed = wire(Message("ABCDEF", 1, "c_alice", request.data, 0))
    assert relayed["data"] == data
    assert relayed["from"] == "c_alice"


@FAST
@given(st.one_of(*(st.just(name) for name in TYPE_NAMES)), id_values)
def test_id_is_echoed_only_when_valid(kind: str, request_id: object) -> None:
    text = frame(type=kind, id=request_id)
    if not is_valid_id(request_id):
        err = client_error(text)
        assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, None)
        return
    try:
        result = parse_request(text)
    except ClientError as err:  # a request with required fields, all missing
        assert err.code == ErrorCode.BAD_REQUEST
        assert err.request_id == request_id
    else:
        assert result.id == request_id
