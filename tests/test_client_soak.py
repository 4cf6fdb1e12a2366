"""client.py under random faults: two members talk through a server that is killed and drained.

A seeded schedule makes both members send at random moments while the server
is stopped with `kill -9` or SIGTERM (a drain) and started again on its data.
The application sees what client.py promises: every `send` returns its seq,
each message reaches the peer exactly once, in seq order, byte for byte, and
the seqs of both members together are 1..N with no gap. Both stores.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable

import trio
from helpers import BOTH_STORES, Server, ServerFactory, wait_exit

import client
from client import Backoff, Message, Options, Session

SEEDS = {"sqlite": 20261129, "redis": 20261130}
SENDS = 40  # per member
FAULTS = 4
SEND_GAP = (0.02, 0.25)  # seconds between one member's sends
FAULT_GAP = (1.0, 2.5)  # seconds between faults
DOWN_FOR = (0.1, 0.8)  # seconds the server stays down
PATIENCE = 60.0  # a send may wait out a restart; the whole exchange settles within this


def options() -> Options:
    return Options(backoff=Backoff(base=0.05, cap=0.5), open_timeout=20.0, max_pending=SENDS)


async def member(session: Session, name: str, rng: random.Random, acked: dict[int, str]) -> None:
    """Send SENDS messages at random moments; record each one's seq."""
    for n in range(SENDS):
        await trio.sleep(rng.uniform(*SEND_GAP))
        text = f"{name}-{n}-{'é😀|' * rng.randint(0, 3)}"
        with trio.fail_after(PATIENCE):
            seq = await session.send(text)
        assert seq not in acked, (seq, text, acked[seq])
        acked[seq] = text


async def reader(session: Session, received: list[tuple[int, str]], check: Callable[[], None]) -> None:
    """Every message event the application gets, in `received`; `check` after each."""
    async for event in session:
        if isinstance(event, Message):
            received.append((event.seq, event.data))
            check()


async def faults(server: Server, rng: random.Random, done: trio.Event) -> list[str]:
    applied = []
    for _ in range(FAULTS):
        await trio.sleep(rng.uniform(*FAULT_GAP))
        if done.is_set():
            break
        kind = rng.choice(["kill", "drain"])
        if kind == "kill":
            server.kill()
        else:
            server.signal(signal.SIGTERM)
            assert await wait_exit(server) == 0, server.output()[-2000:]
        await trio.sleep(rng.uniform(*DOWN_FOR))
        await trio.to_thread.run_sync(server.start)
        applied.append(kind)
    return applied


@BOTH_STORES
async def test_two_members_through_kills_and_drains_get_every_message_once_in_order(
    tandem_factory: ServerFactory, store: str
) -> None:
    rng = random.Random(SEEDS[store])
    server = tandem_factory()
    a_acked: dict[int, str] = {}
    b_acked: dict[int, str] = {}
    a_got: list[tuple[int, str]] = []
    b_got: list[tuple[int, str]] = []
    applied: list[str] = []
    async with client.create(server.url, options()) as a, client.join(server.url, a.code, options()) as b:
        sending_done, settled = trio.Event(), trio.Event()

        def check() -> None:  # once sending is done: has each side all the other's acked messages?
            if sending_done.is_set() and len(a_got) >= len(b_acked) and len(b_got) >= len(a_acked):
                settled.set()

        async def run_faults() -> None:
            applied.extend(await faults(server, random.Random(rng.random()), sending_done))

        async with trio.open_nursery() as readers:
            readers.start_soon(reader, a, a_got, check)
            readers.start_soon(reader, b, b_got, check)
            async with trio.open_nursery() as senders:
                senders.start_soon(member, a, "a", random.Random(rng.random()), a_acked)
                senders.start_soon(member, b, "b", random.Random(rng.random()), b_acked)
                senders.start_soon(run_faults)
            sending_done.set()
            check()
            with trio.move_on_after(PATIENCE):  # settle: each side receives all the other's acked messages
                await settled.wait()
            readers.cancel_scope.cancel()
    assert applied, "no fault was applied"
    assert len(a_acked) == len(b_acked) == SENDS
    assert sorted(a_acked.keys() | b_acked.keys()) == list(range(1, 2 * SENDS + 1))  # one seq space, no gap
    assert b_got == sorted(a_acked.items()), "b got a's messages once each, in seq order, as sent"
    assert a_got == sorted(b_acked.items()), "a got b's messages once each, in seq order, as sent"
