"""Seeded, model-based chaos test of Tandem: real processes, random faults, every frame checked.

A seed makes a schedule of steps (client operations at once, now and then a fault:
kill -9, SIGTERM drain, SIGSTOP, Redis kill -9 or a Redis Cluster failover, cut
pub/sub connections, a session's deadline reached); the engine runs it against
`python server.py` and checks what clients see against bench/chaos_model.py,
presence included. A failing run is shrunk to its shortest failing prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.cluster
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from bench.chaos_model import (
    Excuse,
    MemberModel,
    Sent,
    SessionModel,
    View,
    excuse_problems,
    member_problems,
    presence_problems,
    reply_problems,
    view_problems,
)
from bench.chaos_procs import (
    CLUSTER_NODES,
    LOOPBACK,
    ChaosError,
    RedisCluster,
    RedisProcess,
    free_port,
    spawn,
    wait_listening,
)
from redis_store import expiry_bucket

ROOT = Path(__file__).resolve().parent.parent
HISTORY_SIZE = 20  # small, so that history is trimmed during a run
HASH_KEY = "chaos-test-hash-key-0123456789"
DRAIN_TIMEOUT = 12.0  # SIGTERM to exit; SHUTDOWN_GRACE is 5
HANDSHAKE_TIMEOUT = 5.0
REPLY_TIMEOUT = 6.0  # longer than any pause the schedule makes
SETTLE_TIMEOUT = 15.0  # the end of a run waits at most this for every message to arrive
SETTLE_ATTEMPTS = 12
RESEND_MAX = 200  # unacknowledged messages a resume resends at most
MAX_STEP_SECONDS = 30.0  # a step's waits add up to less
MAX_END_SECONDS = 300.0  # settling, checking and stopping take less
FAULT_TRAFFIC_EVERY = 0.04  # s between the messages sent while a fault acts
FAULT_TRAFFIC_ROUNDS = 1000
MAX_READS = 10_000_000  # reads of one socket; each run is bounded in time anyway
RECEIVE_BYTES = 65_536
DROPPED = 0  # our own close code for a socket the driver dropped
NO_CLOSE_FRAME = 1006
SWEEP_INTERVAL = 0.25  # s between expiry sweeps: a session past its deadline ends within this
# Presence: a member's peers are told it went on- or offline within PRESENCE_PROMPT
# s of a drop, resume, leave or drain; within PRESENCE_AFTER_FAULT s of a fault on
# Redis (an instance's kill -9: the dead-instance bound; Redis down or pub/sub
# cut: the listener's reconnect and resync); within the pause after a SIGSTOP.
PRESENCE_PROMPT = 3.0
PRESENCE_AFTER_FAULT = 10.0
CHECKPOINT_EVERY = 40
# Faults during which the store does not answer (some of it, on a cluster), and how
# long after one a connection that closes may still not be marked offline (redis-py
# finds a pooled connection to the old Redis dead only when it uses it).
STORE_OUTAGES = ("redis-kill9", "redis-pause", "failover", "seed-down")
OUTAGE_AFTERMATH = 5.0  # steps between quiet checkpoints, where the driver waits for presence to converge
# The expiry fault on Redis: a session's hard deadline moves to ARGV[1] (ms), if the session exists.
MOVE_DEADLINE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'ttl_at', ARGV[1])
return 1
"""
# Server log events that are a bug whenever they appear.
BAD_LOG_EVENTS = frozenset(
    {"connection.crashed", "connection.crash_callback_failed", "store.batch_failed", "redis.listener_crashed"}
)
# Characters for payloads: JSON escapes, line separators, astral planes, `|` (Redis entries).
ALPHABET = [*"abcXYZ019 |{}[],:", '"', "\\", "\n", "\t", "\x00", "\x1f", "\u2028", "\u2029", "é", "中", "😀"]

DEFAULT_SESSIONS = 4
DEFAULT_FAULT_RATE = 0.06
OP_WEIGHTS = {"send": 36, "resend": 12, "resume": 12, "drop": 10, "join": 10, "create": 6, "leave": 3}
SQLITE_FAULTS = {"kill9": 4, "drain": 3, "pause": 4, "expire": 2}
# "redis-pause" stops Redis (SIGSTOP) past the client's socket timeout: a request
# answered `unavailable` may still run when it continues.
REDIS_FAULTS = {"kill9": 3, "drain": 2, "pause": 3, "redis-kill9": 3, "redis-pause": 2, "pubsub-kill": 3, "expire": 2}
# On a Redis Cluster: "failover" kills a master with SIGKILL, "seed-down" the node
# named first in REDIS_URL, then restarts a Tandem instance while it is down.
CLUSTER_FAULTS = {"kill9": 2, "drain": 2, "pause": 2, "failover": 4, "seed-down": 2, "pubsub-kill": 2, "expire": 2}
FAULTS = {"sqlite": SQLITE_FAULTS, "redis": REDIS_FAULTS, "cluster": CLUSTER_FAULTS}


# --- the schedule: a pure function of the seed -------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a run is made of, besides its seed and length."""

    store: str = "sqlite"  # "sqlite", "redis" (one Redis) or "cluster" (a six-node Redis Cluster)
    instances: int = 1  # Tandem processes (1 with sqlite; 2 or 3 on Redis)
    sessions: int = DEFAULT_SESSIONS  # session slots the clients use
    fault_rate: float = DEFAULT_FAULT_RATE  # share of steps that carry a fault
    root: Path = ROOT  # the tree whose server.py runs (a broken copy, for bench/chaos_broken.py)
    seeds: int = CLUSTER_NODES  # cluster: the nodes REDIS_URL names
    ack_replicas: bool = True  # cluster: REDIS_ACK_REPLICAS=1 (an ack waits for a replica)
    # A member whose connection closed while the store was down may stay online for
    # its peers (a known limit); strict: that is a violation too.
    strict_presence: bool = False

    @property
    def redis(self) -> bool:
        return self.store != "sqlite"


@dataclass(frozen=True)
class Op:
    """A client operation; the engine maps it onto what exists when it runs.

    kind: create, join, send (both members, `count` messages each), resend
    (message `pick` of the member's), drop (`flag`: with a TCP reset), resume
    (on `instance`; `flag`: then resend what is unacknowledged), leave.
    """

    kind: str
    slot: int
    role: int
    instance: int
    count: tuple[int, int] = (1, 1)
    pick: float = 0.0
    flag: bool = False

    def __str__(self) -> str:
        extra = {"send": f" x{self.count}", "resend": f" pick={self.pick:.2f}", "drop": f" rst={self.flag}"}
        text = f"{self.kind} s{self.slot}.{'AB'[self.role]} @{self.instance}{extra.get(self.kind, '')}"
        return text + (" +resend" if self.kind == "resume" and self.flag else "")


@dataclass(frozen=True)
class Fault:
    """A fault `delay` s into its step: kill9 (of Tandem `instance`), drain, pause
    (for `duration` s), redis-kill9 (down for `duration` s), redis-pause (SIGSTOP
    for `duration` s), pubsub-kill, expire (the session of slot `target` reaches
    its deadline), failover (master `target` of a cluster), seed-down (the first
    node of REDIS_URL, while `instance` restarts)."""

    kind: str
    instance: int
    delay: float
    duration: float = 0.0
    target: int = 0

    def __str__(self) -> str:
        target = {"expire": f" s{self.target}", "failover": f" master {self.target}", "seed-down": f" @{self.instance}"}
        where = "" if self.kind.startswith(("redis", "pubsub")) else target.get(self.kind, f" @{self.instance}")
        return f"{self.kind}{where} after {self.delay:.2f}s" + (f" for {self.duration:.2f}s" if self.duration else "")


@dataclass(frozen=True)
class Step:
    index: int
    ops: tuple[Op, ...]
    fault: Fault | None

    def __str__(self) -> str:
        text = f"step {self.index}: " + "; ".join(map(str, self.ops))
        return text + (f"; FAULT {self.fault}" if self.fault else "")


def schedule(seed: int, steps: int, plan: Plan) -> list[Step]:
    """The first `steps` steps of seed `seed`: a prefix of any longer schedule of the same seed and plan."""
    rng = random.Random(seed)
    return [_step(rng, index, plan) for index in range(steps)]


def _step(rng: random.Random, index: int, plan: Plan) -> Step:
    ops = tuple(_op(rng, plan) for _ in range(rng.choice((1, 1, 2, 2, 3))))
    fault = _fault(rng, plan) if rng.random() < plan.fault_rate else None
    return Step(index, ops, fault)


def _op(rng: random.Random, plan: Plan) -> Op:
    kind = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
    return Op(
        kind,
        slot=rng.randrange(plan.sessions),
        role=rng.randrange(2),
        instance=rng.randrange(plan.instances),
        count=(_count(rng), _count(rng)),
        pick=rng.random(),
        flag=rng.random() < 0.5,
    )


def _count(rng: random.Random) -> int:
    """Messages one member sends in a step: a few, now and then a burst longer than history."""
    return rng.randint(HISTORY_SIZE // 2, HISTORY_SIZE + 5) if rng.random() < 0.08 else rng.randint(0, 4)


def _fault(rng: random.Random, plan: Plan) -> Fault:
    table = FAULTS[plan.store]
    kind = rng.choices(list(table), weights=list(table.values()))[0]
    duration = {"pause": rng.uniform(0.1, 1.5), "kill9": rng.uniform(0.0, 0.3), "redis-kill9": rng.uniform(0.0, 1.0)}
    duration["redis-pause"] = rng.uniform(2.2, 4.0)
    instance, delay = rng.randrange(plan.instances), round(rng.uniform(0.0, 0.1), 3)
    return Fault(kind, instance, delay, round(duration.get(kind, 0), 3), rng.randrange(max(plan.sessions, 3)))


# --- Tandem instances ------------------------------------------------------------------


class Instance:
    """One `python server.py`: restarted in place (same DATA_DIR), on a new port, each with a new log."""

    def __init__(self, index: int, root: Path, workdir: Path, settings: dict[str, str]) -> None:
        self.index = index
        self.root = root
        self.workdir = workdir
        self.data_dir = workdir / f"data-{index}"
        self.settings = settings
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.paused = False
        self.expected_exit = False  # set before the driver stops it
        self.logs: list[Path] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        self.incarnation += 1
        self.port = free_port()
        self.expected_exit = False
        self.paused = False
        log_path = self.workdir / f"tandem-{self.index}-{self.incarnation}.log"
        self.logs.append(log_path)
        drop = ("TANDEM_", "REDIS_", "DATABASE_URL", "RATE_LIMIT", "PORT", "HOST", "DATA_DIR", "LOG_", "HISTORY")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(self.settings, PORT=str(self.port), HOST=LOOPBACK, DATA_DIR=str(self.data_dir))
        # cwd: not the tree, so that a developer's .env does not leak in
        self.proc = spawn([sys.executable, str(self.root / "server.py")], log_path, env, self.workdir)
        await wait_listening(self.port, self.proc, f"tandem {self.index}")

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill9(self) -> None:
        self.expected_exit = True
        self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def drain(self) -> int | None:
        """SIGTERM and wait for the exit code; None when it did not exit in time (then killed)."""
        self.expected_exit = True
        self.resume()
        self.signal(signal.SIGTERM)
        deadline = trio.current_time() + DRAIN_TIMEOUT
        for _ in range(int(DRAIN_TIMEOUT / 0.02) + 1):
            if self.proc is None or self.proc.poll() is not None or trio.current_time() > deadline:
                break
            await trio.sleep(0.02)
        if self.running:
            self.kill9()
            return None
        return None if self.proc is None else self.proc.returncode

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.signal(signal.SIGCONT)
            self.paused = False


# --- a WebSocket client with an abrupt drop --------------------------------------------------


class WireError(Exception):
    pass


class Wire:
    """One client WebSocket over wsproto: text frames in and out, pings answered, abrupt drops."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.close_code: int | None = None
        self._lock = trio.Lock()
        self._parts: list[str] = []
        self._early: list[str] = []  # text that arrived with the handshake's answer

    @classmethod
    async def open(cls, port: int) -> Wire:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            wire = cls(stream)
            try:
                await stream.send_all(wire.ws.send(Request(host=f"{LOOPBACK}:{port}", target="/ws")))
                for _ in range(1000):
                    data = await stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        raise WireError("closed during the handshake")
                    wire.ws.receive_data(data)
                    events = list(wire.ws.events())
                    for n, event in enumerate(events):
                        if isinstance(event, RejectConnection):
                            raise WireError(f"refused with HTTP {event.status_code}")
                        if isinstance(event, AcceptConnection):
                            wire._early = await wire._handle(events[n + 1 :])
                            return wire
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        raise WireError("no answer to the handshake")

    async def send(self, text: str) -> None:
        if self.close_code is not None:
            raise WireError("closed")
        await self._write(self.ws.send(TextMessage(data=text)))

    async def _write(self, data: bytes) -> None:
        try:
            async with self._lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise WireError(repr(exc)) from None

    async def receive(self) -> list[str]:
        """The next text messages; [] with `close_code` set once the socket is closed."""
        if self._early:
            early, self._early = self._early, []
            return early
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            if self.close_code is None:
                self.close_code = NO_CLOSE_FRAME
            return []
        self.ws.receive_data(data)
        return await self._handle(list(self.ws.events()))

    async def _handle(self, events: list[Any]) -> list[str]:
        texts = []
        for event in events:
            if isinstance(event, TextMessage):
                self._parts.append(event.data)
                if event.message_finished:
                    texts.append("".join(self._parts))
                    self._parts.clear()
            elif isinstance(event, Ping):
                with contextlib.suppress(WireError):
                    await self._write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_code = int(event.code)
                with contextlib.suppress(WireError, Exception):
                    await self._write(self.ws.send(event.response()))
                await trio.aclose_forcefully(self.stream)
            elif isinstance(event, BytesMessage):
                raise WireError("the server sent a binary frame")
        return texts

    async def drop(self, reset: bool) -> None:
        """Gone without a close frame: FIN, or with `reset` an RST (SO_LINGER 0)."""
        self.close_code = DROPPED
        if reset:
            with contextlib.suppress(OSError):
                self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(self.stream)


# --- the engine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    step: int  # -1: start-up; the number of steps: the end of the run
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.kind}: {self.detail}"


@dataclass(eq=False)
class Slot:
    """A place for one session and its two members (roles A and B)."""

    index: int
    session: SessionModel | None = None
    roles: list[MemberModel | None] = field(default_factory=lambda: [None, None])
    busy: set[int] = field(default_factory=set)  # roles whose create or join is in flight
    ghost: bool = False  # a join whose reply was lost may hold a place
    stale_ghost: bool = False  # ... and, lost in a store outage, may stay online (docs/architecture.md, Known limits)
    full: bool = False  # ... and one did: a join got session_full

    def members(self) -> list[tuple[int, MemberModel]]:
        return [(r, m) for r, m in enumerate(self.roles) if m is not None and m.state != "left"]

    def clear(self) -> None:
        """No session here any more: the next operation on the slot creates one."""
        self.session, self.roles, self.busy = None, [None, None], set()
        self.ghost = self.stale_ghost = self.full = False


@dataclass(eq=False)
class Pending:
    """A request waiting for its reply."""

    kind: str  # create, join, resume, send, leave
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None
    sent: Sent | None = None
    member: MemberModel | None = None
    slot: Slot | None = None
    role: int = 0
    known_max: int = 0  # newest seq known stored when it was sent
    baseline: int = 0  # a resume's last_seq
    session: SessionModel | None = None  # the session it is about (a join's, when it was sent)


@dataclass(eq=False)
class Link:
    """One client connection and the member it holds."""

    number: int
    instance: int
    wire: Wire
    view: View | None = None
    pending: dict[int, Pending] = field(default_factory=dict)
    closed: trio.Event = field(default_factory=trio.Event)
    close_code: int | None = None
    superseded: bool = False  # its member resumed on another connection (a takeover), or may have
    # When a send of this connection got `not_found` though no takeover is known
    # to have succeeded (a resume answered `unavailable` may have run; on Redis
    # its instance may have been declared dead): the server must close it (1000
    # after a takeover, 1012 after an eviction) within the presence bound.
    refused_at: float | None = None

    @property
    def in_session(self) -> bool:
        return self.close_code is None and self.view is not None and not self.view.left


@dataclass(frozen=True)
class Action:
    """An operation resolved against the current state: who does what."""

    kind: str
    slot: Slot
    role: int
    instance: int = 0
    member: MemberModel | None = None
    count: int = 1
    sent: Sent | None = None
    flag: bool = False


class Engine:
    """Runs a schedule against real processes and checks each frame against the model."""

    def __init__(self, plan: Plan, seed: int, workdir: Path) -> None:
        self.plan = plan
        self.seed = seed
        self.workdir = workdir
        self.redis = RedisProcess(workdir / "redis") if plan.store == "redis" else None
        self.cluster = RedisCluster(workdir / "cluster") if plan.store == "cluster" else None
        settings = {
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "json",
            "RATE_LIMIT_ENABLED": "0",
            "MAX_SOCKETS_IP": "0",
            "HISTORY_SIZE": str(HISTORY_SIZE),
            "SHUTDOWN_GRACE": "5",
            "HASH_KEY": HASH_KEY,
            "SWEEP_INTERVAL": str(SWEEP_INTERVAL),
        }
        if self.redis is not None:
            settings["REDIS_URL"] = self.redis.url
        if self.cluster is not None:
            settings |= {"REDIS_URL": self.cluster.url(plan.seeds), "REDIS_CLUSTER": "1"}
            settings["REDIS_ACK_REPLICAS"] = "1" if plan.ack_replicas else "0"
        self.instances = [Instance(n, plan.root, workdir, settings) for n in range(plan.instances)]
        self.slots = [Slot(n) for n in range(plan.sessions)]
        self.links: list[Link] = []
        self.views: list[View] = []
        self.current: dict[MemberModel, Link] = {}
        self.violations: list[Violation] = []
        self.stats: Counter[str] = Counter()
        self.step = -1
        self._ids = itertools.count(1)
        self._links = itertools.count(1)
        self._messages = itertools.count(1)
        self._log_offsets: dict[Path, int] = {}
        self._reported: set[str] = set()
        self._nursery: trio.Nursery | None = None
        # Presence: (start, end) of the time after each fault in which presence may
        # lag (trio time); when each mismatch was first seen; those reported.
        self.graces: list[tuple[float, float]] = []
        self.outage_started: float | None = None  # a store outage in progress since (trio time)
        self.outage_ended = -math.inf
        self.stale_excused: set[str] = set()  # members seen online by a peer after a close in an outage
        self._mismatch_since: dict[tuple[int, str], float] = {}
        self._presence_reported: set[tuple[int, str]] = set()

    # -- violations and stats --

    def violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(self.step, kind, detail))

    def problems(self, kind: str, problems: list[str]) -> None:
        for problem in problems:
            self.violate(kind, problem)

    # -- the run --

    async def run(self, steps: list[Step], step_deadline: float) -> int:
        """Start everything, run the steps (until `step_deadline`, trio time, or the first violation),
        settle and check; return the number of steps run."""
        done = 0
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if self.redis is not None:
                    await self.redis.start()
                if self.cluster is not None:
                    await self.cluster.start()
                for instance in self.instances:
                    await instance.start()
                for step in steps:
                    if trio.current_time() > step_deadline or self.violations:
                        break
                    self.step = step.index
                    await self.execute(step)
                    done += 1
                    await self.after_step()
                    if done % CHECKPOINT_EVERY == 0 or (step.fault is not None and self.lagging(step.fault)):
                        await self.checkpoint()
                    else:
                        self.check_presence()
                self.step = done  # what the end of the run finds is reported after the last step run
                await self.settle()
                await self.checkpoint()
                self.final_checks()
                await self.shutdown()
            finally:
                for instance in self.instances:
                    instance.resume()
                    instance.kill9()
                if self.redis is not None:
                    self.redis.stop()
                if self.cluster is not None:
                    self.cluster.stop()
                nursery.cancel_scope.cancel()
        self.scan_logs()
        return done

    async def execute(self, step: Step) -> None:
        claimed: set[tuple[int, int]] = set()
        actions = [action for op in step.ops for action in self.resolve(op, claimed)]
        async with trio.open_nursery() as nursery:
            for action in actions:
                nursery.start_soon(self.act, action)
            if step.fault is not None:
                nursery.start_soon(self.fault_with_traffic, step.fault)

    async def after_step(self) -> None:
        for instance in self.instances:
            instance.resume()
            if not instance.running:
                if not instance.expected_exit:
                    code = instance.proc.returncode if instance.proc is not None else None
                    self.violate("crash", f"instance {instance.index} exited on its own with {code}")
                await instance.start()
        if self.redis is not None and not self.redis.running:
            await self.redis.start()
        if self.cluster is not None and not self.cluster.running:
            await self.cluster.heal()
        for slot in self.slots:  # a session that expired: its slot gets a new one
            if slot.session is not None and slot.session.expiring:
                slot.clear()
        for link in self.links:  # a connection whose session expired is in none: the client closes it
            if link.close_code is None and link.view is not None and link.view.expired is not None:
                await link.wire.drop(reset=False)
        self.links = [link for link in self.links if not link.closed.is_set()]
        self.scan_logs()

    # -- presence: what each connection believes of its peers --

    def slot_of(self, session: SessionModel) -> Slot | None:
        return next((slot for slot in self.slots if slot.session is session), None)

    def presence_mismatches(self) -> dict[tuple[int, str], str]:
        """Where an open connection that holds a member believes other than the truth of a
        peer, by (connection, peer); and (connection, "") for a connection refused for its
        member (its member moved elsewhere) that the server has not closed."""
        found = {}
        for link in self.links:
            view = link.view
            if view is None or not link.in_session or link.close_code is not None:
                continue
            if link.refused_at is not None:
                found[(link.number, "")] = f"{view.label} got not_found for its member's send, yet stays open"
            member, session = view.member, view.member.session
            slot = self.slot_of(session)
            if session.expiring or slot is None or member.state != "member" or self.current.get(member) is not link:
                continue
            truth: dict[str, bool | None] = {}
            for _, peer in slot.members():
                online = self.online(peer)
                stale = peer.stale_online and not online and not self.plan.strict_presence
                if stale and view.peers.get(peer.client_id):
                    self.stale_excused.add(peer.client_id)
                if peer is not member:
                    truth[peer.client_id] = None if peer.state == "uncertain" or stale else online
            ghost = bool(slot.busy) or (slot.stale_ghost and not self.plan.strict_presence)
            for client_id, problem in presence_problems(view, truth, session.left, ghost):
                found[(link.number, client_id)] = f"{view.label} of {member.client_id} in {session.code} {problem}"
        return found

    def presence_deadline(self, since: float) -> float:
        """A mismatch first seen at `since` must be gone by this (trio time): the prompt
        bound, extended to the end of the grace of any fault that acted meanwhile."""
        deadline = since + PRESENCE_PROMPT
        for start, end in sorted(self.graces):
            if start <= deadline:
                deadline = max(deadline, end)
        return deadline

    def check_presence(self) -> bool:
        """Judge presence now: a mismatch that lasted past its deadline is a violation
        (reported once). True when no mismatch is still within its bound."""
        now = trio.current_time()
        self.graces = [(start, end) for start, end in self.graces if end > now - 120]
        found = self.presence_mismatches()
        for key in [key for key in self._mismatch_since if key not in found]:
            del self._mismatch_since[key]
        waiting = False
        for key, problem in found.items():
            since = self._mismatch_since.setdefault(key, now)
            if now <= self.presence_deadline(since):
                waiting = True
            elif key not in self._presence_reported:
                self._presence_reported.add(key)
                self.violate("presence", f"{problem} ({now - since:.1f}s)")
        return not waiting

    async def checkpoint(self) -> None:
        """A quiet moment: no operation runs while the driver waits until every connection
        believes the truth of its peers, or the bound of each mismatch passed."""
        self.stats["presence checkpoints"] += 1
        started = trio.current_time()
        limit = PRESENCE_AFTER_FAULT + PRESENCE_PROMPT + 1
        for _ in range(int(limit / 0.05) + 1):
            if self.check_presence() or trio.current_time() > started + limit:
                break
            await trio.sleep(0.05)
        self.stats["presence checkpoint wait (s)"] += round(trio.current_time() - started)

    # -- resolving an op against the current state --

    def online(self, member: MemberModel) -> bool:
        link = self.current.get(member)
        return member.state == "member" and link is not None and link.in_session

    def resolve(self, op: Op, claimed: set[tuple[int, int]]) -> list[Action]:
        """What `op` means now: a slot without a session creates one, a session with
        a free place is joined, an offline member resumes first. Each member acts
        at most once per step (`claimed` holds (slot, role))."""
        slot = self.slots[op.slot % len(self.slots)]
        instance = op.instance % len(self.instances)

        def claim(role: int) -> bool:
            if (slot.index, role) in claimed:
                return False
            claimed.add((slot.index, role))
            return True

        if slot.session is None:
            if slot.busy or not (claim(0) and claim(1)):
                return []
            slot.busy.add(0)
            return [Action("create", slot, 0, instance)]
        if op.kind in ("create", "join"):
            free = [r for r in (0, 1) if slot.roles[r] is None and r not in slot.busy]
            if free and not slot.full and claim(free[0]):
                slot.busy.add(free[0])
                return [Action("join", slot, free[0], instance)]
            op = replace(op, kind="send", count=(1, 1))  # no place: its members talk instead
        if op.kind == "send":  # by the members online: the others miss messages, and history moves on
            return [
                Action("send", slot, r, instance, m, count=op.count[r])
                for r, m in slot.members()
                if self.online(m) and claim(r)
            ]
        role = op.role if slot.roles[op.role] is not None else 1 - op.role
        member = slot.roles[role]
        if member is None or member.state == "left" or not claim(role):
            return []
        if op.kind == "resend" and member.sends:
            sent = member.sends[int(op.pick * len(member.sends))]
            return [self._member_action("resend", slot, role, member, instance, sent=sent)]
        kind = "send" if op.kind == "resend" else op.kind
        return [self._member_action(kind, slot, role, member, instance, flag=op.flag)]

    def _member_action(
        self,
        kind: str,
        slot: Slot,
        role: int,
        member: MemberModel,
        instance: int,
        flag: bool = False,
        sent: Sent | None = None,
    ) -> Action:
        """`kind` by `member`, which first resumes (and resends) when it is not online."""
        if kind != "resume" and not self.online(member):
            return Action("resume", slot, role, instance, member, flag=True)
        return Action(kind, slot, role, instance, member, sent=sent, flag=flag)

    # -- client operations --

    async def act(self, action: Action) -> None:
        member = action.member
        match action.kind:
            case "create":
                await self.create(action.slot, action.instance)
            case "join":
                await self.join(action.slot, action.role, action.instance)
            case "send" if member is not None:
                await self.send(member, [self.new_message(member) for _ in range(action.count)])
            case "resend" if member is not None and action.sent is not None:
                self.stats["resends"] += 1
                await self.send(member, [action.sent])
            case "drop" if member is not None:
                await self.drop(member, action.flag)
            case "resume" if member is not None:
                await self.resume(member, action.instance, action.flag)
            case "leave" if member is not None:
                await self.leave(member)

    async def connect(self, index: int) -> Link | None:
        instance = self.instances[index]
        if not instance.running:
            self.stats["connect to a stopped instance"] += 1
            return None
        try:
            wire = await Wire.open(instance.port)
        except (WireError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.stats[f"connect failed: {type(exc).__name__}"] += 1
            return None
        link = Link(next(self._links), index, wire)
        self.links.append(link)
        assert self._nursery is not None
        self._nursery.start_soon(self.read, link)
        return link

    async def request(self, link: Link, pending: Pending, frame: dict[str, Any]) -> Pending:
        if link.close_code is not None:
            self.lost(link, pending)
            return pending
        rid = next(self._ids)
        link.pending[rid] = pending
        with contextlib.suppress(WireError):  # the reader sees the close and gives the request up
            await link.wire.send(orjson.dumps({"id": rid, **frame}).decode())
        return pending

    @staticmethod
    async def wait(pendings: list[Pending], within: float = REPLY_TIMEOUT) -> None:
        with trio.move_on_after(within):
            for pending in pendings:
                await pending.done.wait()

    @staticmethod
    async def close(link: Link) -> None:
        if link.close_code is None:
            await link.wire.drop(reset=False)
        with trio.move_on_after(2):
            await link.closed.wait()

    async def create(self, slot: Slot, instance: int) -> None:
        link = await self.connect(instance)
        if link is None:
            slot.busy.discard(0)
            return
        pending = await self.request(link, Pending("create", slot=slot, role=0), {"type": "session:create"})
        await self.wait([pending])
        if pending.done.is_set() and not link.in_session:
            await self.close(link)

    async def join(self, slot: Slot, role: int, instance: int) -> None:
        assert slot.session is not None
        link = await self.connect(instance)
        if link is None:
            slot.busy.discard(role)
            return
        pending = Pending("join", slot=slot, role=role, known_max=slot.session.stored_max, session=slot.session)
        await self.request(link, pending, {"type": "session:join", "code": slot.session.code})
        await self.wait([pending])
        if pending.done.is_set() and not link.in_session:
            await self.close(link)

    def new_message(self, member: MemberModel) -> Sent:
        number = next(self._messages)
        rng = random.Random(f"{self.seed}:{number}")
        mid = f"m{number}" if rng.random() < 0.7 else f"m|{number}|{rng.choice(ALPHABET)}"
        sent = member.session.new_send(member.client_id, mid, payload(rng, number))
        member.sends.append(sent)
        return sent

    async def send(self, member: MemberModel, messages: list[Sent]) -> bool:
        """Send (or resend) `messages` pipelined on the member's connection; True when all were acked."""
        link = self.current.get(member)
        if link is None or not messages:
            return not messages
        pendings = []
        for sent in messages:
            member.session.issued += 1
            sent.first_issue = sent.first_issue or member.session.issued
            sent.frames += 1
            self.stats["sends"] += 1
            frame = {"type": "message:send", "data": orjson.Fragment(sent.raw), "mid": sent.mid}
            pending = Pending("send", sent=sent, member=member, session=member.session)
            pendings.append(await self.request(link, pending, frame))
        await self.wait(pendings)
        return all(p.reply is not None and p.reply.get("type") == "message:ack" for p in pendings)

    async def drop(self, member: MemberModel, reset: bool) -> None:
        link = self.current.pop(member, None)
        if link is None:
            return
        self.stats["drops"] += 1
        await link.wire.drop(reset)
        with trio.move_on_after(2):
            await link.closed.wait()

    async def resume(self, member: MemberModel, instance: int, resend: bool) -> bool:
        """Resume on `instance` with the last seq seen (a takeover if it is online
        elsewhere); then, with `resend`, resend every unacknowledged message. True when all of it worked."""
        link = await self.connect(instance)
        if link is None:
            return False
        session = member.session
        previous = self.current.get(member)
        if previous is not None:
            previous.superseded = True  # from now on it may be told it no longer holds the member
        pending = Pending("resume", member=member, known_max=session.stored_max, baseline=member.last_seen)
        pending.session = session
        frame: dict[str, Any] = {"type": "session:resume", "code": session.code, "client_id": member.client_id}
        frame |= {"token": member.token, "last_seq": member.last_seen}
        await self.request(link, pending, frame)
        await self.wait([pending])
        if not link.in_session:
            reply = pending.reply or {}
            if previous is not None and reply.get("type") == "error" and reply.get("code") != "unavailable":
                previous.superseded = False  # refused: nothing was taken over (`unavailable`: it may have been)
            if pending.done.is_set():
                await self.close(link)
            return False
        if not resend:
            return True
        unacked = [sent for sent in member.sends if not sent.acked][-RESEND_MAX:]
        self.stats["resends"] += len(unacked)
        return await self.send(member, unacked)

    async def leave(self, member: MemberModel) -> None:
        link = self.current.get(member)
        if link is None:
            return
        member.state = "uncertain"  # until the reply says whether it left
        pending = Pending("leave", member=member, session=member.session)
        await self.request(link, pending, {"type": "session:leave"})
        await self.wait([pending])
        if pending.reply is not None and pending.reply.get("type") == "session:left":
            await self.close(link)

    # -- faults --

    async def fault_with_traffic(self, fault: Fault) -> None:
        """The fault, while the members online keep sending (one message every
        FAULT_TRAFFIC_EVERY s, slot after slot, none waiting for its ack), so
        that some are in flight when it strikes and some meet the outage."""
        finished = trio.Event()

        async def strike() -> None:
            try:
                await self.fault(fault)
            finally:
                finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(strike)
            for n in range(FAULT_TRAFFIC_ROUNDS):
                if finished.is_set():
                    break
                slot = self.slots[n % len(self.slots)]
                online = [m for _, m in slot.members() if self.online(m)]
                if online:
                    member = online[n // len(self.slots) % len(online)]
                    nursery.start_soon(self.send, member, [self.new_message(member)])
                await trio.sleep(FAULT_TRAFFIC_EVERY)

    async def fault(self, fault: Fault) -> None:
        await trio.sleep(fault.delay)
        self.stats[f"fault {fault.kind}"] += 1
        instance = self.instances[fault.instance % len(self.instances)]
        started = trio.current_time()
        if fault.kind in STORE_OUTAGES:
            self.outage_started = started
        match fault.kind:
            case "kill9":
                instance.kill9()
                await trio.sleep(fault.duration)
                await instance.start()
            case "drain":
                await self.drain(instance)
                await instance.start()
            case "pause":
                instance.pause()
                await trio.sleep(fault.duration)
                instance.resume()
            case "redis-kill9" if self.redis is not None:
                self.redis.kill9()
                await self.drop_one(fault.target)  # a client goes away while Redis is down
                await trio.sleep(fault.duration)
                await self.redis.start()
            case "redis-pause" if self.redis is not None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.redis.pause, fault.duration)
                    nursery.start_soon(self.drop_one, fault.target)
            case "pubsub-kill" if self.redis is not None:
                self.stats["pub/sub connections cut"] += await self.redis.cut_pubsub()
            case "pubsub-kill" if self.cluster is not None:
                self.stats["pub/sub connections cut"] += await self.cluster.cut_pubsub()
            case "failover" if self.cluster is not None:
                async with trio.open_nursery() as nursery:  # a client goes away during the failover
                    nursery.start_soon(self.cluster.kill_master, fault.target)
                    nursery.start_soon(self.drop_one, fault.target)
                await self.cluster.heal()
            case "seed-down" if self.cluster is not None:
                await self.seed_down(instance)
            case "expire":
                await self.expire(self.slots[fault.target % len(self.slots)])
        if fault.kind in STORE_OUTAGES:
            self.outage_started, self.outage_ended = None, trio.current_time()
        # Presence may lag a fault: on Redis by the dead-instance bound, or the
        # listener's reconnect and resync; else by the prompt bound after it ended.
        self.graces.append(
            (started, trio.current_time() + (PRESENCE_AFTER_FAULT if self.lagging(fault) else PRESENCE_PROMPT))
        )

    def lagging(self, fault: Fault) -> bool:
        """Presence may take the dead-instance bound to converge after this fault."""
        return fault.kind in (*STORE_OUTAGES, "pubsub-kill") or (fault.kind == "kill9" and self.plan.redis)

    async def drop_one(self, pick: int) -> None:
        """Drop the socket of online member number `pick` (of those online, by slot and role)."""
        online = [m for slot in self.slots for _, m in slot.members() if self.online(m)]
        if online:
            await self.drop(online[pick % len(online)], reset=False)

    async def drain(self, instance: Instance) -> None:
        """SIGTERM: the instance must drain and exit with 0."""
        code = await instance.drain()
        if code != 0:
            self.violate("drain", f"instance {instance.index} exited with {code} after SIGTERM (expected 0)")

    async def seed_down(self, instance: Instance) -> None:
        """The node named first in REDIS_URL dies (a master fails over); an instance
        restarts meanwhile and must start; then the node comes back as a replica."""
        assert self.cluster is not None
        seed = self.cluster.nodes[0]
        await self.cluster.kill_node(seed)
        await self.drain(instance)
        try:
            await instance.start()
        except ChaosError as exc:
            instance.expected_exit = True  # reported here; the next step starts it again
            self.violate("start", f"instance {instance.index} did not start while {seed.address} was down: {exc}")
        await self.cluster.heal()

    async def expire(self, slot: Slot) -> None:
        """The session of `slot` reaches its hard deadline now: the driver moves its
        `ttl_at` in the store (the SQLite file; the session hash and its expiry index
        on Redis), and the sweeper ends it. Its members may get `session:expired` and
        `not_found` from now on; what was acked before must have reached the peer."""
        session = slot.session
        if session is None or session.expiring:
            self.stats["expire: no session in the slot"] += 1
            return
        # Marked first: a request refused by the new deadline may be answered before the write returns.
        session.expiring = True
        for _, member in slot.members():
            member.state = "expired"
        now = time.time_ns() // 1_000_000
        try:
            moved = await trio.to_thread.run_sync(self._move_deadline, session.code, now)
        except (sqlite3.Error, redis.RedisError) as exc:  # it may or may not have happened
            self.stats[f"expire: the write failed ({type(exc).__name__})"] += 1
            return
        self.stats["expire: deadline moved" if moved else "expire: the session was gone"] += 1

    def _move_deadline(self, code: str, now: int) -> bool:
        """Set the session's `ttl_at` to `now` (ms) in the store (blocking); False if it is gone."""
        if not self.plan.redis:
            db = sqlite3.connect(self.instances[0].data_dir / "tandem.sqlite3", timeout=10, isolation_level=None)
            try:
                return db.execute("UPDATE sessions SET ttl_at = ? WHERE code = ?", (now, code)).rowcount > 0
            finally:
                db.close()
        client: redis.Redis | redis.cluster.RedisCluster
        if self.cluster is not None:
            client = self.cluster.client()
        else:
            assert self.redis is not None
            client = self.redis.client()
        try:
            # Only a session that still exists: HSET alone would make a stray hash.
            moved = client.eval(MOVE_DEADLINE, 1, f"tandem:{{{code}}}:s", now)
            if moved:
                client.zadd(expiry_bucket(code), {code: now}, xx=True)
            return bool(moved)
        finally:
            client.close()

    # -- what arrives on a connection --

    async def read(self, link: Link) -> None:
        try:
            for _ in range(MAX_READS):
                for text in await link.wire.receive():
                    self.on_frame(link, text)
                if link.wire.close_code is not None:
                    break
        except WireError as exc:
            self.violate("frame", f"connection {link.number}: {exc}")
        finally:
            code = link.wire.close_code if link.wire.close_code is not None else NO_CLOSE_FRAME
            link.close_code = code
            self.stats[f"close {code if code != DROPPED else 'dropped by the client'}"] += 1
            if code == 1011:
                self.violate("close 1011", f"connection {link.number} on instance {link.instance}")
            if link.view is not None:
                link.view.closed, link.view.cut = code, code in (DROPPED, NO_CLOSE_FRAME)
                self.check_view(link.view)
            if self.in_outage():
                self.closed_in_outage(link)
            for pending in link.pending.values():
                self.lost(link, pending)
            link.pending.clear()
            if link.view is not None and self.current.get(link.view.member) is link:
                del self.current[link.view.member]
            await trio.aclose_forcefully(link.wire.stream)
            link.closed.set()

    def in_outage(self) -> bool:
        """The store is down (or its cluster fails over), or was a moment ago: a
        connection closing now may not be marked offline by the server."""
        return self.outage_started is not None or trio.current_time() < self.outage_ended + OUTAGE_AFTERMATH

    def closed_in_outage(self, link: Link) -> None:
        """`link` closed during a store outage: its member, or the member its join or
        resume may have made, may stay online for its peers (docs/architecture.md, Known limits)."""
        if link.view is not None:
            link.view.member.stale_online = True
        for pending in link.pending.values():
            if pending.kind == "resume" and pending.member is not None:
                pending.member.stale_online = True
            elif pending.kind == "join" and pending.slot is not None and pending.slot.session is pending.session:
                pending.slot.stale_ghost = True

    def lost(self, link: Link, pending: Pending) -> None:
        """A request whose reply will never come: its outcome is unknown."""
        self.stats[f"reply lost: {pending.kind}"] += 1
        if pending.slot is not None:
            pending.slot.busy.discard(pending.role)
            if pending.kind == "join":
                pending.slot.ghost = True  # it may have joined: a member nobody can resume
            self.tidy(pending.slot)
        pending.done.set()  # a leave stays "uncertain": the next resume tells

    def on_frame(self, link: Link, text: str) -> None:
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.violate("frame", f"not JSON: {text[:200]!r}")
            return
        if not isinstance(frame, dict):
            self.violate("frame", f"not an object: {text[:200]!r}")
            return
        rid = frame.get("id")
        if rid is not None:
            pending = link.pending.pop(rid, None)
            if pending is None:
                self.violate("frame", f"a reply to no request: {text[:200]}")
                return
            pending.reply = frame
            self.on_reply(link, pending, frame)
            pending.done.set()
            return
        kind = frame.get("type")
        if kind == "message":
            self.on_message(link, frame, text)
        elif kind in ("session:presence", "session:paired", "session:peer_left", "session:expired"):
            self.on_event(link, str(kind), frame, text)
        else:
            self.violate("frame", f"unexpected event on connection {link.number}: {text[:200]}")

    def on_event(self, link: Link, kind: str, frame: dict[str, Any], text: str) -> None:
        """A session event: what the connection now believes of its peers, or the session's end."""
        view = link.view
        if view is None or view.left:
            self.violate("frame", f"{kind} on connection {link.number}, in no session: {text[:200]}")
            return
        self.stats[kind + ("" if kind != "session:presence" else f" {frame.get('online')}")] += 1
        me, session = view.member.client_id, view.member.session
        match kind:
            case "session:presence":
                view.peers[str(frame.get("client_id"))] = frame.get("online") is True
            case "session:paired":
                view.peers = peers_of(frame.get("clients"), me)
            case "session:peer_left":
                view.peers.pop(str(frame.get("client_id")), None)
            case "session:expired":
                reason = frame.get("reason")
                if frame.get("code") != session.code or reason not in ("idle", "ttl"):
                    self.violate("expiry", f"connection {link.number} in {session.code}: {text[:200]}")
                elif not session.expiring:
                    self.violate(
                        "expiry",
                        f"{session.code} expired ({reason}) on connection {link.number}, far from its deadline",
                    )
                view.expired, view.left = str(reason), True

    def on_reply(self, link: Link, pending: Pending, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "error":
            self.on_error(link, pending, str(frame.get("code")))
            return
        expected = {
            "create": "session:created",
            "join": "session:joined",
            "resume": "session:resumed",
            "send": "message:ack",
            "leave": "session:left",
        }[pending.kind]
        if kind != expected:
            self.violate("reply", f"{pending.kind} answered with {frame}")
            return
        self.stats[f"{pending.kind} ok"] += 1
        if pending.kind == "create" and pending.slot is not None:
            session = SessionModel(str(frame["code"]), HISTORY_SIZE)
            member = MemberModel(session, str(frame["client_id"]), str(frame["token"]), horizon=0)
            pending.slot.session, pending.slot.roles[pending.role] = session, member
            pending.slot.busy.discard(pending.role)
            self.enter(link, View(member, "create", 0, 0))
        elif pending.kind == "join" and pending.slot is not None and pending.session is not None:
            session, last_seq = pending.session, int(frame["last_seq"])
            if frame.get("code") != session.code:
                self.violate("reply", f"joined {frame.get('code')} when asking for {session.code}")
            member = MemberModel(session, str(frame["client_id"]), str(frame["token"]), max(0, last_seq - HISTORY_SIZE))
            if pending.slot.session is session and not session.expiring:
                pending.slot.roles[pending.role] = member
                pending.slot.busy.discard(pending.role)
            else:
                member.state = "expired"  # it joined a session whose deadline the driver moved meanwhile
            view = View(member, "join", 0, last_seq, peers=peers_of(frame.get("clients"), member.client_id))
            self.problems("join", reply_problems(view, pending.known_max, None))
            self.enter(link, view)
        elif pending.kind == "resume" and pending.member is not None:
            member, last_seq, recovered = pending.member, int(frame["last_seq"]), frame.get("recovered") is True
            view = View(
                member, "resume", pending.baseline, last_seq, peers=peers_of(frame.get("clients"), member.client_id)
            )
            self.problems("resume", reply_problems(view, pending.known_max, recovered))
            if not recovered:
                self.stats["resumed with recovered: false"] += 1
                lost_to = last_seq - HISTORY_SIZE
                member.excuses.append(Excuse(pending.baseline, lost_to, "resume reported recovered: false"))
            if member.state == "uncertain":
                member.state = "member"  # its leave did not happen
            self.enter(link, view)
        elif pending.kind == "send" and pending.sent is not None and pending.member is not None:
            duplicate = frame.get("duplicate") is True
            self.stats["acks (duplicate)" if duplicate else "acks"] += 1
            self.problems("ack", pending.member.session.acked(pending.sent, int(frame["seq"]), duplicate))
        elif pending.kind == "leave" and pending.member is not None:
            self.on_left(link, pending.member)

    def on_error(self, link: Link, pending: Pending, code: str) -> None:
        self.stats[f"error {pending.kind} {code}"] += 1
        slot, member, session = pending.slot, pending.member, pending.session
        if slot is not None and slot.session is session:
            if pending.kind == "join" and code == "unavailable":
                slot.ghost = True  # its store call's reply was lost: it may have joined
            slot.busy.discard(pending.role)
            self.tidy(slot)
        if code == "unavailable":
            # The store is away or the instance drains: the request had no effect, or
            # one the reply could not tell (a resume may have taken the member over,
            # a leave may have left: it stays uncertain until a resume tells).
            if self.in_outage() and pending.kind == "resume" and member is not None:
                member.stale_online = True
            if self.in_outage() and pending.kind == "join" and slot is not None and slot.session is session:
                slot.stale_ghost = True
            return
        if pending.kind == "leave" and member is not None and member.state == "uncertain":
            member.state = "member"  # a refused leave had no effect
        if session is not None and session.expiring and code in ("not_found", "not_in_session"):
            self.stats[f"{pending.kind} refused: its session expired"] += 1
            return
        # The member moved to another connection; or, on Redis after an outage, its
        # instance may have been declared dead (its heartbeat aged while Redis stalled).
        stale = link.superseded or (member is not None and self.current.get(member) is not link)
        evicted = self.plan.redis and self.in_outage()
        if pending.kind in ("send", "leave") and code in ("not_found", "not_in_session") and (stale or evicted):
            if member is not None and self.current.get(member) is link and link.refused_at is None:
                # No takeover is known to have succeeded (a resume answered `unavailable`
                # may have run; an eviction): the server must now close this connection,
                # as after a takeover (1000) or an eviction (1012).
                self.stats["refused on a connection still believed to hold its member"] += 1
                link.refused_at = trio.current_time()
            return
        if pending.kind == "resume" and code == "not_found" and member is not None and member.state == "uncertain":
            member.state = "left"  # its leave had happened
            self.forget(member)
            return
        if pending.kind == "join" and slot is not None and code in ("session_full", "not_found"):
            taken = len(slot.members()) + len(slot.busy)
            if code == "session_full" and (slot.ghost or taken >= 2):
                slot.full = True
                return
            if code == "not_found" and all(m.state == "uncertain" for _, m in slot.members()):
                return  # its members all left meanwhile (they may have)
        self.violate("error", f"{pending.kind} on connection {link.number} answered {code}")

    def enter(self, link: Link, view: View) -> None:
        """The connection now holds the member: its messages count from here."""
        view.member.stale_online = False  # the store knows where it is again
        link.view = view
        view.label = f"connection {link.number} on instance {link.instance}.{self.instances[link.instance].incarnation}"
        self.views.append(view)
        self.current[view.member] = link

    def on_left(self, link: Link, member: MemberModel) -> None:
        if link.view is not None:
            link.view.left = True
        member.state = "left"
        self.forget(member)

    def forget(self, member: MemberModel) -> None:
        """A member that left: free its place."""
        self.current.pop(member, None)
        member.session.left.add(member.client_id)
        for slot in self.slots:
            for role, held in enumerate(slot.roles):
                if held is member:
                    slot.roles[role] = None
            self.tidy(slot)

    @staticmethod
    def tidy(slot: Slot) -> None:
        """A slot whose members all left, with no join in flight, has no session any more."""
        if slot.session is not None and not slot.members() and not slot.busy:
            slot.clear()

    def on_message(self, link: Link, frame: dict[str, Any], text: str) -> None:
        view = link.view
        if view is None or view.left:
            self.violate("delivery", f"a message on connection {link.number}, in no session: {text[:200]}")
            return
        member = view.member
        session = member.session
        seq, sender, mid = frame.get("seq"), frame.get("from"), frame.get("mid")
        if not isinstance(seq, int) or not isinstance(sender, str) or not isinstance(mid, str | None):
            self.violate("delivery", f"malformed message frame {text[:200]}")
            return
        if frame.get("code") != session.code:
            self.violate("delivery", f"a message of {frame.get('code')} on a connection in {session.code}")
            return
        self.stats["messages received"] += 1
        if self.current.get(member) is not link:
            self.stats["messages on a connection taken over"] += 1
        start, end = text.find('"data":'), text.rfind(',"ts":')
        raw = text[start + len('"data":') : end].encode() if 0 <= start < end else None
        self.problems("delivery", view.on_message(seq, sender) + session.stored(seq, sender, mid, raw))
        view.received.append((seq, session.issued))
        member.processed.add(seq)
        member.last_seen = max(member.last_seen, seq)

    # -- the end of a run --

    async def settle(self) -> None:
        """Heal every fault, resume every member and resend what is unacknowledged, then wait
        until every member has every message it should have (bounded)."""
        for instance in self.instances:
            instance.resume()
        await self.after_step()
        for slot in self.slots:
            for role, member in slot.members():
                for attempt in range(SETTLE_ATTEMPTS):
                    if member.state == "left" or await self.resume(
                        member, (role + attempt) % len(self.instances), True
                    ):
                        break
                    await trio.sleep(0.5)
                else:
                    self.violate("settle", f"{member.client_id} of {member.session.code} could not resume and resend")
        final = [m for slot in self.slots for _, m in slot.members() if m.state == "member"]
        deadline = trio.current_time() + SETTLE_TIMEOUT
        for _ in range(int(SETTLE_TIMEOUT / 0.05) + 1):
            if all(not member_problems(m) for m in final) or trio.current_time() > deadline:
                break
            await trio.sleep(0.05)
        await trio.sleep(0.3)  # anything sent twice would arrive now

    def check_view(self, view: View) -> None:
        """What one connection received; each problem is reported once."""
        for problem in view_problems(view, self.plan.redis):
            if problem not in self._reported:
                self._reported.add(problem)
                self.violate("gap", problem)

    def final_checks(self) -> None:
        for view in self.views:
            self.check_view(view)
        for slot in self.slots:
            for _, member in slot.members():
                if member.state == "member":
                    self.problems("lost", member_problems(member))
        members = {id(v.member): v.member for v in self.views}.values()  # each member once, not once per view
        for member in members:
            self.problems("gap", excuse_problems(member))
        excused = sum(e.why.startswith("left history while") for m in members for e in m.excuses)
        self.stats["live gaps excused (left history while a listener reconnected)"] = excused
        self.stats["members online for a peer after a close in a store outage (excused)"] = len(self.stale_excused)

    async def shutdown(self) -> None:
        for link in list(self.links):
            if link.close_code is None:
                await link.wire.drop(reset=False)
        for instance in self.instances:
            code = await instance.drain()
            if code != 0:
                self.violate("drain", f"instance {instance.index} exited with {code} at the end (expected 0)")

    # -- server logs --

    def scan_logs(self) -> None:
        """Read what the logs gained since the last scan: no traceback, no crash, no 1011."""
        for instance in self.instances:
            for path in instance.logs:
                offset = self._log_offsets.get(path, 0)
                try:
                    with open(path, "rb") as log:
                        log.seek(offset)
                        data = log.read()
                except OSError:
                    continue
                end = data.rfind(b"\n") + 1
                self._log_offsets[path] = offset + end
                for line in data[:end].splitlines():
                    self.check_log_line(path, line)

    def check_log_line(self, path: Path, line: bytes) -> None:
        excerpt = f"{path.name}: {line[:400].decode(errors='replace')}"
        if b"Traceback" in line:
            self.violate("log", f"a traceback: {excerpt}")
            return
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            if line.strip():
                self.stats["log lines not JSON"] += 1
            return
        if not isinstance(entry, dict):
            return
        event = entry.get("event")
        if entry.get("exception") or event in BAD_LOG_EVENTS or entry.get("level") == "critical":
            self.violate("log", excerpt)
        elif event == "connection.close" and entry.get("code") == 1011:
            self.violate("log", f"close 1011: {excerpt}")
        elif entry.get("level") in ("warning", "error"):
            self.stats[f"log {entry.get('level')} {event}"] += 1


def peers_of(clients: Any, me: str) -> dict[str, bool]:
    """A reply's or `session:paired`'s `clients`, without the member itself: client_id -> online."""
    if not isinstance(clients, list):
        return {}
    return {
        str(c.get("client_id")): c.get("online") is True
        for c in clients
        if isinstance(c, dict) and c.get("client_id") != me
    }


def payload(rng: random.Random, number: int) -> bytes:
    """A `data` value as compact JSON: nesting, escapes, big integers, now and then 10 KiB."""
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
    value: Any = {"n": number, "t": text, "i": [rng.randint(-(2**63), 2**63 - 1), 0, -1], "f": rng.random()}
    value["nested"] = {"b": rng.choice([True, False, None]), "l": [[text[:5]], {"k": ""}]}
    roll = rng.random()
    if roll < 0.03:
        value["big"] = "x" * rng.randint(2_000, 10_000)
    elif roll < 0.1:
        value = [number, text]  # any JSON value may be sent
    elif roll < 0.15:
        value = f"{number}:{text}"
    return orjson.dumps(value)


# --- a run, shrinking, the command line ------------------------------------------------------


@dataclass
class Result:
    plan: Plan
    seed: int
    steps: int  # planned
    done: int  # run
    elapsed: float
    violations: list[Violation]
    stats: Counter[str]
    workdir: Path | None  # kept on failure

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def failing_prefix(self) -> int:
        """The shortest prefix this run shows failing: up to the step of the first violation."""
        first = min((v.step for v in self.violations), default=self.done)
        return max(1, min(self.done, first + 1))

    def line(self) -> str:
        keys = ("sends", "acks", "acks (duplicate)", "messages received", "resume ok", "resumed with recovered: false")
        counts = " ".join(f"{k.replace(' ', '_')}={self.stats[k]}" for k in keys)
        faults = " ".join(f"{k[6:]}={v}" for k, v in sorted(self.stats.items()) if k.startswith("fault "))
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"chaos {verdict}: store={self.plan.store} instances={self.plan.instances} seed={self.seed}"
            f" steps={self.done}/{self.steps} time={self.elapsed:.1f}s violations={len(self.violations)}"
            f" | {counts} | faults: {faults or 'none'}"
        )

    def report(self, limit: int = 20, verbose: bool = False) -> str:
        lines = [self.line()]
        if verbose:
            lines += [f"    {key}: {value}" for key, value in sorted(self.stats.items())]
        lines += [f"  {v}" for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more")
        if self.workdir is not None:
            lines.append(f"  logs: {self.workdir}")
        return "\n".join(lines)


def _workdir(keep: Path | None) -> Path:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="tandem-chaos-", dir=keep))


async def run_chaos(
    plan: Plan, seed: int, steps: int, time_limit: float | None = None, keep: Path | None = None
) -> Result:
    """Run the first `steps` steps of `seed` (stopping early after `time_limit` s), settle, check."""
    started = time.monotonic()
    workdir = _workdir(keep)
    engine = Engine(plan, seed, workdir)
    step_deadline = trio.current_time() + (time_limit if time_limit is not None else 10**9)
    # Every wait is bounded; this bounds the sum, should they all be reached.
    bound = (time_limit if time_limit is not None else steps * MAX_STEP_SECONDS) + MAX_END_SECONDS
    try:
        with trio.fail_after(bound):
            done = await engine.run(schedule(seed, steps, plan), step_deadline)
    except trio.TooSlowError:
        raise ChaosError(f"the run took more than {bound:.0f} s (logs in {workdir})") from None
    except ChaosError as exc:
        raise ChaosError(f"{exc} (logs in {workdir})") from None
    result = Result(plan, seed, steps, done, time.monotonic() - started, engine.violations, engine.stats, workdir)
    if result.ok and keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
        result.workdir = None
    return result


async def shrink(plan: Plan, seed: int, failed: Result, budget: float, say: Any = print) -> int:
    """The shortest prefix of the schedule that still fails, by binary search over prefix
    lengths (each probe a fresh run), within `budget` seconds; at worst the failing run's own."""
    deadline = time.monotonic() + budget
    known_bad = failed.done
    hi = failed.failing_prefix
    if hi < known_bad:
        probe = await run_chaos(plan, seed, hi)
        first = f": {probe.violations[0]}" if probe.violations else ""
        say(f"  prefix {hi}: {'passes' if probe.ok else 'fails'} ({probe.elapsed:.0f}s){first}")
        if not probe.ok:
            known_bad = hi = probe.failing_prefix
        else:
            hi = known_bad
    lo = 0  # the longest prefix seen passing
    for _ in range(64):
        if lo + 1 >= hi or time.monotonic() > deadline:
            break
        middle = (lo + hi) // 2
        probe = await run_chaos(plan, seed, middle)
        first = f": {probe.violations[0]}" if probe.violations else ""
        say(f"  prefix {middle}: {'passes' if probe.ok else 'fails'} ({probe.elapsed:.0f}s){first}")
        if probe.ok:
            lo = middle
        else:
            hi = known_bad = min(middle, probe.failing_prefix)
            if lo >= hi:  # a shorter prefix failed than one that passed before: timing matters; look below again
                lo = 0
    return known_bad


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--store", choices=("sqlite", "redis", "cluster"), default="sqlite")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--instances", type=int, choices=(2, 3), default=2, help="Tandem processes on Redis")
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS)
    parser.add_argument("--fault-rate", type=float, default=DEFAULT_FAULT_RATE)
    parser.add_argument(
        "--seeds", type=int, default=CLUSTER_NODES, help="cluster: how many nodes REDIS_URL names (1 to 6)"
    )
    parser.add_argument(
        "--ack-replicas",
        type=int,
        choices=(0, 1),
        default=1,
        help="cluster: REDIS_ACK_REPLICAS (an ack waits for a replica)",
    )
    parser.add_argument("--time-limit", type=float, default=None, help="stop starting steps after this many s")
    parser.add_argument("--shrink-time", type=float, default=900.0, help="seconds the shrinking may take (0: none)")
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's logs under this directory")
    parser.add_argument("--broken", default=None, help="run a deliberately broken copy (bench/chaos_broken.py)")
    parser.add_argument(
        "--strict-presence",
        action="store_true",
        help="a member whose connection closed while the store was down must go offline too (a known limit)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every counter of the run")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    if args.broken is None:
        return await check(args, ROOT)
    from bench import chaos_broken

    with tempfile.TemporaryDirectory(prefix=f"tandem-broken-{args.broken}-") as tree:
        root = chaos_broken.build(args.broken, Path(tree))
        print(f"broken build {args.broken!r}: {chaos_broken.BROKEN[args.broken].what}")
        return await check(args, root)


async def check(args: argparse.Namespace, root: Path) -> int:
    """One run; when it fails, the shortest failing prefix and how to replay it."""
    instances = 1 if args.store == "sqlite" else args.instances
    plan = Plan(
        args.store,
        instances,
        args.sessions,
        args.fault_rate,
        root,
        args.seeds,
        args.ack_replicas == 1,
        args.strict_presence,
    )
    result = await run_chaos(plan, args.seed, args.steps, args.time_limit, args.keep)
    print(result.report(verbose=args.verbose), flush=True)
    if result.ok:
        return 0
    prefix = result.done
    if args.shrink_time > 0:
        print(f"shrinking (seed {args.seed}, up to {args.shrink_time:.0f}s):", flush=True)
        prefix = await shrink(plan, args.seed, result, args.shrink_time, lambda text: print(text, flush=True))
    replay = f"python -m bench.chaos --store {args.store} --seed {args.seed} --steps {prefix}"
    if (args.sessions, args.fault_rate) != (DEFAULT_SESSIONS, DEFAULT_FAULT_RATE):
        replay += f" --sessions {args.sessions} --fault-rate {args.fault_rate}"
    if args.store != "sqlite":
        replay += f" --instances {instances}"
    if args.store == "cluster" and (plan.seeds, plan.ack_replicas) != (CLUSTER_NODES, True):
        replay += f" --seeds {plan.seeds} --ack-replicas {args.ack_replicas}"
    if args.strict_presence:
        replay += " --strict-presence"
    if args.broken is not None:
        replay += f" --broken {args.broken}"
    print(f"seed {args.seed}: shortest failing prefix {prefix} steps; replay: {replay}")
    steps = schedule(args.seed, prefix, plan)
    shown = steps if len(steps) <= 40 else steps[-40:]
    print(f"the prefix's {'' if len(steps) <= 40 else 'last 40 '}steps:")
    for step in shown:
        print(f"  {step}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return trio.run(main_async, args)
    except ChaosError as exc:
        print(f"chaos: the test machinery failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
