"""OpenTelemetry tracing (tracing.py): off unless asked for, and then a trace per request.

In-process, the spans go to the SDK's InMemorySpanExporter: relay `Connection`s on fake
sockets over the real SqliteStore (test_relay_inprocess.py's), GroupCommit on its own, a
RedisStore on the shared Redis, and the listener fed published events by hand. Across two
real `python server.py` instances on Redis, each exports over OTLP/HTTP to a small collector
this module runs on loopback (its protobuf read with opentelemetry-proto): the send's span
on one and the delivery's on the other must share a trace.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import redis
import trio
from helpers import ROOT, SHARED_REDIS_URL, ServerFactory, base_env, check_redis, connect, eventually, log_lines
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode
from test_relay_inprocess import GUEST_IP, HOST_IP, UNKNOWN_CODE, open_sqlite_relay, pair
from trio.testing import wait_all_tasks_blocked

import logging_setup
import tracing
from config import ConfigError
from limiter import LimitKey, Rule
from protocol import ErrorCode, ServerError
from redis_listener import Listener
from redis_scripts import channel, parse_event, stored_message
from redis_store import RedisStore
from session_store import Event, GroupCommit, MessageStored, Op, StoredMessage

# A whole in-process test on worker threads (SQLite, Redis), real seconds.
TIMEOUT = 15.0
BODY = "the body of a message 7f3a"  # must appear in no span


# --- in-memory spans ------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every span finished into the returned exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.tracer = tracing.Tracer(provider)
    try:
        yield exporter
    finally:
        tracing.tracer = None
        provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = named(exporter, name)
    assert len(found) == 1, (name, [s.name for s in exporter.get_finished_spans()])
    return found[0]


def context_of(span: ReadableSpan) -> SpanContext:
    context = span.context
    assert isinstance(context, SpanContext)
    return context


def everything_recorded(span: ReadableSpan) -> str:
    """All the text a span carries to a collector: name, attributes, links', events', status."""
    parts: list[object] = [span.name, span.status.description, *dict(span.attributes or {}).items()]
    parts += [dict(link.attributes or {}) for link in span.links]
    parts += [(event.name, dict(event.attributes or {})) for event in span.events]
    parts.append(dict(span.resource.attributes))
    return repr(parts)


# --- when tracing is on ---------------------------------------------------------------------------


def test_only_the_standard_variables_turn_tracing_on_and_bad_values_stop_the_start() -> None:
    endpoint = "http://127.0.0.1:4318"
    assert tracing.exporters({}) == []
    assert tracing.exporters({"OTEL_SERVICE_NAME": "tandem-eu"}) == []  # names it, turns nothing on
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}) == ["otlp"]
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint + "/v1/traces"}) == ["otlp"]
    assert tracing.exporters({"OTEL_TRACES_EXPORTER": "otlp"}) == ["otlp"]
    assert tracing.exporters({"OTEL_TRACES_EXPORTER": "console, otlp"}) == ["console", "otlp"]
    assert tracing.exporters({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}) == []
    assert tracing.exporters({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) == []
    assert tracing.exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    for env, name in [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ]:
        with pytest.raises(ConfigError, match=f"invalid setting {name}="):
            tracing.exporters(env)


def _opentelemetry_loaded(script: str, env: dict[str, str] | None = None) -> tuple[str, set[str], str]:
    """What a fresh process running `script` under `env` (no other OTEL_* variable) prints
    first, and the opentelemetry modules it has loaded by the end."""
    script += "\nimport sys; print(*sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry'))\n"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env = {**clean, **(env or {})}
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    first, _, modules = result.stdout.partition("\n")
    return first, set(modules.split()), result.stderr


SERVE = (
    "import server, tracing\n"
    "print(tracing.setup() is not None)\n"
    "if tracing.tracer: tracing.tracer.provider.get_tracer('test').start_span('probe').end()\n"
    "tracing.shutdown()"
)


def test_off_by_default_tandem_imports_no_opentelemetry_module() -> None:
    """redis-py 8 loads opentelemetry's metrics API by itself when it is installed (its own
    opt-in metrics, never turned on here): Tandem must load nothing beyond that."""
    _, by_redis, _ = _opentelemetry_loaded("import redis\nprint()")
    on, off, _ = _opentelemetry_loaded(SERVE)
    assert on == "False" and off == by_redis
    assert not {"opentelemetry.sdk.trace", "opentelemetry.trace.propagation.tracecontext"} & off
    on, traced, stderr = _opentelemetry_loaded(SERVE, {"OTEL_TRACES_EXPORTER": "console"})
    assert '"name": "probe"' in stderr  # the console exporter writes there: stdout is the log's (the first line here)
    assert on == "True" and "opentelemetry.sdk.trace" in traced - by_redis


def test_the_server_refuses_to_start_on_an_otel_value_it_cannot_serve(tmp_path: Path) -> None:
    clean = {k: v for k, v in base_env().items() if not k.startswith("OTEL_")}
    env = {**clean, "OTEL_TRACES_EXPORTER": "zipkin", "DATA_DIR": str(tmp_path), "PORT": "0"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tandem: invalid setting OTEL_TRACES_EXPORTER='zipkin': expected otlp, console, both (comma-separated) or none"
    ]


@dataclass
class SpanCount:
    made: int = 0


@pytest.fixture
def span_objects(monkeypatch: pytest.MonkeyPatch) -> SpanCount:
    """Counts every span object made in this process (the SDK's, and non-recording ones)."""
    count = SpanCount()
    for cls in (SdkSpan, NonRecordingSpan):
        original = cls.__init__

        def counting(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            count.made += 1
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    return count


async def exchange(data_dir: Path) -> None:
    """Create, join, a message each way, an error, leave: over the real SqliteStore."""
    with trio.fail_after(TIMEOUT):
        async with open_sqlite_relay(data_dir) as relay:
            a, b = await pair(relay)
            assert (await a.request("message:send", data=BODY))["seq"] == 1
            assert (await b.recv())["data"] == BODY
            assert (await b.request("message:send", data="back"))["seq"] == 2
            assert (await a.recv())["data"] == "back"
            stranger = await relay.connect(HOST_IP)
            assert (await stranger.error("message:send", data=BODY))["code"] == "not_in_session"
            assert (await b.request("session:leave"))["type"] == "session:left"


async def test_with_tracing_off_no_span_object_is_made(tmp_path: Path, span_objects: SpanCount) -> None:
    assert tracing.tracer is None
    await exchange(tmp_path / "off")
    assert span_objects.made == 0
    provider = TracerProvider()  # the same exchange traced makes spans: the count sees them
    tracing.tracer = tracing.Tracer(provider)
    try:
        await exchange(tmp_path / "on")
    finally:
        tracing.tracer = None
        provider.shutdown()
    assert span_objects.made > 10


# --- spans of requests, batches and deliveries in one process --------------------------------------


async def test_a_request_span_has_its_type_result_and_hashed_session_and_nothing_secret(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_sqlite_relay(tmp_path) as relay:
            a, b = await pair(relay)
            assert (await a.request("message:send", data={"text": BODY}))["seq"] == 1
            assert (await b.recv())["data"] == {"text": BODY}
            stranger = await relay.connect(GUEST_IP)
            assert (await stranger.error("message:send", data=BODY))["code"] == "not_in_session"
            assert (await stranger.request("ping"))["type"] == "pong"
    code, secrets = a.code, (a.token, b.token, a.code, b.code, BODY, HOST_IP, GUEST_IP)
    session = logging_setup.code_pseudonym(code)
    assert session.startswith("code-") and code not in session

    created = one(spans, "tandem.request session:create")
    assert created.kind == SpanKind.SERVER
    assert dict(created.attributes or {}) == {
        "tandem.request.type": "session:create",
        "tandem.conn": a.conn.id,
        "tandem.result": "ok",
        "tandem.session": session,
    }
    assert one(spans, "tandem.request session:join").attributes == {
        "tandem.request.type": "session:join",
        "tandem.conn": b.conn.id,
        "tandem.result": "ok",
        "tandem.session": session,
    }
    sends = named(spans, "tandem.request message:send")
    sent = next(s for s in sends if (s.attributes or {})["tandem.conn"] == a.conn.id)
    assert dict(sent.attributes or {}) == {
        "tandem.request.type": "message:send",
        "tandem.conn": a.conn.id,
        "tandem.message.bytes": len(orjson.dumps({"text": BODY})),
        "tandem.result": "ok",
        "tandem.session": session,
    }
    refused = next(s for s in sends if (s.attributes or {})["tandem.conn"] == stranger.conn.id)
    assert (refused.attributes or {})["tandem.result"] == "not_in_session"
    assert (refused.attributes or {})["error.type"] == "not_in_session"
    assert "tandem.session" not in (refused.attributes or {})
    assert refused.status.status_code == StatusCode.UNSET  # the client's mistake, not an error of Tandem's
    assert (one(spans, "tandem.request ping").attributes or {})["tandem.result"] == "ok"
    for span in spans.get_finished_spans():
        recorded = everything_recorded(span)
        for secret in secrets:
            assert secret not in recorded, (span.name, secret)


async def test_a_failed_join_is_traced_with_its_error_and_the_guessed_code_hashed(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_sqlite_relay(tmp_path) as relay:
            guesser = await relay.connect(GUEST_IP)
            assert (await guesser.error("session:join", code=UNKNOWN_CODE))["code"] == "not_found"
    (span,) = named(spans, "tandem.request session:join")
    assert dict(span.attributes or {}) == {
        "tandem.request.type": "session:join",
        "tandem.conn": guesser.conn.id,
        "tandem.result": "not_found",
        "error.type": "not_found",
        "tandem.session": logging_setup.code_pseudonym(UNKNOWN_CODE),
    }
    assert UNKNOWN_CODE not in everything_recorded(span)


async def test_a_send_is_the_parent_of_its_store_batch_and_of_its_delivery(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_sqlite_relay(tmp_path) as relay:
            a, b = await pair(relay)
            spans.clear()
            assert (await a.request("message:send", data=BODY))["seq"] == 1
            assert (await b.recv())["data"] == BODY
            send = context_of(one(spans, "tandem.request message:send"))
            batch = one(spans, "tandem.store.batch")
            deliver = one(spans, "tandem.deliver")
    assert batch.parent is not None and batch.parent.span_id == send.span_id
    assert context_of(batch).trace_id == send.trace_id
    assert [link.context for link in batch.links] == [send]
    assert batch.kind == SpanKind.CLIENT
    assert dict(batch.attributes or {}) == {
        "db.system.name": "sqlite",
        "tandem.store.backend": "sqlite",
        "tandem.store.ops": 1,
        "tandem.store.requests": 1,
        "tandem.store.failed": 0,
    }
    assert deliver.parent is not None and deliver.parent.span_id == send.span_id
    assert context_of(deliver).trace_id == send.trace_id and deliver.kind == SpanKind.CONSUMER
    assert dict(deliver.attributes or {}) == {
        "tandem.session": logging_setup.code_pseudonym(a.code),
        "tandem.message.seq": 1,
        "tandem.store.backend": "sqlite",
    }


async def test_one_batch_span_links_every_request_it_carried_and_counts_its_failures(
    spans: InMemorySpanExporter,
) -> None:
    """Calls queued while a batch runs make the next batch; only batches that carry a request
    are traced, and a backend failure marks the span an error."""
    started, release = threading.Event(), threading.Event()

    def execute(batch: list[Op]) -> None:
        if batch[0].payload == "first":
            started.set()
            release.wait(TIMEOUT)
        for op in batch:
            if op.payload == "broken":
                op.error = ServerError("the store is down", ErrorCode.UNAVAILABLE, retry_after=1.0)
            else:
                op.result = op.payload

    assert tracing.tracer is not None
    otel = tracing.tracer.provider.get_tracer("test")
    commit = GroupCommit(execute, lambda event: None, abandon_on_cancel=False, backend="test")
    sent: dict[str, SpanContext] = {}

    async def traced(name: str) -> None:
        with otel.start_as_current_span(f"request {name}") as span:
            sent[name] = span.get_span_context()
            try:
                await commit.call(name)
            except ServerError:
                assert name == "broken"

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit.run)
            nursery.start_soon(commit.call, "first")  # not a request's: its batch has no span
            await trio.to_thread.run_sync(started.wait, TIMEOUT)
            for name in ("a", "b", "broken"):
                nursery.start_soon(traced, name)
            nursery.start_soon(commit.call, "untraced")
            await wait_all_tasks_blocked()  # every call queued behind "first"
            release.set()
            commit.close()  # the writer runs what is queued, then returns
    assert commit.batches == 2
    batch = one(spans, "tandem.store.batch")
    links = [link.context for link in batch.links]
    assert sorted(c.span_id for c in links) == sorted(c.span_id for c in sent.values())
    assert batch.parent is not None and batch.parent.span_id == links[0].span_id
    assert dict(batch.attributes or {}) == {
        "db.system.name": "test",
        "tandem.store.backend": "test",
        "tandem.store.ops": 4,
        "tandem.store.requests": 3,
        "tandem.store.failed": 1,
        "error.type": "unavailable",
    }
    assert batch.status.status_code == StatusCode.ERROR


async def test_a_request_sampled_out_leads_to_no_batch_or_delivery_span_and_no_traceparent(
    tmp_path: Path, span_objects: SpanCount
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.tracer = tracer = tracing.Tracer(provider)
    try:
        await exchange(tmp_path)
        with provider.get_tracer("test").start_as_current_span("sampled out"):
            op = Op("payload")
            tracer.queued(op)
            assert tracer.traceparent() == "" and not hasattr(op, "trace")
    finally:
        tracing.tracer = None
        provider.shutdown()
    assert exporter.get_finished_spans() == ()
    assert span_objects.made == 6 + 1  # a non-recording span per request of `exchange`, and the one above


# --- Redis: the traceparent published with a message -------------------------------------------------


def fake_listener(dispatched: list[Event]) -> Listener:
    """A listener that never connects: fed published events by hand."""

    async def replay(code: str) -> None:
        return None

    listener = Listener(SimpleNamespace(cluster=False), dispatched.append, replay)  # type: ignore[arg-type]
    return listener


def published(code: str, *fields: bytes) -> list[dict[str, Any]]:
    return [{"type": b"smessage", "channel": channel(code).encode(), "data": f} for f in fields]


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ENTRY = b"3|1700000000000|alice|2|m1|" + orjson.dumps(BODY)


def test_an_instance_not_tracing_skips_the_trace_event_and_delivers_the_message_as_before() -> None:
    assert parse_event("ABCDEFGH", b"tp|3|" + TRACEPARENT.encode()) is None  # as an older instance parses it
    dispatched: list[Event] = []
    listener = fake_listener(dispatched)
    listener._confirmed.add(channel("ABCDEFGH"))
    listener._deliver(published("ABCDEFGH", b"tp|3|" + TRACEPARENT.encode(), b"m|" + ENTRY))
    assert dispatched == [MessageStored("ABCDEFGH", StoredMessage(3, "alice", orjson.dumps(BODY), 1700000000000, "m1"))]
    assert listener.traces == {}


def test_a_tracing_instance_delivers_a_published_message_as_a_child_of_its_send(
    spans: InMemorySpanExporter,
) -> None:
    dispatched: list[Event] = []
    listener = fake_listener(dispatched)
    listener._confirmed.add(channel("ABCDEFGH"))
    listener._deliver(published("ABCDEFGH", b"tp|3|" + TRACEPARENT.encode()))  # a batch may end between them
    listener._deliver(published("ABCDEFGH", b"m|" + ENTRY, b"p|bob|1"))
    assert [type(e).__name__ for e in dispatched] == ["MessageStored", "PresenceChanged"]
    deliver = one(spans, "tandem.deliver")
    assert deliver.parent is not None
    assert f"00-{deliver.parent.trace_id:032x}-{deliver.parent.span_id:016x}-01" == TRACEPARENT
    assert (deliver.attributes or {})["tandem.message.seq"] == 3
    assert (deliver.attributes or {})["tandem.store.backend"] == "redis"
    assert listener.traces == {}

    # A trace event for another seq, or a malformed one, gives no parent: delivered all the same.
    spans.clear()
    entry4 = b"4" + ENTRY[1:]
    listener._deliver(published("ABCDEFGH", b"tp|9|" + TRACEPARENT.encode(), b"m|" + entry4))
    listener._deliver(published("ABCDEFGH", b"tp|5|00-zz-yy-01", b"m|5" + ENTRY[1:], b"tp|x|y"))
    assert [e.message.seq for e in dispatched[2:] if isinstance(e, MessageStored)] == [4, 5]
    assert spans.get_finished_spans() == ()


@asynccontextmanager
async def redis_store(dispatched: list[Event]) -> AsyncIterator[RedisStore]:
    check_redis(SHARED_REDIS_URL)
    async with RedisStore.open(
        SHARED_REDIS_URL, dispatched.append, cluster=False, history_size=100, idle_ms=60_000, ttl_ms=120_000
    ) as store:
        yield store


def listen(code: str) -> tuple[redis.Redis, Any]:
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=5.0)
    pubsub: Any = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.ssubscribe(channel(code))
    assert pubsub.get_sharded_message(timeout=5.0)["type"] == "ssubscribe"
    return client, pubsub


def next_published(pubsub: Any) -> bytes:
    message = pubsub.get_sharded_message(timeout=5.0)
    assert message is not None and message["type"] == "smessage", message
    data: bytes = message["data"]
    return data


async def test_on_redis_a_traced_send_publishes_its_traceparent_before_the_message_and_history_is_unchanged(
    spans: InMemorySpanExporter,
) -> None:
    dispatched: list[Event] = []
    now = int(time.time() * 1000)
    code = "T" + hashlib.sha256(os.urandom(8)).hexdigest()[:7].upper().translate(str.maketrans("ILOU", "1234"))
    with trio.fail_after(TIMEOUT):
        async with redis_store(dispatched) as store:
            await store.watch(code)
            await store.create(lambda: code, "alice", b"a" * 32, "conn-a", now)
            await store.join(code, "bob", b"b" * 32, "conn-b", now)
            client, pubsub = await trio.to_thread.run_sync(listen, code)
            try:
                assert tracing.tracer is not None
                otel = tracing.tracer.provider.get_tracer("test")
                limits = [LimitKey(Rule("messages_user", 100, 60.0), "alice", per_session=True)]  # ARGV pairs first
                with otel.start_as_current_span("the send") as span:
                    assert (await store.append(code, "alice", "conn-a", orjson.dumps(BODY), now, limits)).seq == 1
                    send = span.get_span_context()
                traced = [await trio.to_thread.run_sync(next_published, pubsub) for _ in range(2)]
                tracing.tracer, on = None, tracing.tracer  # an instance not tracing publishes the message alone
                try:
                    assert (await store.append(code, "bob", "conn-b", b'"untraced"', now)).seq == 2
                finally:
                    tracing.tracer = on
                untraced = await trio.to_thread.run_sync(next_published, pubsub)
                history: list[bytes] = client.lrange(f"tandem:{{{code}}}:h", 0, -1)  # type: ignore[assignment]
            finally:
                pubsub.close()
                client.close()
            await eventually(lambda: len([e for e in dispatched if isinstance(e, MessageStored)]), 2)
            assert await store.leave(code, "bob", "conn-b", now) is False
            assert await store.leave(code, "alice", "conn-a", now) is True
            store.unwatch(code)
    assert traced[0] == f"tp|1|00-{send.trace_id:032x}-{send.span_id:016x}-{int(send.trace_flags):02x}".encode()
    assert traced[1].startswith(b"m|1|") and not untraced.startswith(b"tp|") and untraced.startswith(b"m|2|")
    assert history == [traced[1][2:], untraced[2:]]  # the entry as readers know it
    assert [stored_message(e).data for e in history] == [orjson.dumps(BODY), b'"untraced"']
    (deliver,) = named(spans, "tandem.deliver")  # this instance's listener got seq 1 with its trace
    assert deliver.parent is not None and deliver.parent.span_id == send.span_id
    batch = [s for s in named(spans, "tandem.store.batch") if s.parent and s.parent.span_id == send.span_id]
    assert len(batch) == 1 and (batch[0].attributes or {})["tandem.store.backend"] == "redis"


# --- two real instances on Redis, exporting over OTLP/HTTP --------------------------------------------


@dataclass(frozen=True)
class Exported:
    instance: str
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    links: tuple[str, ...]  # span ids


class Collector:
    """An OTLP/HTTP trace receiver on loopback: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Exported] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.receive(self.path, body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def receive(self, path: str, body: bytes) -> None:
        assert path == "/v1/traces", path
        request = ExportTraceServiceRequest.FromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    found.append(
                        Exported(
                            resource.get("service.instance.id", ""),
                            resource.get("service.name", ""),
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            attributes,
                            tuple(link.span_id.hex() for link in span.links),
                        )
                    )
        with self.lock:
            self.spans += found

    def snapshot(self) -> list[Exported]:
        with self.lock:
            return list(self.spans)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.mark.parametrize("store", ["redis"], indirect=True)
async def test_a_trace_runs_from_the_send_on_one_instance_to_the_delivery_on_another(
    tandem_factory: ServerFactory, collector: Collector, tmp_path: Path
) -> None:
    # The servers' working directory: OTEL_* variables in .env count, under the environment's.
    dotenv = f"OTEL_EXPORTER_OTLP_ENDPOINT={collector.endpoint}\nOTEL_RESOURCE_ATTRIBUTES=service.instance.id=dotenv\n"
    (tmp_path / ".env").write_text(dotenv)

    def instance(name: str) -> Any:
        otel = {"OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={name}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
        return tandem_factory(data_dir=tmp_path / name, **otel)

    a_server, b_server = instance("sender"), instance("receiver")
    async with connect(a_server) as a, connect(b_server) as b:
        created = await a.create()
        await b.join(created["code"])
        await a.expect("session:paired")
        await b.expect("session:paired")
        assert await a.message({"text": BODY}) == 1
        assert (await b.expect("message"))["data"] == {"text": BODY}

        def trace_of_the_send() -> tuple[Exported, Exported] | None:
            spans = collector.snapshot()
            sends = [s for s in spans if (s.instance, s.name) == ("sender", "tandem.request message:send")]
            delivers = [s for s in spans if (s.instance, s.name) == ("receiver", "tandem.deliver")]
            found = [(s, d) for s in sends for d in delivers if s.trace_id == d.trace_id]
            return found[0] if found else None

        found = await eventually(trace_of_the_send, until=lambda v: v is not None, within=10)
    assert found is not None
    send, deliver = found
    assert deliver.parent == send.span_id
    assert send.service == deliver.service == "tandem"  # OTEL_SERVICE_NAME unset
    session = send.attributes["tandem.session"]
    assert session.startswith("code-") and deliver.attributes["tandem.session"] == session
    assert deliver.attributes["tandem.message.seq"] == 1
    batches = [s for s in collector.snapshot() if s.name == "tandem.store.batch" and s.trace_id == send.trace_id]
    assert [(s.instance, s.parent, send.span_id in s.links) for s in batches] == [("sender", send.span_id, True)]
    for span in collector.snapshot():
        for secret in (created["code"], created["token"], BODY, "127.0.0.1"):
            assert secret not in repr(span), (span.name, secret)


async def test_a_collector_that_never_answers_delays_the_exit_by_one_second_at_most(
    tandem_factory: ServerFactory,
) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        server = tandem_factory(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_SCHEDULE_DELAY="50", SHUTDOWN_GRACE="2")
        async with connect(server) as a:
            await a.create()
        await trio.sleep(0.3)  # an export is waiting on the collector
        (listening,) = log_lines(server, "server.listening")
        assert listening["tracing"] == ["otlp"]
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(server.wait, 15.0) == 0
        assert time.monotonic() - started < 2 + tracing.FLUSH_AT_EXIT_S + 1.0, server.output()
