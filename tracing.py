"""Optional OpenTelemetry tracing: a span per WebSocket request, per store batch, per delivery.

Off unless the standard OTEL_* variables ask for it (`exporters`); then `setup` imports the SDK and
sets `tracer`. Every hook elsewhere checks `tracing.tracer` first: off, that one check is all there
is (Tandem imports no opentelemetry module, makes no span). On Redis a send's W3C traceparent reaches
the other instances as a `tp` event published just before its message; instances not tracing skip it.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import logging_setup
import protocol
import session_store
from config import ConfigError, read_dotenv

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext

    from relay import Connection

# The exporters Tandem ships for OTEL_TRACES_EXPORTER, and the one OTLP protocol.
EXPORTERS = ("otlp", "console")
OTLP_PROTOCOL = "http/protobuf"
ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")  # either turns `otlp` on
# Spans' names; a request span is REQUEST_SPAN and the frame's type, e.g. `tandem.request message:send`.
REQUEST_SPAN = "tandem.request"
BATCH_SPAN = "tandem.store.batch"
DELIVER_SPAN = "tandem.deliver"
# How long the exit waits for the spans left to be exported (a collector that does not answer
# must not hold the process past SHUTDOWN_GRACE); what is not exported by then is dropped.
FLUSH_AT_EXIT_S = 1.0
# The published event that carries a message's traceparent (redis_scripts: `tp|seq|traceparent`).
TRACE_EVENT = b"tp"

REQUEST_TYPES: dict[type[Any], str] = {
    protocol.CreateSession: "session:create",
    protocol.JoinSession: "session:join",
    protocol.ResumeSession: "session:resume",
    protocol.SendMessage: "message:send",
    protocol.LeaveSession: "session:leave",
    protocol.Ping: "ping",
    protocol.Hello: "hello",
    protocol.Authenticate: "auth",
}

tracer: Tracer | None = None  # set by `setup` (or a test) while tracing is on; the hooks' one check


def exporters(env: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; [] (off) unless it names one.

    On with OTEL_TRACES_EXPORTER (`otlp`, `console`, both comma-separated) or, without it, with
    OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (`otlp`). Off with
    OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. A value Tandem cannot serve: ConfigError.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if named:
        chosen = [n.strip().lower() for n in named.split(",") if n.strip()]
        if chosen == ["none"]:
            return []
        if not chosen or not set(chosen) <= set(EXPORTERS):
            raise ConfigError("OTEL_TRACES_EXPORTER", named, "otlp, console, both (comma-separated) or none")
    elif any(env.get(name, "").strip() for name in ENDPOINTS):
        chosen = ["otlp"]
    else:
        return []
    if "otlp" in chosen:
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            value = env.get(name, "").strip()
            if value:
                if value.lower() != OTLP_PROTOCOL:
                    raise ConfigError(name, value, f"{OTLP_PROTOCOL} (the OTLP exporter Tandem ships)")
                break
    return sorted(set(chosen), key=chosen.index)


def setup(dotenv: Path | None = Path(".env")) -> Tracer | None:
    """Turn tracing on if the OTEL_* variables ask for it; None when off.

    They come from the environment and, as Tandem's settings do, from `dotenv` (the environment
    wins): the file's are copied into os.environ, where the SDK reads the others itself (endpoint,
    headers, sampler, batching, resource attributes). `service.name` is `tandem` unless
    OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say otherwise; `service.instance.id` is random
    per process unless OTEL_RESOURCE_ATTRIBUTES names one.
    """
    global tracer
    if dotenv is not None:
        for key, value in read_dotenv(dotenv).items():
            if key.startswith("OTEL_"):
                os.environ.setdefault(key, value)
    chosen = exporters(os.environ)
    if not chosen:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    detected = Resource.create()  # with OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    attributes = dict(detected.attributes)
    if str(attributes.get("service.name", "")).startswith("unknown_service"):  # the SDK's default
        attributes["service.name"] = "tandem"
    attributes.setdefault("service.instance.id", uuid.uuid4().hex)
    # shutdown_on_exit=False: `shutdown` bounds the last export; the SDK's own exit hook waits up to 30 s.
    provider = TracerProvider(resource=Resource(attributes, detected.schema_url), shutdown_on_exit=False)
    for name in chosen:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter(out=sys.stderr)  # stdout is the log's, one JSON object a line
        provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = Tracer(provider, chosen)
    return tracer


def shutdown(timeout: float = FLUSH_AT_EXIT_S) -> None:
    """Turn tracing off, exporting the spans left for at most `timeout` seconds."""
    global tracer
    if tracer is not None:
        done, tracer = tracer, None
        flush = threading.Thread(target=done.provider.shutdown, name="tandem-tracing-exit", daemon=True)
        flush.start()
        flush.join(timeout)


class Tracer:
    """The hooks, called only while tracing is on. What a span never holds: a message's body,
    a token, a session code in clear (the logs' keyed hash instead), a client address."""

    def __init__(self, provider: TracerProvider, exporters: list[str] | None = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.exporters = exporters or []  # as `setup` chose them, for the start-up line
        self._tracer = provider.get_tracer("tandem")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    # -- a request (relay.Connection's reader) --

    async def request(
        self,
        conn: Connection,
        request: protocol.Request,
        handle: Callable[[protocol.Request], Awaitable[None]],
    ) -> None:
        """Handle `request` inside its span, the current span of its store operations."""
        trace = self._trace
        kind = REQUEST_TYPES.get(type(request), "unknown")
        attributes: dict[str, str | int] = {"tandem.request.type": kind, "tandem.conn": conn.id}
        if isinstance(request, protocol.SendMessage):
            attributes["tandem.message.bytes"] = len(request.data)
        code = conn.code or getattr(request, "code", None)  # a join's or resume's code may be a guess
        span = self._tracer.start_span(f"{REQUEST_SPAN} {kind}", kind=trace.SpanKind.SERVER, attributes=attributes)
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            try:
                await handle(request)
            except protocol.TandemError as exc:
                span.set_attributes({"tandem.result": str(exc.code), "error.type": str(exc.code)})
                if isinstance(exc, protocol.ServerError):  # Tandem's fault, not the client's
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc.code)))
                raise
            except BaseException as exc:  # a bug: its type only (its text may quote anything)
                span.set_attributes({"tandem.result": "internal", "error.type": type(exc).__qualname__})
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__qualname__))
                raise
            else:
                span.set_attribute("tandem.result", "ok")
            finally:
                code = conn.code or code  # a create's new code
                if code:
                    span.set_attribute("tandem.session", logging_setup.code_pseudonym(code))

    def traceparent(self) -> str:
        """The current span's W3C traceparent (the send's, in RedisStore.append); '' when it
        is not sampled (no instance would record its delivery)."""
        if not self._trace.get_current_span().get_span_context().trace_flags.sampled:
            return ""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier.get("traceparent", "")

    # -- the store's group commit (session_store.GroupCommit) --

    def queued(self, op: session_store.Op) -> None:
        """An operation joins the queue: it carries the current (request's) span context, if
        sampled (the spans it would lead to are recorded only then)."""
        context = self._trace.get_current_span().get_span_context()
        if context.is_valid and context.trace_flags.sampled:
            op.trace = context

    def batch_started(self, batch: list[session_store.Op], backend: str) -> Span | None:
        """The batch's span: a child of the first request it carries, linked to each of them. None
        for a batch that carries no (sampled) request: the sweeper's, a probe's."""
        trace = self._trace
        carried: list[SpanContext] = [op.trace for op in batch if getattr(op, "trace", None) is not None]
        if not carried:
            return None
        return self._tracer.start_span(
            BATCH_SPAN,
            context=trace.set_span_in_context(trace.NonRecordingSpan(carried[0])),
            kind=trace.SpanKind.CLIENT,
            attributes={
                "db.system.name": backend,
                "tandem.store.backend": backend,
                "tandem.store.ops": len(batch),
                "tandem.store.requests": len(carried),
            },
            links=[trace.Link(context) for context in carried],
        )

    def batch_done(self, span: Span | None, batch: list[session_store.Op]) -> None:
        """The batch committed (or failed): end its span, with the failures counted."""
        if span is None:
            return
        failed = [op.error for op in batch if op.error is not None]
        span.set_attribute("tandem.store.failed", len(failed))
        broken = next((e for e in failed if not isinstance(e, protocol.ClientError)), None)
        if broken is not None:  # the backend's failure, not a request's refusal
            name = str(broken.code) if isinstance(broken, protocol.TandemError) else type(broken).__qualname__
            span.set_attribute("error.type", name)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, name))
        span.end()

    def dispatch(self, op: session_store.Op, dispatch: session_store.Dispatch, backend: str) -> None:
        """Hand an operation's events to the hub; a message its request sent, inside a deliver span."""
        parent = getattr(op, "trace", None)
        for event in op.events:
            if parent is not None and isinstance(event, session_store.MessageStored):
                self.deliver(event, parent, dispatch, backend)
            else:
                dispatch(event)

    # -- delivery --

    def deliver(
        self, event: session_store.MessageStored, parent: SpanContext, dispatch: session_store.Dispatch, backend: str
    ) -> None:
        """Hand a stored message to the members here inside a `tandem.deliver` span, a child of its send."""
        trace = self._trace
        attributes: dict[str, str | int] = {
            "tandem.session": logging_setup.code_pseudonym(event.code),
            "tandem.message.seq": event.message.seq,
            "tandem.store.backend": backend,
        }
        span = self._tracer.start_span(
            DELIVER_SPAN,
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            dispatch(event)

    def published(
        self,
        pending: dict[str, tuple[int, str]],
        code: str,
        fields: bytes,
        parsed: session_store.Event | None,
        dispatch: session_store.Dispatch,
    ) -> None:
        """An event from a session's channel (redis_listener): a `tp|seq|traceparent` is kept in
        `pending` for the message of that seq, which comes next; a message is delivered as a child
        of its send's span when it had one; any other event is dispatched as it is."""
        if parsed is None:
            kind, _, rest = fields.partition(b"|")
            seq, _, traceparent = rest.partition(b"|")
            if kind == TRACE_EVENT and seq.isdigit():
                pending[code] = (int(seq), traceparent.decode(errors="replace"))
            return
        if isinstance(parsed, session_store.MessageStored):
            carried = pending.pop(code, None)
            if carried is not None and carried[0] == parsed.message.seq:
                parent = self._trace.get_current_span(self._propagator.extract({"traceparent": carried[1]}))
                context = parent.get_span_context()
                if context.is_valid and context.trace_flags.sampled:
                    self.deliver(parsed, context, dispatch, "redis")
                    return
        dispatch(parsed)
