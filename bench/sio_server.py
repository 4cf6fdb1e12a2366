"""Figure 5's peer: python-socketio with AsyncRedisManager, served by uvicorn.

What users pick for a Redis-backed relay between pairs of clients: a client
emits `join` (a room name, acked), then `msg` events; the server emits
each one to the room except the sender (through AsyncRedisManager, so every
instance on the Redis would see it) and acks the sender with a per-room seq
(the Socket.IO callback), as Tandem's `message:ack`. Nothing is stored.
uvicorn runs one process with its fast paths: websockets, uvloop, httptools.

    .venv/bin/python bench/sio_server.py PORT REDIS_URL   (binds 127.0.0.1)
"""

from __future__ import annotations

import sys
from typing import Any

import socketio
import uvicorn

CHANNEL = "tandem-bench-sio"  # its own pub/sub channel on the shared bench Redis
MAX_REDIS_CONNECTIONS = 1024


def build(redis_url: str) -> Any:
    # redis-py 8's asyncio pool refuses a 101st concurrent command ("Too many
    # connections"), and AsyncRedisManager then reconnects with a new client per
    # failed publish: 200 clients each with an emit in flight hit that at once.
    # A larger pool is the one-line fix a user would make.
    manager = socketio.AsyncRedisManager(
        redis_url, channel=CHANNEL, redis_options={"max_connections": MAX_REDIS_CONNECTIONS}
    )
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, logger=False, engineio_logger=False)
    rooms: dict[str, str] = {}
    seqs: dict[str, int] = {}

    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        rooms[sid] = room
        seqs.setdefault(room, 0)
        return "joined"

    async def msg(sid: str, data: Any) -> int:
        room = rooms[sid]
        seq = seqs[room] = seqs[room] + 1
        await sio.emit("msg", data, room=room, skip_sid=sid)
        return seq

    async def disconnect(sid: str, reason: str = "") -> None:
        rooms.pop(sid, None)

    sio.on("join", join)
    sio.on("msg", msg)
    sio.on("disconnect", disconnect)

    return socketio.ASGIApp(sio)


def main() -> None:
    port, redis_url = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        build(redis_url),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        ws="websockets",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
