"""Fixes and limits for Hypercorn 0.18's WebSocket and HTTP layers, installed by `install()` at start-up.

Each fix replaces one Hypercorn or wsproto method with a corrected copy (ping/close race, missing close
frames, unbounded inflation, HTTP/2 reset floods, memory per held connection), and `TCPServer.run` is
wrapped so that an error of one connection closes that connection only. Compression and cleartext
HTTP/2 stay off unless enabled. A WebSocket app may send a burst of text frames in one socket write
(`SEND_FRAMES`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import h2.errors
import h2.events
import h11
import outcome
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.events import Closed, RawData
from hypercorn.protocol import ProtocolWrapper, ws_stream
from hypercorn.protocol.events import Data, Response, StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol, H11WSConnection
from hypercorn.trio import task_group, worker_context
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.utils import UnexpectedMessageError
from wsproto import connection as wsproto_connection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Message, Ping, TextMessage
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits
from wsproto.utilities import LocalProtocolError

FIXED_VERSION = "0.18.0"

# permessage-deflate's end-of-message marker, stripped by the sender (RFC 7692 7.2.2).
DEFLATE_TAIL = b"\x00\x00\xff\xff"
# Compressed bytes one message may take: MAX_MESSAGE_BYTES times this, plus
# the slack. Incompressible data grows by 5 bytes per 64 KiB stored block, so
# this is ample, while a stream of empty blocks that inflates to nothing cannot run on.
MAX_DEFLATE_INPUT_RATIO = 2
DEFLATE_INPUT_SLACK = 1024
# HTTP/2 stream resets a connection may cause (CVE-2023-44487, rapid reset):
# a burst of this many, refilled at RESETS_PER_SECOND. A proxy cancelling its
# clients' requests stays far below; a flood gets GOAWAY and the connection closes.
MAX_RESET_BURST = 100
# One write to a peer may wait this long for the peer to read (SEND_TIMEOUT).
DEFAULT_SEND_TIMEOUT = 10.0
RESETS_PER_SECOND = 10.0

log = logging.getLogger("tandem")

CrashCallback = Callable[[BaseException], None]


@dataclass(frozen=True, slots=True)
class Settings:
    max_message_bytes: int = 65536
    ws_compression: bool = False
    http2_cleartext: bool = False
    send_timeout: float = DEFAULT_SEND_TIMEOUT  # one write to a peer, at most


_settings = Settings()
_on_crash: CrashCallback | None = None

# Hypercorn's own methods, taken once at import: `install()` may run again without wrapping twice.
_original_run = TCPServer.run
_original_read_data = TCPServer._read_data
_original_protocol_send = TCPServer.protocol_send
_original_handshake_init = ws_stream.Handshake.__init__
_original_check_protocol = H11Protocol._check_protocol
_original_wrapper_handle = ProtocolWrapper.handle
_original_h2_handle_events = H2Protocol._handle_events
_original_app_send = ws_stream.WSStream.app_send


# --- one connection's error closes that connection only ---------------------------


def _peer(server: Any) -> str | None:
    with contextlib.suppress(AttributeError, OSError, IndexError):
        sock = getattr(server.stream, "transport_stream", server.stream).socket
        return str(sock.getpeername()[0])
    return None


async def _tcp_run(self: Any) -> None:
    """TCPServer.run: an Exception of this connection is logged, counted, and
    ends this connection; trio.Cancelled and other BaseExceptions pass on."""
    peer = _peer(self)
    try:
        await _original_run(self)
    except* Exception as group:
        errors = [type(exc).__name__ for exc in _leaves(group)]
        log.error("connection.crashed", exc_info=group, extra={"fields": {"ip": peer, "errors": errors}})
        if _on_crash is not None:
            try:
                _on_crash(group)
            except Exception:  # a broken counter must not undo the guard
                log.exception("connection.crash_callback_failed")
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _tcp_protocol_send(self: Any, event: Any) -> None:
    """TCPServer.protocol_send: a send that finds the socket closing, or that
    the peer does not take within SEND_TIMEOUT, closes the connection.

    `_close` sends EOF outside `send_lock` and holds trio's send-conflict
    detector across a checkpoint: a ping sent meanwhile gets BusyResourceError,
    which Hypercorn let escape and end the whole server. A send is shielded
    from cancellation (half a frame would corrupt the stream), so without a
    timeout of its own a peer that stops reading held the writer, the queue
    and the connection until the read timeout.
    """
    if not isinstance(event, RawData):
        await _original_protocol_send(self, event)
        return
    async with self.send_lock:
        stalled = False
        data = event.data
        held = getattr(self, _HELD, b"")
        if held:  # the tail of a `write_now` goes out first
            data = held + data
            setattr(self, _HELD, b"")
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(_settings.send_timeout) as timeout:
                await self.stream.send_all(data)
            stalled = timeout.cancelled_caught
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            stalled = True
        if stalled:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
            await self.protocol.handle(Closed())


# --- WebSocket frames ---------------------------------------------------------------


async def _ws_handle_events(self: Any) -> None:
    """WSStream._handle_events, with two fixes.

    Past `websocket_max_message_size` Hypercorn sent 1009 but kept buffering
    the frame's tail and stopped handling the events after it: the peer's close
    reply was lost. A rejected frame's data is dropped and events go on.
    A frame wsproto cannot parse (invalid UTF-8, reserved opcode or bit, a
    continuation without a start, too big once inflated) leaves the connection
    OPEN: Hypercorn dropped the socket without a close frame. It gets one with
    wsproto's code (1007, 1002 or 1009, RFC 6455 7.4.1) before the stream ends.
    """
    for event in self.connection.events():
        if isinstance(event, Message):
            if self.connection.state is not ConnectionState.OPEN:
                continue  # closing: a rejected frame's tail, or data after our close
            try:
                self.buffer.extend(event)
            except ws_stream.FrameTooLargeError:
                self.buffer.clear()
                await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                continue
            if event.message_finished:
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            if self.connection.state is ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            elif self.connection.state is ConnectionState.OPEN:  # wsproto's ParseFailed
                await self._send_wsproto_event(CloseConnection(code=event.code))
            await self.send(StreamClosed(stream_id=self.stream_id))


# The ASGI message a WebSocket app sends several text frames with, written to
# the socket in one send: {"type": SEND_FRAMES, "texts": [...]}. An app asks
# `sends_frames(send)` whether its server takes it.
SEND_FRAMES = "tandem.websocket.send_frames"


async def _ws_app_send(self: Any, message: Any) -> None:
    """WSStream.app_send, also taking SEND_FRAMES: each text is framed as
    `websocket.send` frames it, and the burst goes out in one write, one
    system call instead of one per frame."""
    if message is None or message["type"] != SEND_FRAMES:
        await _original_app_send(self, message)
        return
    if self.closed:
        return  # as websocket.send: the client is gone, the app may finish
    if self.state is not ws_stream.ASGIWebsocketState.CONNECTED:
        raise UnexpectedMessageError(self.state, message["type"])
    try:
        data = b"".join([self.connection.send(TextMessage(data=text)) for text in message["texts"]])
    except LocalProtocolError:
        return  # the connection is closing: as `_send_wsproto_event`, nothing more goes out
    await self.send(Data(stream_id=self.stream_id, data=data))


def sends_frames(send: Callable[..., Any]) -> bool:
    """Whether an ASGI `send` callable is a WebSocket's that takes SEND_FRAMES (and `write_now`)."""
    return getattr(send, "__func__", None) is _ws_app_send


# The bytes of a `write_now` the kernel did not take, on its TCPServer: the
# connection's next send (any: a frame, a ping, a close) writes them first.
_HELD = "_tandem_held"


def write_now(send: Callable[..., Any], texts: list[str]) -> int | None:
    """Write text frames to a WebSocket's socket at once, without awaiting:
    None if nothing was written (another send in progress, TLS, HTTP/2, a
    closing connection: send them with SEND_FRAMES instead), else the number
    of bytes the kernel did not take, held for the connection's next send.

    Once framed (and compressed, which advances the compressor), the bytes go
    out exactly once, in order: a tail is never framed again.
    """
    ws = getattr(send, "__self__", None)
    if getattr(send, "__func__", None) is not _ws_app_send or ws is None:
        return None
    if ws.closed or ws.state is not ws_stream.ASGIWebsocketState.CONNECTED:
        return None
    h11 = getattr(ws.send, "__self__", None)
    server = getattr(getattr(h11, "send", None), "__self__", None) if isinstance(h11, H11Protocol) else None
    if not isinstance(server, TCPServer) or server.send_lock.locked():
        return None
    held: bytes = getattr(server, _HELD, b"")
    if held:
        return None
    stream = server.stream
    if not isinstance(stream, trio.SocketStream) or stream.socket.did_shutdown_SHUT_WR:
        return None
    fd = stream.socket.fileno()
    if fd == -1 or ws.connection.state is not ConnectionState.OPEN:
        return None
    data = b"".join([ws.connection.send(TextMessage(data=text)) for text in texts])
    try:
        written = os.write(fd, data)  # the socket is non-blocking: what fits now
    except BlockingIOError:
        written = 0
    except OSError:
        return 0  # the peer is gone: the reader sees it and ends the connection
    if written < len(data):
        setattr(server, _HELD, data[written:])
    return len(data) - written


async def _ws_ping(self: Any) -> None:
    """One turn of WSStream._send_pings, started by `_Pinger` when it is due: no ping once
    the stream is closed or closing, as a ping sent then could only race the close (see
    `_tcp_protocol_send`); the next is due PING_INTERVAL after this one went out."""
    if not self.closed and self.connection.state is ConnectionState.OPEN:
        await self._send_wsproto_event(Ping())
        _Pinger.of_run().schedule(self, trio.current_time() + self.config.websocket_ping_interval)


def _ws_handshake_init(self: Any, headers: list[tuple[bytes, bytes]], http_version: str) -> None:
    """Handshake.__init__: without WS_COMPRESSION an extension offer is ignored,
    so the 101 names none and frames with RSV1 set are refused (1002)."""
    _original_handshake_init(self, headers, http_version)
    if not _settings.ws_compression:
        self.extensions = None


class BoundedPerMessageDeflate(PerMessageDeflate):
    """permessage-deflate that inflates at most MAX_MESSAGE_BYTES + 1 per message.

    wsproto inflates each chunk whole: a 1 MiB frame can become 1 GiB. Here
    each chunk inflates to at most what the message has left; more means 1009
    (wsproto turns the CloseReason into ParseFailed), and the rest of the
    message is refused without being inflated.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = _settings.max_message_bytes
        self._inflated = 0  # of the message in hand
        self._consumed = 0  # compressed bytes of the message in hand
        self._rejected = False

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode in (Opcode.TEXT, Opcode.BINARY):  # a new message
            self._inflated = self._consumed = 0
            self._rejected = False
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(data)

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        if not fin or not self._inbound_is_compressible or not self._inbound_compressed:
            return super().frame_inbound_complete(proto, fin)
        data = self._inflate(DEFLATE_TAIL)  # no flush(): it would inflate an unconsumed tail unbounded
        if isinstance(data, CloseReason):
            return data
        if self.server_no_context_takeover if proto.client else self.client_no_context_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        return data

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        self._consumed += len(data)
        if self._rejected or self._consumed > self.max_bytes * MAX_DEFLATE_INPUT_RATIO + DEFLATE_INPUT_SLACK:
            self._rejected = True
            return CloseReason.MESSAGE_TOO_BIG
        # What the message may still take, plus the one byte that proves it too
        # big; at least 1 here, as 0 would mean "no limit" to zlib.
        room = self.max_bytes + 1 - self._inflated
        assert self._decompressor is not None
        try:
            out = self._decompressor.decompress(data, room)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_bytes or self._decompressor.unconsumed_tail:
            self._rejected = True
            return CloseReason.MESSAGE_TOO_BIG
        return out


# --- memory per held connection -------------------------------------------------------
#
# A held WebSocket is mostly trio objects and suspended coroutine frames: each set() is
# 216 bytes, a deque 760, an OrderedDict (trio's ParkingLot) 136, a sleeping task
# about 3 KiB. The fixes below keep what an idle connection needs and nothing else
# (Tandem, 5,000 held, paired and idle: 42.4 KiB of RSS each before them, 31.6 after).

_recv_buffers = threading.local()  # one MAX_RECV buffer per thread that runs a server


def _recv_buffer() -> bytearray:
    buffer: bytearray | None = getattr(_recv_buffers, "buffer", None)
    if buffer is None:
        buffer = _recv_buffers.buffer = bytearray(MAX_RECV)
    return buffer


async def _tcp_read_data(self: Any) -> None:
    """TCPServer._read_data for a cleartext socket (TLS keeps Hypercorn's loop).

    The read timeout is a plain cancel scope instead of `trio.fail_after` (a generator
    and its context manager, held while idle), and the socket is read here, with the
    checkpoints of trio's `SocketStream.receive_some` but not its five coroutine frames
    and error-translating context manager. It reads into one buffer per thread and
    copies out what came: trio's `recv(65536)` allocates 64 KiB per read and shrinks
    it, which scatters small blocks over glibc's heap.
    """
    raw = getattr(getattr(self.stream, "socket", None), "_sock", None)
    if type(self.stream) is not trio.SocketStream or not isinstance(raw, socket.socket):
        await _original_read_data(self)
        return
    buffer = _recv_buffer()
    timeout = self.config.read_timeout or math.inf
    while True:
        with trio.CancelScope(deadline=trio.current_time() + timeout) as read:
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
                data = _recv(raw, buffer)
                if data is None:
                    while data is None:  # `_recv` ends its BlockingIOError: held across this wait, it would keep frames
                        await trio.lowlevel.wait_readable(raw)
                        data = _recv(raw, buffer)
                else:
                    await trio.lowlevel.cancel_shielded_checkpoint()
            except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                break  # closed here, or reset by the peer
        if read.cancelled_caught or data is None:
            break  # read_timeout
        await self.protocol.handle(RawData(data))
        if not data:
            break
    await self.protocol.handle(Closed())


def _recv(raw: socket.socket, buffer: bytearray) -> bytes | None:
    """What one read brought, copied out of the shared `buffer` before anything else
    runs; None when there is nothing to read yet."""
    try:
        size = raw.recv_into(buffer)
    except BlockingIOError:
        return None
    return bytes(memoryview(buffer)[:size])


class _Lock:
    """trio.Lock for the few tasks of one connection: the same FIFO hand-over and
    checkpoints, in 56 bytes instead of 340 (trio's ParkingLot keeps an OrderedDict)."""

    __slots__ = ("_owner", "_waiting")

    def __init__(self) -> None:
        self._owner: trio.lowlevel.Task | None = None
        self._waiting: list[trio.lowlevel.Task] | None = None  # made by the first wait

    async def __aenter__(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        if self._owner is None:  # nobody waits either: `__aexit__` hands the lock over
            self._owner = task
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._owner is task:
            raise RuntimeError("attempt to re-acquire an already held Lock")
        if self._waiting is None:
            self._waiting = []
        waiting = self._waiting
        waiting.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            waiting.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # `__aexit__` made this task the owner

    async def __aexit__(self, *exc_info: object) -> None:
        if self._waiting:
            self._owner = self._waiting.pop(0)
            trio.lowlevel.reschedule(self._owner)
        else:
            self._owner = None

    def locked(self) -> bool:
        return self._owner is not None


class _Event:
    """Hypercorn's EventWrapper (WorkerContext.event_class) whose trio.Event (280 bytes)
    is made by the first wait: H11Protocol keeps one per connection (`can_read`) that a
    WebSocket never waits on."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._event: trio.Event | None = None
        self._set = False

    async def clear(self) -> None:
        self._event = None  # like EventWrapper: a new event, earlier waiters stay on the old one
        self._set = False

    async def wait(self) -> None:
        if self._set:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    async def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set


def _tcp_init(self: Any, app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
    """TCPServer.__init__: its send lock is a `_Lock`."""
    self.app = app
    self.config = config
    self.context = context
    self.send_lock = _Lock()
    self.idle_task = worker_context.TrioSingleTask()
    self.stream = stream
    self.state = state


def _single_task_init(self: Any) -> None:
    """TrioSingleTask.__init__ (TCPServer.idle_task): its lock is a `_Lock`."""
    self._handle = None
    self._lock = _Lock()


class _AppQueue:
    """The queue from a connection to its ASGI app (TaskGroup.spawn_app): a memory channel's
    bounded FIFO, hand-over and checkpoints, in about 180 bytes instead of 1,800 (the
    channel's deque, two OrderedDicts and a set per end). It is never closed, as in Hypercorn."""

    __slots__ = ("_items", "_receivers", "_senders", "_size")

    def __init__(self, size: float) -> None:
        self._items: list[Any] = []
        self._size = size
        self._receivers: list[trio.lowlevel.Task] | None = None  # waiting in receive, made when needed
        self._senders: list[tuple[trio.lowlevel.Task, Any]] | None = None  # waiting in send, with their item

    async def send(self, item: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._receivers:
            trio.lowlevel.reschedule(self._receivers.pop(0), outcome.Value(item))
        elif len(self._items) < self._size:
            self._items.append(item)
        else:
            if self._senders is None:
                self._senders = []
            senders, entry = self._senders, (trio.lowlevel.current_task(), item)
            senders.append(entry)

            def abort(_: Any) -> trio.lowlevel.Abort:
                senders.remove(entry)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)  # a receiver took the item
            return
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._senders:  # the buffer is full: the first waiting sender's item joins it
            task, item = self._senders.pop(0)
            self._items.append(item)
            trio.lowlevel.reschedule(task)
        if self._items:
            item = self._items.pop(0)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        if self._receivers is None:
            self._receivers = []
        receivers, task = self._receivers, trio.lowlevel.current_task()
        receivers.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            receivers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # a sender handed an item over


async def _spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Callable[[Any], Any]:
    """TaskGroup.spawn_app: the app's queue is an `_AppQueue`."""
    queue = _AppQueue(config.max_app_queue_size)
    self._nursery.start_soon(
        task_group._handle, app, config, scope, queue.receive, send, trio.to_thread.run_sync, trio.from_thread.run
    )
    return queue.send


def _asgi_call(self: Any, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> Awaitable[None]:
    """ASGIWrapper.__call__: hands back the app's coroutine for the caller to await
    instead of awaiting it in a frame of its own (240 bytes, held as long as the app runs)."""
    result: Awaitable[None] = self.app(scope, receive, send)
    return result


def _h11_ws_send(self: Any, event: Any) -> bytes:
    """H11WSConnection.send: after the 101 h11 has nothing left to send (frames pass
    through as raw data), so the upgraded connection lets go of its h11.Connection (900 bytes)."""
    data: bytes = self.h11_connection.send(event)
    if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
        self.h11_connection = None
    return data


class _Answered:
    """What WSStream keeps of its Handshake once answered: `handle` asks only this."""

    accepted = True


_ANSWERED = _Answered()


async def _ws_accept(self: Any, message: Any) -> None:
    """WSStream._accept: the Handshake (the request's parsed headers) goes once answered,
    and the pings come from `_Pinger` instead of a sleeping task per connection."""
    self.state = ws_stream.ASGIWebsocketState.CONNECTED
    status_code, headers, self.connection = self.handshake.accept(
        message.get("subprotocol"), message.get("headers", [])
    )
    self.handshake = _ANSWERED
    await self.send(Response(stream_id=self.stream_id, status_code=status_code, headers=headers))
    await self.config.log.access(self.scope, {"status": status_code, "headers": []}, time.time() - self.start_time)
    if self.config.websocket_ping_interval is not None:
        _Pinger.of_run().schedule(self, trio.current_time())


class _Pinger:
    """One system task per trio run that starts each WebSocket's ping (`_ws_ping`) in that
    connection's task group when due: a heap entry of about 200 bytes per connection where
    Hypercorn kept a task asleep in `trio.sleep` (about 3 KiB). It holds streams weakly."""

    _run_var: trio.lowlevel.RunVar[_Pinger] = trio.lowlevel.RunVar("hypercorn_fixes.pinger")

    def __init__(self) -> None:
        self._due: list[tuple[float, int, weakref.ref[Any]]] = []  # a heap: (when, order, stream)
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None

    @classmethod
    def of_run(cls) -> _Pinger:
        try:
            return cls._run_var.get()
        except LookupError:
            pinger = cls()
            trio.lowlevel.spawn_system_task(pinger._run, name="hypercorn_fixes._Pinger")
            cls._run_var.set(pinger)
            return pinger

    def schedule(self, stream: Any, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._order), weakref.ref(stream)))
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when

    async def _run(self) -> None:
        while True:
            now = trio.current_time()
            while self._due and self._due[0][0] <= now:
                stream = heapq.heappop(self._due)[2]()
                if stream is None or stream.closed:
                    continue
                with contextlib.suppress(AttributeError, RuntimeError):  # its task group has closed
                    stream.task_group.spawn(_ws_ping, stream)
            with trio.CancelScope(deadline=self._due[0][0] if self._due else math.inf) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None


class _EventList(list[Event]):
    """wsproto's event queue as a list (56 bytes) for a deque (760): it holds at most the
    CloseConnection that `receive_data(None)` queues."""

    __slots__ = ()

    def popleft(self) -> Event:
        return self.pop(0)


def _wsproto_init(
    self: Any, connection_type: ConnectionType, extensions: list[Extension] | None = None, trailing_data: bytes = b""
) -> None:
    """wsproto Connection.__init__: its event queue is an `_EventList`."""
    self.client = connection_type is ConnectionType.CLIENT
    self._events = _EventList()
    self._proto = FrameProtocol(self.client, extensions or [])
    self._state = ConnectionState.OPEN
    self.receive_data(trailing_data)


# --- cleartext HTTP/2 -------------------------------------------------------------


async def _h11_check_protocol(self: Any, event: Any) -> None:
    """H11Protocol._check_protocol: without HTTP2_CLEARTEXT `Upgrade: h2c` is
    ignored (the request is answered in HTTP/1.1); the HTTP/2 preface still
    raises H2ProtocolAssumedError, which `_wrapper_handle` refuses."""
    if _settings.http2_cleartext:
        await _original_check_protocol(self, event)
    elif event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
        raise H2ProtocolAssumedError(b"")


async def _wrapper_handle(self: Any, event: Any) -> None:
    """ProtocolWrapper.handle: without HTTP2_CLEARTEXT prior-knowledge HTTP/2 gets 400 and the socket closes."""
    if _settings.http2_cleartext:
        await _original_wrapper_handle(self, event)
        return
    try:
        await self.protocol.handle(event)
    except H2ProtocolAssumedError:
        await self.protocol._send_error_response(400)
        await self.send(Closed())


async def _h2_handle_events(self: Any, events: list[h2.events.Event]) -> None:
    """H2Protocol._handle_events: stream resets draw on a bucket of
    MAX_RESET_BURST refilled at RESETS_PER_SECOND; the event that empties it
    ends the connection with GOAWAY(ENHANCE_YOUR_CALM), before any more streams start."""
    now = trio.current_time()
    tokens, last = getattr(self, "_tandem_resets", (float(MAX_RESET_BURST), now))
    tokens = min(float(MAX_RESET_BURST), tokens + (now - last) * RESETS_PER_SECOND)
    for index, event in enumerate(events):
        if not isinstance(event, h2.events.StreamReset):
            continue
        tokens -= 1  # the peer's RST_STREAM, or one h2 sent because the peer erred
        if tokens < 0:
            await _original_h2_handle_events(self, events[:index])
            self.connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            await self._flush()
            await self.send(Closed())
            log.warning("http2.reset_flood", extra={"fields": {"ip": self.client[0] if self.client else None}})
            return
    self._tandem_resets = (tokens, now)
    await _original_h2_handle_events(self, events)


# --- installation -------------------------------------------------------------------

# What `install()` sets: (owner, attribute, replacement). A test that installs the
# fixes in its own process puts the originals back from this list.
REPLACEMENTS: tuple[tuple[object, str, object], ...] = (
    (TCPServer, "run", _tcp_run),
    (TCPServer, "protocol_send", _tcp_protocol_send),
    (TCPServer, "__init__", _tcp_init),
    (TCPServer, "_read_data", _tcp_read_data),
    (worker_context.TrioSingleTask, "__init__", _single_task_init),
    (worker_context.WorkerContext, "event_class", _Event),
    (task_group.TaskGroup, "spawn_app", _spawn_app),
    (ASGIWrapper, "__call__", _asgi_call),
    (H11WSConnection, "send", _h11_ws_send),
    (ws_stream.WSStream, "_handle_events", _ws_handle_events),
    (ws_stream.WSStream, "_accept", _ws_accept),
    (ws_stream.WSStream, "app_send", _ws_app_send),
    (wsproto_connection.Connection, "__init__", _wsproto_init),
    (ws_stream.Handshake, "__init__", _ws_handshake_init),
    (ws_stream, "PerMessageDeflate", BoundedPerMessageDeflate),
    (H11Protocol, "_check_protocol", _h11_check_protocol),
    (ProtocolWrapper, "handle", _wrapper_handle),
    (H2Protocol, "_handle_events", _h2_handle_events),
)


def set_crash_callback(on_crash: CrashCallback | None) -> None:
    """Call `on_crash` with the error of each connection that `_tcp_run` ends."""
    global _on_crash
    _on_crash = on_crash


def install(
    *,
    max_message_bytes: int,
    ws_compression: bool,
    http2_cleartext: bool,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    on_crash: CrashCallback | None = None,
) -> None:
    """Replace Hypercorn's methods with the ones above, for a server with these settings."""
    global _settings
    if version("hypercorn") != FIXED_VERSION:
        log.warning(
            "hypercorn_fixes.unchecked", extra={"fields": {"hypercorn": version("hypercorn"), "fixed": FIXED_VERSION}}
        )
    _settings = Settings(max_message_bytes, ws_compression, http2_cleartext, send_timeout)
    set_crash_callback(on_crash)
    for owner, name, replacement in REPLACEMENTS:
        setattr(owner, name, replacement)
