"""Logs, probes and metrics of a real server, and the logging pipeline in-process.

Clients connect from a loopback address of their own, and all log output is
scanned for it, tokens, session codes and bodies. Probes are driven for real:
SQLite locked by another connection, SIGTERM, SIGSTOP. Rotation runs on a
clock the test drives.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from helpers import CODE_HASH, Client, Server, ServerFactory, connect, http_get, wait_exit
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, wrap_client_stream

import config as config_module
import logging_setup
import redaction
from metrics import CLOSE_CODES, OTHER, RATE_LIMITS, SESSION_EVENTS, SESSION_STATES, STORE_OPS
from protocol import ErrorCode

ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
IP_HASH = re.compile(r"ip-[0-9a-f]{16}")
HASH_KEY = "observability-key-0123456789"
QUIET = {"RATE_LIMIT_ENABLED": "0"}


# --- helpers --------------------------------------------------------------------


async def get(server: Server, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET `path` of the server in a thread: (status, headers, body)."""
    return await trio.to_thread.run_sync(http_get, server.http + path, {"Accept": accept} if accept else None)


async def probe(server: Server, path: str) -> tuple[int, dict[str, Any]]:
    status, headers, body = await get(server, path)
    assert headers["content-type"] == "application/health+json", headers
    parsed = orjson.loads(body)
    assert isinstance(parsed, dict)
    return status, parsed


def random_loopback() -> str:
    return f"127.{random.randint(2, 254)}.{random.randint(2, 254)}.{random.randint(2, 254)}"


@asynccontextmanager
async def connect_from(server: Server, source_ip: str) -> AsyncIterator[Client]:
    """A WebSocket client whose socket is bound to `source_ip` (any 127.x.y.z reaches the server)."""
    sock = trio.socket.socket()
    await sock.bind((source_ip, 0))
    await sock.connect(("127.0.0.1", server.port))
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, trio.SocketStream(sock), "127.0.0.1", "/ws")
        try:
            yield Client(ws)
        finally:
            await ws.aclose()


def parse_log(output: str) -> list[dict[str, Any]]:
    """Every line of `output`, each of which must be one JSON object in the log's format."""
    lines = []
    for raw in output.splitlines():
        line = orjson.loads(raw)  # every line is one JSON object
        assert isinstance(line, dict), raw
        assert list(line)[:4] == ["timestamp", "level", "event", "logger"], raw
        assert ISO_MS.fullmatch(line["timestamp"]), raw
        lines.append(line)
    return lines


def events(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == name]


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


async def eventually_status(server: Server, path: str, status: int, seconds: float) -> None:
    """Probe `path` until it answers `status`; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (await get(server, path))[0] == status:
            return
        await trio.sleep(0.2)
    raise AssertionError(f"{path} did not answer {status} within {seconds} s")


# --- logs of a real server --------------------------------------------------------


async def test_scripted_session_logs_events_never_tokens_addresses_or_bodies(
    tandem_factory: ServerFactory, tmp_path: Path
) -> None:
    log_file = tmp_path / "logs" / "tandem.log"
    server = tandem_factory(LOG_LEVEL="DEBUG", LOG_FILE=str(log_file), HASH_KEY=HASH_KEY, **QUIET)
    ip = random_loopback()
    bodies = [f"body-{i}-{random.getrandbits(48):x}" for i in range(30)]
    email = "alice.smith@example.com"
    async with connect_from(server, ip) as a:
        created = await a.create()
        async with connect_from(server, ip) as b:
            joined = await b.join(created["code"])
            await b.expect("session:paired")
            await a.expect("session:paired")
            for body in bodies:
                await a.message({"text": body, "contact": email, "note": "line\nbreak"})
                assert (await b.expect("message"))["data"]["text"] == body
            # A resume on a new socket moves A there: its first socket is closed with 1000.
            async with connect_from(server, ip) as a2:
                resume = {"code": created["code"], "client_id": created["client_id"], "last_seq": 0}
                reply = await a2.request("session:resume", token=created["token"], **resume)
                assert reply["type"] == "session:resumed", reply
                await b.expect("session:presence")
                await a2.request("session:leave")
                await b.expect("session:peer_left")
            await b.request("session:leave")
    status, _, _ = await get(server, f"/u/{email}/%0Afake%20line?token={created['token']}")
    assert status == 404
    assert await trio.to_thread.run_sync(server.terminate) == 0

    output = server.output()
    lines = parse_log(output)
    for secret in (created["token"], joined["token"], created["code"], ip, email, *bodies):
        assert secret not in output, f"{secret!r} is in the log"
    assert "\nfake line" not in output and '"fake line' not in output

    opened, closed = events(lines, "connection.open"), events(lines, "connection.close")
    assert len(opened) == len(closed) == 3
    assert {line["conn"] for line in opened} == {line["conn"] for line in closed}
    hashes = {line["ip"] for line in opened}
    assert len(hashes) == 1 and IP_HASH.fullmatch(hashes.pop())  # one address, one keyed hash
    for line in closed:
        assert {"code", "duration_s", "messages_in", "messages_out"} <= line.keys(), line
    assert sorted(line["messages_in"] for line in closed) == [0, 0, len(bodies)]
    hashed = redaction.Redactor("hash", HASH_KEY.encode()).code(created["code"])  # keyed with HASH_KEY
    for name in ("session.created", "session.paired", "session.ended"):
        (line,) = events(lines, name)
        assert line["session"] == hashed, line

    # Events, not traffic: at INFO and above no line per message.
    loud = [line for line in lines if line["level"] != "debug"]
    assert len(loud) < len(bodies), [line["event"] for line in loud]
    # Hypercorn's access log is structured and redacted like everything else.
    (page,) = [line for line in events(lines, "http.request") if line["status"] == 404]
    assert page["logger"] == "hypercorn.access" and page["level"] == "info"
    assert page["path"] == "/u/a***@example.com/\nfake line" and IP_HASH.fullmatch(page["ip"])
    # LOG_FILE holds the same lines as stdout.
    assert log_file.read_text() == output


async def test_rate_limit_refusals_are_counted_each_and_logged_once_with_context(
    tandem_factory: ServerFactory,
) -> None:
    server = tandem_factory(RATE_LIMIT_ENABLED="1", RATE_LIMIT_MESSAGES_USER="3/60")
    async with connect(server) as a:
        created = await a.create()
        refused = 0
        for i in range(12):
            reply = await a.request("message:send", data={"i": i})
            if reply["type"] == "error":
                assert reply["code"] == "rate_limited", reply
                refused += 1
        assert refused == 9
        _, _, text = await get(server, "/metrics")
        values = metrics(text.decode())
        assert sample(values, "tandem_rate_limited_total", limit="messages_user") == refused
        assert sample(values, "tandem_errors_total", code="rate_limited") == refused
    assert await trio.to_thread.run_sync(server.terminate) == 0
    (line,) = events(parse_log(server.output()), "rate_limit.refused")
    assert line["limit"] == "messages_user" and line["level"] == "warning"
    # Bound from the connection's context (the code hashed), not passed by the code that logged.
    assert CODE_HASH.fullmatch(line["session"]) and line["conn"]
    assert created["code"] not in server.output()


# --- probes ---------------------------------------------------------------------


async def test_ready_fails_naming_the_store_while_its_file_is_locked_and_live_stays_up(
    tandem_factory: ServerFactory,
) -> None:
    server = tandem_factory(READY_TIMEOUT="0.3", **QUIET)
    assert await probe(server, "/health/live") == (200, {"status": "pass"})
    status, body = await probe(server, "/health/ready")
    assert status == 200 and body["status"] == "pass", body
    (store,) = body["checks"]["store:responseTime"]
    assert store["status"] == "pass" and store["componentType"] == "datastore" and store["componentId"] == "sqlite"
    assert isinstance(store["observedValue"], float) and store["observedUnit"] == "ms"
    # Cached: a second probe within the second gets the same report.
    assert (await probe(server, "/health/ready"))[1] == body

    # Another process takes SQLite's write lock, as a backup tool or a stray shell would.
    locker = sqlite3.connect(server.data_dir / "tandem.sqlite3", timeout=5, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        await trio.sleep(1.05)  # past the cache
        status, body = await probe(server, "/health/ready")
        assert status == 503 and body["status"] == "fail", body
        (store,) = body["checks"]["store:responseTime"]
        assert store["status"] == "fail" and "READY_TIMEOUT" in store["output"], store
        assert "store" in body["output"]
        assert await probe(server, "/health/live") == (200, {"status": "pass"})
    finally:
        locker.rollback()
        locker.close()
    await eventually_status(server, "/health/ready", 200, 5)
    assert await trio.to_thread.run_sync(server.terminate) == 0
    changes = [(line["status"], line["failing"]) for line in events(parse_log(server.output()), "ready.changed")]
    assert changes == [("fail", ["store"]), ("pass", [])]


async def test_sigterm_fails_readiness_first_then_drains_after_the_pre_drain_delay(
    tandem_factory: ServerFactory,
) -> None:
    server = tandem_factory(PRE_DRAIN_DELAY="1.5", SHUTDOWN_GRACE="6", **QUIET)
    async with connect(server) as a, connect(server) as b:
        created = await a.create()
        await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        await trio.sleep(0.2)
        status, body = await probe(server, "/health/ready")
        assert status == 503 and body["status"] == "fail" and body["output"] == "draining", body
        assert body["checks"]["server:draining"][0]["status"] == "fail"
        assert await probe(server, "/health/live") == (200, {"status": "pass"})
        # Until the delay is over, the relay still works for sockets already open.
        await a.message("still relayed")
        assert (await b.expect("message"))["data"] == "still relayed"
        with pytest.raises(ConnectionClosed) as closed:
            await b.recv()
        assert closed.value.reason is not None and closed.value.reason.code == 1012
        assert time.monotonic() - signalled >= 1.4
    assert await wait_exit(server, 6) == 0


async def test_live_fails_after_the_event_loop_was_stuck_and_recovers(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(LIVENESS_MAX_LAG="0.5", **QUIET)
    assert await probe(server, "/health/live") == (200, {"status": "pass"})
    answer: list[tuple[int, dict[str, Any]]] = []

    async def ask() -> None:
        answer.append(await probe(server, "/health/live"))

    server.signal(signal.SIGSTOP)  # the whole process, event loop included, stops
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)  # waits in the listen backlog
            await trio.sleep(1.5)
            server.signal(signal.SIGCONT)
    finally:
        server.signal(signal.SIGCONT)
    ((status, body),) = answer
    assert status == 503 and body["status"] == "fail", body
    (lag,) = body["checks"]["eventLoop:lag"]
    assert lag["observedValue"] >= 1.0 and lag["observedUnit"] == "s", lag
    await eventually_status(server, "/health/live", 200, 8)  # the worst lag is remembered for 5 s
    assert await trio.to_thread.run_sync(server.terminate) == 0
    assert events(parse_log(server.output()), "event_loop.stalled")


# --- metrics ----------------------------------------------------------------------


async def test_metrics_after_a_scripted_session(tandem_factory: ServerFactory) -> None:
    server = tandem_factory(**QUIET)
    async with connect(server) as a, connect(server) as b, connect(server) as c:
        created = await a.create()
        await b.join(created["code"])
        await b.expect("session:paired")
        await a.expect("session:paired")
        for i in range(5):
            await a.message({"i": i})
            await b.expect("message")
        assert (await c.request("session:join", code="ZZZZZZZZ"))["code"] == "not_found"
        assert (await c.request("session:join"))["code"] == "bad_request"
        _, headers, text = await get(server, "/metrics")
        assert headers["content-type"].startswith("text/plain"), headers
        values = metrics(text.decode())
        assert sample(values, "tandem_connections") == 3
        assert sample(values, "tandem_sessions", state="paired") == 1
        assert sample(values, "tandem_sessions", state="waiting") == 0

        status, headers, body = await get(server, "/metrics", accept="application/json")
        assert status == 200 and headers["content-type"] == "application/json"
        summary = orjson.loads(body)
        assert set(summary) == {"uptime", "memory", "cpu", "connections", "sessions", "messages"}
        assert summary["connections"]["open"] == 3 and summary["messages"]["total"] == 5
        assert summary["sessions"] == {"waiting": 0, "paired": 1}
        assert summary["memory"]["rss_bytes"] > 1_000_000 and summary["uptime"] > 0

        await a.request("session:leave")
        await b.expect("session:peer_left")
        await b.request("session:leave")
    assert (await probe(server, "/health/ready"))[0] == 200
    for _ in range(100):  # the server sees the sockets close
        values = metrics((await get(server, "/metrics"))[2].decode())
        if not sample(values, "tandem_connections"):
            break
        await trio.sleep(0.05)

    assert sample(values, "tandem_messages_total") == 5
    assert sample(values, "tandem_message_handling_seconds_count") == 5
    assert 0 < sample(values, "tandem_message_handling_seconds_sum") < 5
    assert sample(values, "tandem_connections_opened_total") == 3
    assert sum(sample(values, "tandem_connections_closed_total", code=code) for code in CLOSE_CODES) == 3
    assert sample(values, "tandem_errors_total", code="not_found") == 1
    assert sample(values, "tandem_errors_total", code="bad_request") == 1
    for event in ("created", "paired", "ended"):
        assert sample(values, "tandem_session_events_total", event=event) == 1, event
    assert sample(values, "tandem_store_operation_seconds_count", backend="sqlite", op="create") == 1
    assert sample(values, "tandem_store_operation_seconds_count", backend="sqlite", op="join") == 2
    assert sample(values, "tandem_store_errors_total", backend="sqlite", op="append") == 0
    assert sample(values, "tandem_event_loop_lag_seconds") < 1
    assert sample(values, "tandem_ready") == 1
    assert sample(values, "process_resident_memory_bytes") > 0
    assert sample(values, "process_cpu_seconds_total") > 0

    # No label takes a value from a client: every one is from a fixed set.
    allowed: dict[str, set[str] | None] = {
        "code": {*CLOSE_CODES, *(str(c) for c in ErrorCode), OTHER},
        "state": set(SESSION_STATES),
        "event": set(SESSION_EVENTS),
        "limit": {*RATE_LIMITS, OTHER},
        "backend": {"sqlite", "redis"},
        "op": set(STORE_OPS),
        "le": None,
    }
    for name, labels in values:
        if name.startswith("tandem_"):
            for key, value in labels:
                assert key in allowed, (name, key)
                values_allowed = allowed[key]
                assert values_allowed is None or value in values_allowed, (name, key, value)
    assert await trio.to_thread.run_sync(server.terminate) == 0


# --- the pipeline in-process -------------------------------------------------------


def pipeline_output(fmt: str, *records: tuple[str, str, dict[str, object]], **settings: Any) -> str:
    """Log `records` (logger, event, fields) through a Pipeline writing to a string."""
    config = dataclasses.replace(config_module.DEFAULTS, log_format=fmt, log_level="DEBUG", **settings)
    stream = io.StringIO()
    pipeline = logging_setup.Pipeline(config, stream).start()
    try:
        for name, event, fields in records:
            logger = logging.getLogger(f"test.observability.{name}")
            logger.propagate = False
            logger.handlers[:] = [pipeline.handler]
            logger.setLevel(logging.DEBUG)
            if event == "boom":
                try:
                    raise ValueError("from 10.1.2.3\nForged line")
                except ValueError:
                    logger.exception(event, extra={"fields": fields})
            else:
                logger.info(event, extra={"fields": fields})
    finally:
        pipeline.stop()
    return stream.getvalue()


HOSTILE: dict[str, object] = {
    "note": "one\ntwo\r\nthree\u2028four\u2029five\x85six\x1b[31mred",
    "url": "postgresql://tandem:hunter2@db:5432/tandem",
    "header": "Bearer abc.def.ghi-jkl",
    "query": "/ws?token=s3cret&x=1",
    "contact": "Bob.Jones+x@mail.example.org",
    "ips": ["192.0.2.45", "[2001:db8::7]:443", "seen from 198.51.100.7:5555."],
    "token": "anything at all",
    "data": {"text": "a message body"},
    "blob": b"raw message bytes",
    "free": "key " + "Ab1-" * 11,
}
LEAKS = ("hunter2", "abc.def", "s3cret", "Bob.Jones", "192.0.2.45", "2001:db8::7", "198.51.100.7", "anything at all")


def test_json_lines_are_redacted_and_never_split() -> None:
    text = pipeline_output("json", ("a", "custom.event", HOSTILE), ("b", "boom", {}))
    assert text.count("\n") == 2 and text.endswith("\n")
    for leak in (*LEAKS, "a message body", "raw message bytes", "Ab1-Ab1-", "10.1.2.3"):
        assert leak not in text, leak
    first, second = (orjson.loads(line) for line in text.splitlines())
    assert first["note"] == "one\ntwo\r\nthree\u2028four\u2029five\x85six\x1b[31mred"  # kept, escaped
    assert first["url"] == "postgresql://tandem:***@db:5432/tandem"
    assert first["contact"] == "B***@mail.example.org"
    assert first["token"] == first["data"] == "[redacted]" and first["blob"] == "[17 bytes]"
    assert IP_HASH.fullmatch(first["ips"][0]) and first["ips"][1].startswith("[ip-")
    assert second["event"] == "boom" and "ValueError" in second["exception"] and "Forged" in second["exception"]


def test_truncate_mode_keeps_the_network_only() -> None:
    fields: dict[str, object] = {"ip": "203.0.113.77", "peer": "2001:db8:1:2::9"}
    text = pipeline_output("json", ("a", "x", fields), log_ip_mode="truncate")
    line = orjson.loads(text)
    assert line["ip"] == "203.0.113.0/24" and line["peer"] == "2001:db8:1::/48"


def test_the_ip_hash_is_keyed() -> None:
    def hashed(key: str) -> str:
        return str(orjson.loads(pipeline_output("json", ("a", "x", {"ip": "203.0.113.77"}), hash_key=key))["ip"])

    assert hashed("k" * 16) == hashed("k" * 16) != hashed("j" * 16)


def test_console_lines_are_coloured_and_never_split() -> None:
    text = pipeline_output("console", ("a", "custom.event", HOSTILE), ("b", "boom", {}))
    rows = text.splitlines()
    assert rows[0].count("\x1b[") >= 4  # coloured: time, level, event, keys
    plain = re.sub("\x1b\\[[0-9;]*m", "", rows[0])
    assert " INFO     custom.event note=" in plain and "\\u2028" in plain and "\\u001b[31mred" in plain
    for leak in LEAKS:
        assert leak not in text, leak
    # A traceback takes several lines, each marked as a continuation of the line before.
    assert "boom" in rows[1] and rows[2:] and all(row.startswith("    | ") for row in rows[2:])
    assert "ValueError: from ip-" in text and not any(row.startswith("Forged") for row in rows)


def test_console_is_chosen_on_a_terminal_and_json_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    config = dataclasses.replace(config_module.DEFAULTS, log_format="auto")
    for stream, console in ((Terminal(), True), (io.StringIO(), False)):
        pipeline = logging_setup.Pipeline(config, stream).start()
        logger = logging.getLogger("test.observability.auto")
        logger.propagate = False
        logger.handlers[:] = [pipeline.handler]
        logger.warning("auto.event")
        pipeline.stop()
        assert stream.getvalue().startswith("{") is not console, stream.getvalue()


def test_hypercorn_records_go_through_the_same_pipeline() -> None:
    config = dataclasses.replace(config_module.DEFAULTS, log_format="json", log_level="INFO")
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    pipeline = logging_setup.setup(config, stream)
    try:
        logging.getLogger("hypercorn.error").error("Error in ASGI Framework from %s", "198.51.100.9")
        logging.getLogger("hypercorn.error").info("Running on http://127.0.0.1:1 (CTRL + C to quit)")
    finally:
        pipeline.stop()
        root.handlers[:], level = saved
        root.setLevel(level)
    (line,) = (orjson.loads(raw) for raw in stream.getvalue().splitlines())
    assert line["logger"] == "hypercorn.error" and line["level"] == "error"
    assert line["event"].startswith("Error in ASGI Framework from ip-")


def test_throttle_logs_once_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.observability.throttle")
    logger.propagate = False
    logger.handlers[:] = [Keep()]
    throttle = logging_setup.Throttle(logger, interval=10, clock=lambda: now[0])
    assert throttle.log(logging.WARNING, "store.error", "k", {}) is True
    for _ in range(5):
        now[0] += 1
        assert throttle.log(logging.WARNING, "store.error", "k", {}) is False
    assert throttle.log(logging.WARNING, "store.error", "other", {}) is True
    now[0] += 10
    assert throttle.log(logging.WARNING, "store.error", "k", {}) is True
    assert [r.__dict__["fields"]["suppressed"] for r in records] == [0, 0, 5]


# --- rotation -------------------------------------------------------------------------


def test_log_file_rotates_at_utc_midnight_and_keeps_retention_days(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "tandem.log"
    start = datetime(2030, 1, 1, 23, 59, 59, tzinfo=UTC)
    now = [start.timestamp()]
    handler = logging_setup.DailyFileHandler(path, retention=3, clock=lambda: now[0])
    handler.setFormatter(logging.Formatter("%(message)s"))

    def write(message: str) -> None:
        handler.emit(logging.makeLogRecord({"msg": message, "levelno": logging.INFO}))

    try:
        write("day 1")
        now[0] += 0.5
        write("day 1 still")  # 23:59:59.5 UTC
        now[0] += 1.0
        write("day 2")  # 00:00:00.5 UTC: the first line of the day rotates
        assert (tmp_path / "logs" / "tandem.log.2030-01-01").read_text() == "day 1\nday 1 still\n"
        assert path.read_text() == "day 2\n"
        for day in range(3, 8):
            now[0] = (datetime(2030, 1, day, 0, 0, 5, tzinfo=UTC)).timestamp()
            write(f"day {day}")
    finally:
        handler.close()
    rotated = sorted(p.name for p in path.parent.iterdir() if p != path)
    assert rotated == ["tandem.log.2030-01-04", "tandem.log.2030-01-05", "tandem.log.2030-01-06"]
    assert path.read_text() == "day 7\n"
    assert (path.parent / "tandem.log.2030-01-06").read_text() == "day 6\n"


def test_a_file_left_from_an_earlier_day_is_rotated_on_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "tandem.log"
    path.write_text("old\n")
    yesterday = datetime(2030, 5, 1, 12, tzinfo=UTC).timestamp()
    os.utime(path, (yesterday, yesterday))
    handler = logging_setup.DailyFileHandler(path, retention=7, clock=lambda: yesterday + 86400)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.emit(logging.makeLogRecord({"msg": "new", "levelno": logging.INFO}))
    finally:
        handler.close()
    assert (tmp_path / "tandem.log.2030-05-01").read_text() == "old\n"
    assert path.read_text() == "new\n"


# --- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_RETENTION_DAYS": "0"}, "LOG_RETENTION_DAYS"),
        ({"LOG_IP_MODE": "raw"}, "LOG_IP_MODE"),
        ({"HASH_KEY": "short"}, "HASH_KEY"),
        ({"LIVENESS_MAX_LAG": "0"}, "LIVENESS_MAX_LAG"),
        ({"READY_TIMEOUT": "nan"}, "READY_TIMEOUT"),
        ({"PRE_DRAIN_DELAY": "6", "SHUTDOWN_GRACE": "10"}, "PRE_DRAIN_DELAY"),
        ({"LOG_FILE": "/"}, "LOG_FILE"),
    ],
)
def test_bad_observability_settings_are_refused_in_one_line(settings: dict[str, str], name: str) -> None:
    with pytest.raises(config_module.ConfigError) as error:
        config_module.load(settings, dotenv=None)
    assert error.value.name == name and "\n" not in str(error.value)


def test_observability_settings_parse() -> None:
    config = config_module.load(
        {
            "LOG_FORMAT": "Console",
            "LOG_FILE": "logs/tandem.log",
            "LOG_RETENTION_DAYS": "14",
            "LOG_IP_MODE": "truncate",
            "HASH_KEY": "0123456789abcdef",
            "LIVENESS_MAX_LAG": "2.5",
            "READY_TIMEOUT": "0.5",
            "PRE_DRAIN_DELAY": "5",
            "SHUTDOWN_GRACE": "30",
        },
        dotenv=None,
    )
    assert (config.log_format, config.log_file, config.log_retention_days) == ("console", Path("logs/tandem.log"), 14)
    assert (config.log_ip_mode, config.liveness_max_lag, config.ready_timeout) == ("truncate", 2.5, 0.5)
    assert config.pre_drain_delay == 5 and "0123456789abcdef" not in repr(config)
