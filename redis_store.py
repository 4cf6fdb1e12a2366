"""The Redis session store: shared sessions and fan-out across instances.

Each step (create, join, resume, append, leave, disconnect, expire) is one Lua
script on the keys of one session, which share the hash tag `{code}`; a
script also publishes its events on the session's shard channel (SPUBLISH),
so a relayed message costs one round trip. Scripts of many connections go out
in one pipeline per tick (group commit). One listener thread holds the
subscriptions of the sessions with a member here and hands events to the hub.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
import redis.cluster
import trio
from prometheus_client.registry import CollectorRegistry

import redis_client
import tracing
from limiter import LimitKey, RedisLimiter, rate_limited, redis_key
from protocol import CODE_ALPHABET, ClientError, ErrorCode, Member, ServerError
from redis_instances import Instances
from redis_listener import Listener, ListenerCollector
from redis_scripts import SCRIPTS, members, session_keys, stored_message
from session_store import (
    CODE_ATTEMPTS,
    LIST_BUDGET,
    Appended,
    Created,
    Dispatch,
    Ended,
    Event,
    Evicted,
    GroupCommit,
    Joined,
    MemberInfo,
    Op,
    Resumed,
    SessionInfo,
    SessionPage,
    SessionState,
    SessionStore,
    StoredMessage,
    no_such_member,
    not_found,
    session_full,
    timed,
    wrong_member,
)

log = logging.getLogger("tandem.redis")

# Keys outlive their session's deadline by this much, so that the sweeper (not
# Redis) ends a session and tells its members; without a sweeper they vanish.
KEY_GRACE_MS = 30_000
# The key of the keyed hashes every instance must agree on (rate-limit keys,
# codes and addresses in logs) when HASH_KEY is not set; it never expires.
SHARED_SECRET_KEY = "tandem:hash-key"
# Sessions are indexed for the sweeper in this many sorted sets (one hash slot
# each), so that a Redis Cluster spreads them.
EXPIRY_BUCKETS = 16
# Sessions the sweeper checks per bucket per tick.
SWEEP_BATCH = 200
# Codes one ZSCAN of an expiry bucket asks for when the admin API lists sessions.
LIST_SCAN_COUNT = 100
# A cluster's slot map is asked for again after a failed node or a moved slot, at most this often.
LAYOUT_REFRESH_S = 1.0


def expiry_bucket(code: str) -> str:
    return f"tandem:expiry:{{e{zlib.crc32(code.encode()) % EXPIRY_BUCKETS}}}"


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    keys: list[str]
    args: list[Any]


class RedisStore(SessionStore):
    """Sessions in Redis (or Redis Cluster), shared by every instance."""

    backend = "redis"

    def __init__(
        self,
        connector: redis_client.Connector,
        dispatch: Dispatch,
        *,
        history_size: int,
        idle_ms: int,
        ttl_ms: int,
        fail_closed: bool = False,
        ack_replicas: int = 0,
        ack_timeout: float = 1.0,
    ) -> None:
        self.redis = connector
        self.location = connector.display
        self.cluster = connector.cluster
        self._dispatch = dispatch
        self._history = history_size
        self._idle_ms = idle_ms
        self._ttl_ms = ttl_ms
        self._ack_replicas = ack_replicas
        self._ack_timeout_ms = round(ack_timeout * 1000)
        self._scripts = {name: redis_client.Script(body) for name, body in SCRIPTS.items()}
        self._layout_checked = 0.0  # when a cluster's slot map was last refreshed
        self.writer = GroupCommit(self._execute, dispatch, abandon_on_cancel=True, backend=self.backend)
        self.limiter = RedisLimiter(connector, fail_closed=fail_closed)
        self.listener = Listener(connector, self._event, self._replay)
        self.instances = Instances(connector, self._reaped, lambda: dispatch(Evicted()))
        # Members online here, by session: their entries in this instance's set.
        self._here: dict[str, dict[str, str]] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        dispatch: Dispatch,
        *,
        cluster: bool,
        history_size: int,
        idle_ms: int,
        ttl_ms: int,
        fail_closed: bool = False,
        ack_replicas: int = 0,
        ack_timeout: float = 1.0,
    ) -> AsyncIterator[RedisStore]:
        """Connect (lazily: Redis may be down at start-up) and run the writer and listener."""
        connector = redis_client.Connector(url, cluster=cluster)
        store = cls(
            connector,
            dispatch,
            history_size=history_size,
            idle_ms=idle_ms,
            ttl_ms=ttl_ms,
            fail_closed=fail_closed,
            ack_replicas=ack_replicas,
            ack_timeout=ack_timeout,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.writer.run)
                nursery.start_soon(store.listener.run)
                try:
                    async with trio.open_nursery() as beating:
                        beating.start_soon(store.instances.run)
                        try:
                            yield store
                        finally:
                            beating.cancel_scope.cancel()
                finally:
                    with trio.move_on_after(redis_client.CALL_TIMEOUT_S) as leaving:
                        leaving.shield = True  # the last beat is gone: this instance leaves the others
                        await store.instances.leave()
                    store.writer.close()
                    store.listener.stop()
                    nursery.cancel_scope.deadline = trio.current_time() + redis_client.SOCKET_TIMEOUT_S
        finally:
            await trio.to_thread.run_sync(connector.close)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Expose the listener's restarts in `registry` (/metrics)."""
        registry.register(ListenerCollector(self.listener.stats))

    # -- the writer: one pipeline of scripts per tick --

    def _execute(self, batch: list[Op]) -> None:
        """In a worker thread: each op's script, in one pipeline per Redis node."""
        try:
            groups = self._by_node(batch)
        except redis_client.DOWN_ERRORS as exc:
            _fail(batch, redis_client.unavailable(type(exc).__name__))
            return
        for node, ops in groups:
            self._execute_on(node, ops)

    def _by_node(self, batch: list[Op]) -> list[tuple[redis.Redis, list[Op]]]:
        """The ops of `batch` by the node that serves their session.

        A cluster's nodes are sent plain pipelines rather than redis-py's
        cluster pipeline, which sends a command again when its reply was lost
        (an append would be stored twice) and cannot put `WAIT` on the
        connection that carried the writes.
        """
        client = self.redis.client
        if not isinstance(client, redis.cluster.RedisCluster):
            return [(client, batch)]
        nodes: dict[str, tuple[redis.Redis, list[Op]]] = {}
        for op in batch:
            script: _Script = op.payload
            node = client.get_node_from_key(script.keys[0])  # type: ignore[no-untyped-call]
            if node.redis_connection is None:
                raise redis.exceptions.SlotNotCoveredError(f"no connection to {node.name}")
            nodes.setdefault(node.name, (node.redis_connection, []))[1].append(op)
        return list(nodes.values())

    def _execute_on(self, node: redis.Redis, batch: list[Op]) -> None:
        """Run `batch` in one pipeline on `node`; with REDIS_ACK_REPLICAS, `WAIT` ends it."""
        todo = list(batch)
        for _attempt in range(2):  # a second pass after NOSCRIPT (a restarted or new node)
            pipe = node.pipeline(transaction=False)
            for op in todo:
                script: _Script = op.payload
                pipe.evalsha(self._scripts[script.name].sha, len(script.keys), *script.keys, *script.args)
            if self._ack_replicas:
                # WAIT counts the replicas that hold every write this connection
                # made; the pipeline's writes were the last ones.
                pipe.wait(self._ack_replicas, self._ack_timeout_ms)
            try:
                results = pipe.execute(raise_on_error=False)
            except redis_client.DOWN_ERRORS as exc:
                self._layout_changed(exc)
                _fail(todo, redis_client.unavailable(type(exc).__name__))
                return
            replicas = results.pop() if self._ack_replicas else None
            missing = []
            for op, result in zip(todo, results, strict=True):
                if isinstance(result, redis.exceptions.NoScriptError):
                    missing.append(op)
                elif isinstance(result, redis_client.DOWN_ERRORS):
                    self._layout_changed(result)
                    op.error = redis_client.unavailable(type(result).__name__)
                elif isinstance(result, Exception):
                    op.error = result
                else:
                    op.result = result
            if replicas is not None and not (isinstance(replicas, int) and replicas >= self._ack_replicas):
                # The writes happened on the master; an ack would promise more. A WAIT that
                # failed (the node became a replica in a failover) says the layout changed.
                if isinstance(replicas, Exception):
                    self._layout_changed(replicas)
                    unconfirmed = redis_client.unavailable(type(replicas).__name__)
                else:
                    unconfirmed = redis_client.unavailable(f"{replicas} of {self._ack_replicas} replicas confirmed")
                for op in todo:
                    if op not in missing and op.error is None:
                        op.error = unconfirmed
            if not missing:
                return
            todo = missing
            try:
                for known in self._scripts.values():
                    node.script_load(known.body)
            except redis_client.DOWN_ERRORS as exc:
                _fail(todo, redis_client.unavailable(type(exc).__name__))
                return
        _fail(todo, ServerError("scripts could not be loaded", ErrorCode.INTERNAL))

    def _layout_changed(self, error: Exception) -> None:
        """A cluster node failed or a slot moved: learn the cluster's layout again, at most once a second."""
        client = self.redis.client
        now = time.monotonic()
        if isinstance(client, redis.cluster.RedisCluster) and now - self._layout_checked >= LAYOUT_REFRESH_S:
            self._layout_checked = now
            with contextlib.suppress(*redis_client.DOWN_ERRORS):
                client.nodes_manager.initialize()
            log.info("redis.cluster_layout_refreshed", extra={"fields": {"cause": type(error).__name__}})

    async def _run(self, name: str, code: str, *args: Any) -> Any:
        return await self.writer.call(_Script(name, session_keys(code), list(args)))

    # -- the interface --

    @timed("create")
    async def create(
        self,
        new_code: Callable[[], str],
        client_id: str,
        token_hash: bytes,
        conn_id: str,
        now: int,
        user: str | None = None,
    ) -> Created:
        for _ in range(CODE_ATTEMPTS):
            code = new_code()
            await self._index_for_expiry(code, now + min(self._idle_ms, self._ttl_ms), now + self._ttl_ms)
            result = await self._run(
                "create",
                code,
                client_id,
                token_hash.hex(),
                conn_id,
                self._idle_ms,
                self._ttl_ms,
                KEY_GRACE_MS,
                user or "",
            )
            if result[0] == 1:
                await self._online(code, client_id, conn_id)
                return Created(code, int(result[1]))
        raise ServerError("could not draw a free session code", ErrorCode.INTERNAL)

    @timed("join")
    async def join(
        self, code: str, client_id: str, token_hash: bytes, conn_id: str, now: int, user: str | None = None
    ) -> Joined:
        result = await self._run(
            "join",
            code,
            client_id,
            token_hash.hex(),
            conn_id,
            self._idle_ms,
            KEY_GRACE_MS,
            user or "",
        )
        status = result[0]
        if status == -1:
            raise not_found()
        if status == -3:
            raise session_full()
        await self._online(code, client_id, conn_id)
        return Joined(
            members(result[1]),
            int(status),
            tuple(stored_message(e) for e in result[2:]),
        )

    @timed("resume")
    async def resume(
        self,
        code: str,
        client_id: str,
        token_hash: bytes,
        conn_id: str,
        last_seq: int,
        now: int,
        user: str | None = None,
    ) -> Resumed:
        result = await self._run(
            "resume",
            code,
            client_id,
            token_hash.hex(),
            conn_id,
            self._idle_ms,
            KEY_GRACE_MS,
            last_seq,
            user or "",
        )
        status = result[0]
        if status in (-1, -4):  # no such session, wrong credentials (or user): one answer
            raise no_such_member()
        replay = tuple(m for m in map(stored_message, result[3:]) if m.sender != client_id)
        await self._online(code, client_id, conn_id)
        return Resumed(
            members(result[2]),
            int(status),
            recovered=int(result[1]) <= last_seq,
            replay=replay,
        )

    async def append(
        self,
        code: str,
        client_id: str,
        conn_id: str,
        data: bytes,
        now: int,
        limits: Sequence[LimitKey] = (),
        mid: str | None = None,
        acked: Callable[[Appended], None] | None = None,
    ) -> Appended:
        # Limits go into the append script (one round trip) when their keys can
        # share its hash slot: a member's are kept beside the session; on a
        # cluster the others (per IP) need a check of their own first.
        folded = [k for k in limits if k.per_session or not self.cluster]
        apart: list[tuple[LimitKey, float]] = []
        for k in limits:
            if k not in folded:
                decision = await self.limiter.hit(k.rule, k.key)
                if not decision.allowed:
                    raise rate_limited(k.rule.name, decision.retry_after)
                apart.append((k, decision.stamp))
        keys = session_keys(code)
        args: list[Any] = [client_id, conn_id, data, self._idle_ms, KEY_GRACE_MS, self._history, mid or ""]
        for k in folded:
            keys.append(f"tandem:{{{code}}}:rl:{k.rule.name}:{k.key}" if k.per_session else redis_key(k.rule, k.key))
            args += [k.rule.limit, round(k.rule.window * 1000)]
        if tracing.tracer is not None:  # the send's trace context, published before the message
            args.append(tracing.tracer.traceparent())
        then = None if acked is None else partial(_ack_stored, acked)
        result = await self.writer.call(_Script("append", keys, args), then)
        if result[0] == -1:
            raise not_found()
        if result[0] == -9:
            raise rate_limited(folded[int(result[2]) - 1].rule.name, float(result[1]) / 1000)
        appended = _appended(result)
        if appended.duplicate:  # nothing new: it costs no message budget
            for k, stamp in apart:
                await self.limiter.refund(k.rule, k.key, stamp)
        return appended

    @timed("leave")
    async def leave(self, code: str, client_id: str, conn_id: str, now: int) -> bool:
        result = await self._run("leave", code, client_id, conn_id)
        if result == -5:
            raise ClientError("not a member of that session", ErrorCode.NOT_IN_SESSION)
        await self._offline(code, client_id, conn_id)
        if result == 1:
            self._event(Ended(code, None))
            # Its entry in the expiry index goes too (nothing of an ended
            # session stays); if Redis fails here, the sweeper drops it at the deadline.
            with contextlib.suppress(ServerError):
                await self.redis.call(lambda client: client.zrem(expiry_bucket(code), code))
        return bool(result == 1)

    @timed("disconnect")
    async def disconnect(self, code: str, client_id: str, conn_id: str, now: int) -> None:
        await self._run("disconnect", code, client_id, conn_id)
        await self._offline(code, client_id, conn_id)

    # -- members online here, for the other instances to reap if this one dies --

    async def _online(self, code: str, client_id: str, conn_id: str) -> None:
        self._here.setdefault(code, {})[client_id] = conn_id
        await self.instances.online(code, client_id, conn_id)

    async def _offline(self, code: str, client_id: str, conn_id: str) -> None:
        members = self._here.get(code, {})
        if members.get(client_id) == conn_id:
            del members[client_id]
            if not members:
                self._here.pop(code, None)
        await self.instances.offline(code, client_id, conn_id)

    def _event(self, event: Event) -> None:
        """Every event the store reports goes through here to the hub."""
        if isinstance(event, Ended):  # its members here are in no session now
            for client_id, conn_id in self._here.pop(event.code, {}).items():
                self.instances.forget(event.code, client_id, conn_id)
        self._dispatch(event)

    async def _reaped(self, code: str, client_id: str, conn_id: str) -> None:
        """A member of a dead instance: offline, and its peer told, if that connection still holds it."""
        await self._run("disconnect", code, client_id, conn_id)

    @timed("sweep")
    async def sweep(self, now: int) -> list[tuple[str, str]]:
        """Check the sessions whose indexed deadline passed; expire those really due."""
        due = await self.redis.call(lambda client: _due_codes(client, now))
        results = await self._run_each("expire", due)
        expired = []
        reschedule: dict[str, dict[str, int]] = {}
        finished: dict[str, list[str]] = {}
        for code, result in results.items():
            bucket = expiry_bucket(code)
            if result[0] == 0:
                reschedule.setdefault(bucket, {})[code] = int(result[1])
            else:
                finished.setdefault(bucket, []).append(code)
                if result[0] == 1:
                    expired.append((code, result[1].decode()))
        if reschedule or finished:
            await self.redis.call(lambda client: _update_index(client, reschedule, finished))
        return expired

    async def _run_each(self, name: str, codes: Sequence[str]) -> dict[str, Any]:
        """Script `name` on each session of `codes`, concurrently: one pipeline (per node)."""
        results: dict[str, Any] = {}

        async def run(code: str) -> None:
            results[code] = await self._run(name, code)

        try:
            async with trio.open_nursery() as nursery:
                for code in codes:
                    nursery.start_soon(run, code)
        except BaseExceptionGroup as group:  # the callers handle one store error, as from any call
            failure = group.subgroup(lambda exc: isinstance(exc, ServerError | ClientError))
            if failure is None or not isinstance(group, ExceptionGroup):
                raise
            first: BaseException = failure
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return results

    # -- the admin API and e-mail invites --

    @timed("list_sessions")
    async def list_sessions(self, now: int, state: str | None, limit: int, after: str | None) -> SessionPage:
        """Walk the expiry index (every live session is in one of its buckets) with ZSCAN,
        bucket by bucket: no KEYS, no SCAN of the keyspace.

        Each batch ZSCAN returns (about LIST_SCAN_COUNT codes) costs one round trip, and
        one pipeline of `info` scripts for its codes; the walk stops at `limit` matches or
        once LIST_BUDGET sessions were examined. A position is `bucket:zscan cursor:last
        code returned` (codes of a batch are taken in order, so a page can end mid-batch).
        """
        bucket, scan, last = _position(after)
        found: list[SessionInfo] = []
        examined = 0
        while bucket < EXPIRY_BUCKETS and examined < LIST_BUDGET and len(found) < limit:
            next_scan, codes = await self.redis.call(partial(_index_batch, bucket, scan))
            codes = [code for code in codes if code > last]
            replies = await self._run_each("info", codes)
            for n, code in enumerate(codes):
                examined += 1
                info = _session_info(code, replies[code])
                if info is not None and state in (None, info.state):
                    found.append(info)
                    if len(found) == limit and n + 1 < len(codes):  # the rest of this batch next time
                        return SessionPage(tuple(found), f"{bucket}:{scan}:{code}")
            bucket, scan, last = (bucket + 1, 0, "") if next_scan == 0 else (bucket, next_scan, "")
        return SessionPage(tuple(found), f"{bucket}:{scan}:" if bucket < EXPIRY_BUCKETS else None)

    @timed("inspect")
    async def inspect(self, code: str, now: int) -> SessionInfo | None:
        return _session_info(code, await self._run("info", code))

    @timed("end")
    async def end(self, code: str, now: int) -> bool:
        """The `end` script deletes the session and publishes `e|ended` on its channel:
        every instance with a member of it (this one too) tells them through its listener."""
        if await self._run("end", code) != 1:
            return False
        with contextlib.suppress(ServerError):  # if Redis fails here, the sweeper drops it at the deadline
            await self.redis.call(lambda client: client.zrem(expiry_bucket(code), code))
        return True

    @timed("verify_member")
    async def verify_member(
        self, code: str, client_id: str, token_hash: bytes, now: int, user: str | None = None
    ) -> None:
        status = await self._run("member", code, client_id, token_hash.hex(), user or "")
        if status == -1:
            raise not_found()
        if status != 1:
            raise wrong_member()

    async def shared_secret(self) -> bytes | None:
        """The instances' shared key, created by whichever instance asks first."""
        candidate = secrets.token_hex(32)

        def run(client: redis_client.Client) -> bytes | None:
            client.set(SHARED_SECRET_KEY, candidate, nx=True)
            value = client.get(SHARED_SECRET_KEY)
            return value.encode() if isinstance(value, str) else value

        result: bytes | None = await self.redis.call(run)
        return result

    @timed("check")
    async def check(self) -> None:
        await self.redis.call(lambda client: client.ping())
        if not self.listener.listening:
            raise redis_client.unavailable("the pub/sub listener is reconnecting")

    async def history(self, code: str, after: int) -> tuple[StoredMessage, ...]:
        result = await self._run("history", code, after)
        return tuple(stored_message(e) for e in result)

    async def _replay(self, code: str) -> tuple[tuple[StoredMessage, ...], SessionState] | None:
        """What a listener that was away sends the members here: the stored
        messages and the session's state; None when the session is gone."""
        messages = await self.history(code, 0)
        state = await self._run("state", code)
        if not state:
            return None
        ids = state[0].decode().split(",")
        holders = {cid: (h.decode() or None) for cid, h in zip(ids, state[1:], strict=True)}
        clients = tuple(Member(cid, holders[cid] is not None) for cid in ids)
        return messages, SessionState(code, clients, holders)

    # -- subscriptions: the listener's --

    async def watch(self, code: str) -> None:
        await self.listener.watch(code)

    def unwatch(self, code: str) -> None:
        self.listener.unwatch(code)

    # -- the expiry index --

    async def _index_for_expiry(self, code: str, due: int, ttl_at: int) -> None:
        def run(client: redis_client.Client) -> None:
            bucket = expiry_bucket(code)
            pipe = client.pipeline(transaction=False)
            pipe.zadd(bucket, {code: due})
            pipe.pexpireat(bucket, ttl_at + KEY_GRACE_MS, nx=True)
            pipe.pexpireat(bucket, ttl_at + KEY_GRACE_MS, gt=True)
            pipe.execute()

        await self.redis.call(run)


def _appended(result: list[Any]) -> Appended:
    """The append script's reply when it stored (or found) the message: [seq] or [seq, 1] (duplicate)."""
    return Appended(int(result[0]), len(result) > 1)


def _ack_stored(acked: Callable[[Appended], None], result: list[Any]) -> None:
    """An append's `acked`, called at commit when the script stored (or found) the message."""
    if result[0] >= 0:  # else -1 (no such member) or -9 (rate limited): the caller raises
        acked(_appended(result))


def _position(after: str | None) -> tuple[int, int, str]:
    """A listing position `bucket:zscan cursor:last code`; ValueError if this store did not make it."""
    if after is None:
        return 0, 0, ""
    bucket, scan, last = after.split(":")
    if not 0 <= int(bucket) < EXPIRY_BUCKETS or int(scan) < 0 or not set(last) <= set(CODE_ALPHABET):
        raise ValueError("not a position of this store")
    return int(bucket), int(scan), last


def _index_batch(bucket: int, scan: int, client: redis_client.Client) -> tuple[int, list[str]]:
    """One ZSCAN of expiry bucket `bucket` from cursor `scan`: the next cursor (0: done), and the
    codes in order (ZSCAN may repeat one while the set grows)."""
    next_scan, entries = client.zscan(f"tandem:expiry:{{e{bucket}}}", scan, count=LIST_SCAN_COUNT)
    return int(next_scan), sorted({code.decode() if isinstance(code, bytes) else str(code) for code, _ in entries})


def _session_info(code: str, reply: Any) -> SessionInfo | None:
    """The `info` script's reply as a SessionInfo; None when the session is gone."""
    if not reply:
        return None
    created, expires, seq, clients, *users = reply
    held = members(clients) if clients else ()
    infos = tuple(MemberInfo(m.client_id, m.online, u.decode() or None) for m, u in zip(held, users, strict=True))
    return SessionInfo(code, infos, int(seq), int(created), int(expires))


def _due_codes(client: redis_client.Client, now: int) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for n in range(EXPIRY_BUCKETS):
        pipe.zrangebyscore(f"tandem:expiry:{{e{n}}}", "-inf", now, start=0, num=SWEEP_BATCH)
    return [code.decode() for codes in pipe.execute() for code in codes]


def _update_index(
    client: redis_client.Client, reschedule: dict[str, dict[str, int]], finished: dict[str, list[str]]
) -> None:
    pipe = client.pipeline(transaction=False)
    for bucket, scores in reschedule.items():
        pipe.zadd(bucket, scores, xx=True)
    for bucket, codes in finished.items():
        pipe.zrem(bucket, *codes)
    pipe.execute()


def _fail(ops: list[Op], error: Exception) -> None:
    for op in ops:
        op.error = error
