"""The Redis store's pub/sub listener: the subscriptions of this instance.

One thread owns one PubSub and holds a shard subscription (SSUBSCRIBE) for
each session with a member connected here; the trio side only says which
sessions it wants (`watch`, `unwatch`). A join or resume waits until Redis
confirmed its subscription, so it cannot miss an event; after a reconnect the
listener resubscribes and replays from each session's history what it missed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import trio
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

import redis_client
import tracing
from logging_setup import Outage
from protocol import ServerError
from redis_scripts import channel, parse_event
from session_store import Dispatch, Ended, MessageStored, SessionState, StoredMessage

log = logging.getLogger("tandem.redis")

# How long the listener waits on its sockets before it applies new
# subscriptions: the added latency of a join or resume that subscribes.
LISTEN_POLL_S = 0.02
# A join or resume waits this long for its subscription before `unavailable`.
SUBSCRIBE_TIMEOUT_S = 3.0
# Events handed to the trio thread per hop at most.
DELIVER_BATCH = 256
# The listener's connection failed (Redis, or the cluster, not there): reconnect, not a crash.
RECONNECT_ERRORS: tuple[type[Exception], ...] = (*redis_client.DOWN_ERRORS, OSError)


@dataclass
class ListenerStats:
    """What the listener did, for metrics and tests."""

    restarts: int = 0
    reconnects: int = 0
    received: int = 0
    subscribed: set[str] = field(default_factory=set)


class Listener:
    """The subscriptions of this instance, kept by one thread.

    `replay(code)` is the session's stored history and its state now, or None
    once the session is gone: what a reconnect sends the members here.
    """

    def __init__(
        self,
        connector: redis_client.Connector,
        dispatch: Dispatch,
        replay: Callable[[str], Awaitable[tuple[tuple[StoredMessage, ...], SessionState] | None]],
    ) -> None:
        self.redis = connector
        self.cluster = connector.cluster
        self._dispatch = dispatch
        self._replay = replay
        self._lock = threading.Lock()
        self._wanted: set[str] = set()  # channels the members here need
        self._active: set[str] = set()  # channels SSUBSCRIBE was sent for
        self._unconfirmed: dict[str, int] = {}  # SSUBSCRIBEs not yet answered
        self._confirmed: set[str] = set()  # channels whose subscription is in force
        self._waiters: dict[str, list[trio.Event]] = {}
        self._watchers: dict[str, int] = {}  # codes watched, by members connected here
        self._changes: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.traces: dict[str, tuple[int, str]] = {}  # tracing.py: code -> (seq, traceparent) of the next message
        self._stop = threading.Event()
        self.stats = ListenerStats()
        self.healthy = False  # connected and subscribed
        self._outage = Outage(log, "redis.listener_disconnected", "redis.listener_reconnected")

    @property
    def listening(self) -> bool:
        """Connected, or with nothing to listen to."""
        with self._lock:
            return self.healthy or not self._wanted

    def stop(self) -> None:
        self._stop.set()

    async def watch(self, code: str) -> None:
        """Subscribe to the session's channel (if not yet) and wait until it is confirmed.

        Counted per call, even one that fails: each is undone by one `unwatch`.
        """
        name = channel(code)
        self._watchers[code] = self._watchers.get(code, 0) + 1
        with self._lock:
            self._wanted.add(name)
            if name in self._confirmed:
                return
            event = trio.Event()
            self._waiters.setdefault(name, []).append(event)
        self._changes.put(None)
        with trio.move_on_after(SUBSCRIBE_TIMEOUT_S):
            await event.wait()
        if not event.is_set():
            raise redis_client.unavailable("subscription not confirmed")

    def unwatch(self, code: str) -> None:
        """One member here stopped watching `code`; the last one unsubscribes."""
        left = self._watchers.pop(code, 0) - 1
        if left > 0:
            self._watchers[code] = left
            return
        with self._lock:
            self._wanted.discard(channel(code))
        self._changes.put(None)

    async def run(self) -> None:
        """Run the listener thread; restart it (counted, logged) whenever it dies."""
        backoff = 0.05
        while not self._stop.is_set():
            started = trio.current_time()
            try:
                await trio.to_thread.run_sync(
                    self._listen,
                    trio.lowlevel.current_trio_token(),
                    abandon_on_cancel=True,
                )
            except RECONNECT_ERRORS as exc:
                self.stats.reconnects += 1
                self._outage.failed(type(exc).__name__, redis=self.redis.display)
            except Exception:
                self.stats.restarts += 1
                log.exception("redis.listener_crashed")
            self.healthy = False
            with self._lock:
                self._confirmed.clear()
                self._active.clear()
                self._unconfirmed.clear()
            if trio.current_time() - started > 5:
                backoff = 0.05
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _listen(self, token: trio.lowlevel.TrioToken) -> None:
        """In a worker thread: own one PubSub; apply subscription changes; hand events to trio."""
        pubsub: Any = self.redis.client.pubsub()  # type: ignore[no-untyped-call]
        poll = pubsub.get_sharded_message if self.cluster else pubsub.get_message
        try:
            self._resubscribe(pubsub, poll, token)
            self.healthy = True
            trio.from_thread.run_sync(self._outage.recovered, trio_token=token)
            while not self._stop.is_set():
                if not self._changes.empty():
                    while not self._changes.empty():
                        self._changes.get_nowait()
                    self._apply_changes(pubsub)
                if not self._active:
                    time.sleep(LISTEN_POLL_S)
                    continue
                batch: list[dict[str, Any]] = []
                message = poll(timeout=LISTEN_POLL_S)
                while message is not None and len(batch) < DELIVER_BATCH:
                    batch.append(message)
                    message = poll(timeout=0)
                if batch:
                    trio.from_thread.run_sync(self._deliver, batch, trio_token=token)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _apply_changes(self, pubsub: Any) -> None:
        with self._lock:
            add, drop = self._wanted - self._active, self._active - self._wanted
            self._active -= drop
            self._confirmed -= drop
            self._active |= add
            for name in add:
                self._unconfirmed[name] = self._unconfirmed.get(name, 0) + 1
        if drop:
            pubsub.sunsubscribe(*sorted(drop))
        if add:
            pubsub.ssubscribe(*sorted(add))

    def _resubscribe(self, pubsub: Any, poll: Callable[..., Any], token: trio.lowlevel.TrioToken) -> None:
        """After a (re)connect: subscribe to every wanted channel, then send each
        member here the messages it missed meanwhile, then what arrived since."""
        self._apply_changes(pubsub)
        with self._lock:
            names = sorted(self._active)
        if not names:
            return
        held = []
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while time.monotonic() < deadline:
            with self._lock:
                waiting = any(self._unconfirmed.get(n) for n in names)
            if not waiting:
                break
            message = poll(timeout=LISTEN_POLL_S)
            if message is not None:
                if _kind(message) == "ssubscribe":
                    self._count_confirmation(message)
                held.append(message)
        else:
            raise redis.TimeoutError("subscriptions not confirmed")
        trio.from_thread.run(self._resync, names, trio_token=token)
        trio.from_thread.run_sync(self._deliver, held, trio_token=token)

    def _count_confirmation(self, message: dict[str, Any]) -> bool:
        """Count one SSUBSCRIBE answer; True if the channel is now confirmed."""
        name = message["channel"].decode()
        with self._lock:
            left = self._unconfirmed.get(name, 0) - 1
            if left > 0:
                self._unconfirmed[name] = left
                return False
            self._unconfirmed.pop(name, None)
            if name not in self._active:
                return False
            self._confirmed.add(name)
            return True

    async def _resync(self, names: list[str]) -> None:
        for name in names:
            code = _code_of(name)
            try:
                replay = await self._replay(code)
            except ServerError:  # skipped, its members here would miss what was sent meanwhile: resync again
                raise redis.ConnectionError("the resync of a session failed") from None
            if replay is None:
                # The session ended while this listener was away (its end was
                # published to nobody here): end it for the members here. The
                # reason is gone with the session, so it is the common one.
                self._dispatch(Ended(code, "idle"))
                continue
            messages, state = replay
            for m in messages:
                self._dispatch(MessageStored(code, m))
            self._dispatch(state)  # presence, pairing, leaves and takeovers missed meanwhile

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        """On the trio thread: turn published events into hub events, in order."""
        for message in batch:
            kind = _kind(message)
            if kind == "ssubscribe":
                name = message["channel"].decode()
                if name in self._confirmed and self.healthy and not self._unconfirmed.get(name):
                    raise redis.ConnectionError("redis-py moved a shard subscription (a failover): resync")
                if name in self._confirmed or self._count_confirmation(message):
                    with self._lock:
                        waiters = self._waiters.pop(name, [])
                    for event in waiters:
                        event.set()
                continue
            if kind != "smessage":
                continue
            name = message["channel"].decode()
            if name not in self._confirmed:
                # An event read after SUNSUBSCRIBE was sent, or before the newest
                # SSUBSCRIBE of its channel was confirmed, belongs to an earlier
                # subscription: delivered, it would reach a member that joined
                # since. A join or resume waits for the confirmation, so it needs
                # none of them.
                continue
            self.stats.received += 1
            code = _code_of(name)
            parsed = parse_event(code, message["data"])
            if tracing.tracer is not None:  # a message's trace context comes just before it
                tracing.tracer.published(self.traces, code, message["data"], parsed, self._dispatch)
            elif parsed is not None:
                self._dispatch(parsed)


class ListenerCollector(Collector):
    def __init__(self, stats: ListenerStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "tandem_redis_listener_restarts",
            "Pub/sub listener restarts, by cause",
            labels=["cause"],
        )
        restarts.add_metric(["disconnected"], self._stats.reconnects)
        restarts.add_metric(["crashed"], self._stats.restarts)
        yield restarts
        yield CounterMetricFamily(
            "tandem_redis_events_received",
            "Session events received over pub/sub",
            value=self._stats.received,
        )


def _kind(message: dict[str, Any]) -> str:
    kind = message.get("type")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _code_of(name: str) -> str:
    return name.split("{", 1)[1].split("}", 1)[0]
