"""A fix for Hypercorn 0.18's WebSocket message limit, installed at start-up.

Past `websocket_max_message_size` Hypercorn sends 1009 but keeps buffering the
frame's tail and stops handling the events after it, so the peer's close reply
is lost: the app hears nothing until `read_timeout` and the client's close
hangs. The replacement drops a rejected frame's data and keeps handling
events, so the close handshake completes and the app sees the disconnect.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from typing import Any

from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import StreamClosed
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

FIXED_VERSION = "0.18.0"


async def _handle_events(self: Any) -> None:
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
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            await self.send(StreamClosed(stream_id=self.stream_id))


def install() -> None:
    if version("hypercorn") != FIXED_VERSION:
        logging.getLogger("tandem").warning(
            "hypercorn_fixes.unchecked", extra={"fields": {"hypercorn": version("hypercorn"), "fixed": FIXED_VERSION}}
        )
    ws_stream.WSStream._handle_events = _handle_events  # type: ignore[method-assign]
