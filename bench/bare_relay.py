"""The ceiling: a bare relay on Tandem's own stack that forwards frames and stores nothing.

A Starlette app on Hypercorn's Trio worker with exactly Tandem's Hypercorn
settings (`server.hypercorn_config`), its Hypercorn fix and its GC tuning, so
that Tandem divided by this measures what Tandem adds on the same stack. It
speaks just enough of Tandem's frames for the same load generator:
`session:create` (a code), `session:join` (`session:joined`, then
`session:paired` to both), and `message:send`: one frame in, the `message`
frame to the peer and a `message:ack` to the sender, 2 frames out, like Tandem.
No store, no queue, no history, no limits: the reader awaits the peer's send.

    PORT=8001 .venv/bin/python bench/bare_relay.py   (binds 127.0.0.1)
"""

from __future__ import annotations

import gc
import itertools
import os
import secrets
import sys
import time
from pathlib import Path

import hypercorn.trio
import orjson
import trio
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import config as config_module
import hypercorn_fixes
import server


class Pair:
    __slots__ = ("members", "seq")

    def __init__(self, creator: WebSocket) -> None:
        self.members: list[WebSocket] = [creator]
        self.seq = 0


sessions: dict[str, Pair] = {}
ids = itertools.count(1)


async def relay(ws: WebSocket) -> None:
    await ws.accept()
    me = f"c{next(ids)}"
    code: str | None = None
    pair: Pair | None = None
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = orjson.loads(message.get("text") or b"{}")
            kind = frame.get("type")
            if kind == "message:send" and pair is not None:
                pair.seq += 1
                for peer in pair.members:
                    if peer is not ws:
                        out = {"type": "message", "code": code, "seq": pair.seq, "from": me, "data": frame.get("data")}
                        out["ts"] = time.time_ns() // 1_000_000
                        await peer.send_text(orjson.dumps(out).decode())
                await ws.send_text(
                    orjson.dumps({"type": "message:ack", "id": frame.get("id"), "seq": pair.seq}).decode()
                )
            elif kind == "session:create" and pair is None:
                code = secrets.token_hex(4).upper()
                pair = sessions[code] = Pair(ws)
                created = {"type": "session:created", "id": frame.get("id"), "code": code, "client_id": me}
                await ws.send_text(orjson.dumps(created).decode())
            elif kind == "session:join" and pair is None and frame.get("code") in sessions:
                code = str(frame["code"])
                pair = sessions[code]
                pair.members.append(ws)
                await ws.send_text(
                    orjson.dumps({"type": "session:joined", "id": frame.get("id"), "code": code}).decode()
                )
                paired = orjson.dumps({"type": "session:paired", "code": code}).decode()
                for member in pair.members:
                    await member.send_text(paired)
            else:
                error = {"type": "error", "id": frame.get("id"), "code": "bad_request", "message": "unsupported"}
                await ws.send_text(orjson.dumps(error).decode())
    finally:
        if pair is not None and ws in pair.members:
            pair.members.remove(ws)
            if not pair.members and code is not None:
                sessions.pop(code, None)


async def main() -> None:
    env = {"HOST": "127.0.0.1", "PORT": os.environ.get("PORT", "8001")}
    hc = server.hypercorn_config(config_module.load(env, dotenv=None))
    app = Starlette(routes=[WebSocketRoute("/ws", relay)])
    async with trio.open_nursery() as nursery:
        await nursery.start(hypercorn.trio.serve, app, hc)
        gc.collect()
        gc.freeze()


if __name__ == "__main__":
    # The same fixes and defaults as Tandem, so that the two differ only in the relay.
    hypercorn_fixes.install(max_message_bytes=65536, ws_compression=False, http2_cleartext=False)
    gc.set_threshold(50_000, 20, 20)  # as server.main
    trio.run(main)
