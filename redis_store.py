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
import hashlib
import logging
import queue
import secrets
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
import redis.cluster
import trio
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

import protocol
from limiter import LUA_WINDOW_FUNCTIONS, LimitKey, RedisLimiter, rate_limited, redis_key
from protocol import ClientError, ErrorCode, Member, ServerError
from session_store import (
    CODE_ATTEMPTS,
    Broadcast,
    Created,
    Dispatch,
    Ended,
    GroupCommit,
    Joined,
    Op,
    Resumed,
    SessionStore,
    StoredMessage,
    Takeover,
    no_such_member,
    not_found,
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
# How long the listener waits on its sockets before it applies new
# subscriptions: the added latency of a join or resume that subscribes.
LISTEN_POLL_S = 0.02
# Redis calls fail after this long; the client sees `unavailable`.
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
# A join or resume waits this long for its subscription before `unavailable`.
SUBSCRIBE_TIMEOUT_S = 3.0
RETRY_AFTER_S = 1.0
# Test fix: the errors that mean "Redis, or a part of the cluster, is not there
# right now" (the client gets `unavailable`). Only ConnectionError and
# TimeoutError were caught: while a restarted master rejoined its cluster the
# sweeper got ClusterDownError and took the server down, and messages got
# `internal` (tests/test_redis.py::test_cluster_master_outage_...).
DOWN_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterError,  # CLUSTERDOWN, MASTERDOWN
    redis.exceptions.RedisClusterException,  # e.g. a slot that no reachable node serves
)

_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(n) return string.format('%d', n) end
local function alive(s, now)
  local v = redis.call('HMGET', s, 'idle_at', 'ttl_at', 'seq', 'trim', 'r')
  if not v[1] or tonumber(v[1]) <= now or tonumber(v[2]) <= now then return nil end
  return v
end
local function split(r)
  local ids = {}
  for id in string.gmatch(r or '', '[^,]+') do ids[#ids + 1] = id end
  return ids
end
local function clients(s, ids)
  local parts = {}
  for i, id in ipairs(ids) do
    local online = redis.call('HEXISTS', s, 'o:' .. id) == 1 and 'true' or 'false'
    parts[i] = '{"client_id":"' .. id .. '","online":' .. online .. '}'
  end
  return '[' .. table.concat(parts, ',') .. ']'
end
-- publish on the session's shard channel: kind|client_id to skip|seq|frame
local function emit(kind, cid, seq, body)
  redis.call('SPUBLISH', KEYS[3], kind .. '|' .. cid .. '|' .. seq .. '|' .. body)
end
local function presence(cid, online)
  emit('b', cid, 0, '{"type":"session:presence","client_id":"' .. cid .. '","online":' .. online .. '}')
end
-- Test fix: a member's rate-limit keys beside the session (tandem:{code}:rl:<rule>:<client_id>)
-- stayed behind after the session ended (tests/test_redis.py::test_no_key_without_ttl_...).
-- Append registers them in the hash as 'k:<key>'; leave (one member's, or all) and
-- expiry delete them.
local function drop_limits(s, cid)
  for _, f in ipairs(redis.call('HKEYS', s)) do
    if string.sub(f, 1, 2) == 'k:' and (not cid or string.sub(f, -#cid - 1) == ':' .. cid) then
      redis.call('DEL', string.sub(f, 3))
      redis.call('HDEL', s, f)
    end
  end
end
local function refresh(s, h, idle_at, ttl_at, grace)
  local at = math.min(idle_at, ttl_at) + grace
  redis.call('PEXPIREAT', s, int(at))
  redis.call('PEXPIREAT', h, int(at))
end
"""

# KEYS: session hash, history list, channel. ARGV per script below.
# ARGV: client_id, token_hash, conn_id, idle_ms, ttl_ms, grace
_CREATE = """
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local idle_at, ttl_at = now + tonumber(ARGV[4]), now + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'created', int(now), 'idle_at', int(idle_at), 'ttl_at', int(ttl_at),
  'seq', 0, 'trim', 0, 'r', ARGV[1], 'm:' .. ARGV[1], ARGV[2], 'o:' .. ARGV[1], ARGV[3])
refresh(KEYS[1], KEYS[2], idle_at, ttl_at, tonumber(ARGV[6]))
return {1, math.min(idle_at, ttl_at)}
"""

# ARGV: client_id, token_hash, conn_id, idle_ms, grace, code
_JOIN = """
local now = now_ms()
local v = alive(KEYS[1], now)
if not v then return {-1} end
local ids = split(v[5])
if #ids >= 2 then return {-3} end
ids[#ids + 1] = ARGV[1]
local idle_at = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'r', table.concat(ids, ','), 'm:' .. ARGV[1], ARGV[2], 'o:' .. ARGV[1], ARGV[3],
  'idle_at', int(idle_at))
refresh(KEYS[1], KEYS[2], idle_at, tonumber(v[2]), tonumber(ARGV[5]))
local members = clients(KEYS[1], ids)
if #ids == 2 then
  emit('b', '', 0, '{"type":"session:paired","code":"' .. ARGV[6] .. '","clients":' .. members .. '}')
end
local out = {tonumber(v[3]), members}
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[#out + 1] = entry end
return out
"""

# ARGV: client_id, token_hash, conn_id, idle_ms, grace, last_seq
_RESUME = """
local now = now_ms()
local v = alive(KEYS[1], now)
if not v then return {-1} end
local cid = ARGV[1]
local token = redis.call('HGET', KEYS[1], 'm:' .. cid)
if not token or token ~= ARGV[2] then return {-4} end
local previous = redis.call('HGET', KEYS[1], 'o:' .. cid)
local idle_at = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'o:' .. cid, ARGV[3], 'idle_at', int(idle_at))
refresh(KEYS[1], KEYS[2], idle_at, tonumber(v[2]), tonumber(ARGV[5]))
if previous and previous ~= ARGV[3] then
  emit('t', cid, 0, previous)
end
presence(cid, 'true')
local out = {tonumber(v[3]), tonumber(v[4]), clients(KEYS[1], split(v[5]))}
local after = tonumber(ARGV[6])
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if tonumber(string.match(entry, '^(%d+)|')) > after then out[#out + 1] = entry end
end
return out
"""

# KEYS[4..]: rate-limit keys. ARGV: client_id, conn_id, data, idle_ms, grace,
# code, history_size, then (limit, window_ms) per rate-limit key.
# Returns {seq}, {-1} (no such session or member) or {-9, retry_ms, key index}.
_APPEND = """
local now = now_ms()
local cid = ARGV[1]
local v = redis.call('HMGET', KEYS[1], 'idle_at', 'ttl_at', 'o:' .. cid)
if not v[1] or tonumber(v[1]) <= now or tonumber(v[2]) <= now or v[3] ~= ARGV[2] then return {-1} end
for i = 4, #KEYS do
  local limit, window = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local recent = window_recent(KEYS[i], limit, window, now)
  if #recent >= limit then return {-9, recent[limit] + window - now, i - 3} end
end
local own = string.sub(KEYS[1], 1, -2)  -- 'tandem:{code}:'
for i = 4, #KEYS do
  window_add(KEYS[i], tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]), now)
  if string.sub(KEYS[i], 1, #own) == own then redis.call('HSETNX', KEYS[1], 'k:' .. KEYS[i], 1) end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local idle_at = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'idle_at', int(idle_at))
local size = tonumber(ARGV[7])
if redis.call('RPUSH', KEYS[2], int(seq) .. '|' .. int(now) .. '|' .. cid .. '|' .. ARGV[3]) > size then
  redis.call('LTRIM', KEYS[2], -size, -1)
  redis.call('HSET', KEYS[1], 'trim', int(seq - size))
end
refresh(KEYS[1], KEYS[2], idle_at, tonumber(v[2]), tonumber(ARGV[5]))
emit('b', cid, int(seq), '{"type":"message","code":"' .. ARGV[6] .. '","seq":' .. int(seq) .. ',"from":"' .. cid ..
  '","data":' .. ARGV[3] .. ',"ts":' .. int(now) .. '}')
return {seq}
"""

# ARGV: client_id, conn_id
_LEAVE = """
local cid = ARGV[1]
if redis.call('HGET', KEYS[1], 'o:' .. cid) ~= ARGV[2] then return -5 end
local rest = {}
for _, id in ipairs(split(redis.call('HGET', KEYS[1], 'r'))) do
  if id ~= cid then rest[#rest + 1] = id end
end
if #rest == 0 then
  drop_limits(KEYS[1], nil)
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
drop_limits(KEYS[1], cid)
redis.call('HSET', KEYS[1], 'r', table.concat(rest, ','))
redis.call('HDEL', KEYS[1], 'm:' .. cid, 'o:' .. cid)
emit('b', cid, 0, '{"type":"session:peer_left","client_id":"' .. cid .. '"}')
return 0
"""

# ARGV: client_id, conn_id
_DISCONNECT = """
local cid = ARGV[1]
if redis.call('HGET', KEYS[1], 'o:' .. cid) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'o:' .. cid)
presence(cid, 'false')
return 1
"""

# ARGV: code
_EXPIRE = """
local now = now_ms()
local v = redis.call('HMGET', KEYS[1], 'idle_at', 'ttl_at')
if not v[1] then return {-1} end
local idle_at, ttl_at = tonumber(v[1]), tonumber(v[2])
if math.min(idle_at, ttl_at) > now then return {0, math.min(idle_at, ttl_at)} end
local reason = ttl_at <= idle_at and 'ttl' or 'idle'
drop_limits(KEYS[1], nil)
redis.call('DEL', KEYS[1], KEYS[2])
emit('e', '', 0, '{"type":"session:expired","code":"' .. ARGV[1] .. '","reason":"' .. reason .. '"}')
return {1, reason}
"""

# KEYS: session hash, history list. ARGV: after_seq. The history for a resync.
_HISTORY = """
local out = {}
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if tonumber(string.match(entry, '^(%d+)|')) > tonumber(ARGV[1]) then out[#out + 1] = entry end
end
return out
"""

SCRIPTS = {
    name: LUA_WINDOW_FUNCTIONS + _LUA_COMMON + body
    for name, body in {
        "create": _CREATE,
        "join": _JOIN,
        "resume": _RESUME,
        "append": _APPEND,
        "leave": _LEAVE,
        "disconnect": _DISCONNECT,
        "expire": _EXPIRE,
        "history": _HISTORY,
    }.items()
}


def session_keys(code: str) -> list[str]:
    """The keys (and shard channel) of one session; all in the slot of `{code}`."""
    return [f"tandem:{{{code}}}:s", f"tandem:{{{code}}}:h", f"tandem:{{{code}}}:c"]


def channel(code: str) -> str:
    return f"tandem:{{{code}}}:c"


def expiry_bucket(code: str) -> str:
    return f"tandem:expiry:{{e{zlib.crc32(code.encode()) % EXPIRY_BUCKETS}}}"


def _stored(entry: bytes) -> StoredMessage:
    seq, ts, sender, data = entry.split(b"|", 3)
    return StoredMessage(int(seq), sender.decode(), data, int(ts))


def _members(clients_json: bytes) -> tuple[Member, ...]:
    return tuple(Member(c["client_id"], c["online"]) for c in orjson.loads(clients_json))


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    keys: list[str]
    args: list[Any]


def unavailable(detail: str) -> ServerError:
    return ServerError(f"session store unavailable: {detail}", ErrorCode.UNAVAILABLE, retry_after=RETRY_AFTER_S)


@dataclass
class ListenerStats:
    """What the listener did, for metrics and tests."""

    restarts: int = 0
    reconnects: int = 0
    received: int = 0
    subscribed: set[str] = field(default_factory=set)


class RedisStore(SessionStore):
    """Sessions in Redis (or Redis Cluster), shared by every instance."""

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        dispatch: Dispatch,
        *,
        history_size: int,
        idle_ms: int,
        ttl_ms: int,
        fail_closed: bool = False,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, redis.cluster.RedisCluster)
        self._dispatch = dispatch
        self._history = history_size
        self._idle_ms = idle_ms
        self._ttl_ms = ttl_ms
        self._shas = {name: _sha1(body) for name, body in SCRIPTS.items()}
        self.writer = GroupCommit(self._execute, dispatch, abandon_on_cancel=True)
        # Test fix: RATE_LIMIT_FAIL_CLOSED never reached the limiter, which always failed open
        # (tests/test_limiter.py::test_redis_down_fails_open_or_closed).
        self.limiter = RedisLimiter(client, fail_closed=fail_closed)
        # Subscriptions: the trio side says what it wants; the listener thread
        # makes it so and reports what is confirmed.
        self._lock = threading.Lock()
        self._wanted: set[str] = set()  # channels the hub needs
        self._active: set[str] = set()  # channels SSUBSCRIBE was sent for
        self._unconfirmed: dict[str, int] = {}  # SSUBSCRIBEs not yet answered
        self._confirmed: set[str] = set()  # channels whose subscription is in force
        self._waiters: dict[str, list[trio.Event]] = {}
        self._changes: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.stats = ListenerStats()
        self.healthy = False  # the listener is connected and subscribed

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
    ) -> AsyncIterator[RedisStore]:
        """Connect (lazily: Redis may be down at start-up) and run the writer and listener."""
        options: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "health_check_interval": 10,
            # No silent retries: a script whose reply was lost may have run, and
            # running an append twice would store a message twice. The client
            # gets `unavailable` and decides; the listener resyncs on reconnect.
            "retry": Retry(NoBackoff(), 0),
        }
        client: redis.Redis | redis.cluster.RedisCluster
        if cluster:
            client = await trio.to_thread.run_sync(lambda: redis.cluster.RedisCluster.from_url(url, **options))
        else:
            client = redis.Redis.from_url(url, **options)
        store = cls(
            client, dispatch, history_size=history_size, idle_ms=idle_ms, ttl_ms=ttl_ms, fail_closed=fail_closed
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.writer.run)
                nursery.start_soon(store._supervise_listener)
                try:
                    yield store
                finally:
                    store.writer.close()
                    store._stop.set()
                    nursery.cancel_scope.deadline = trio.current_time() + SOCKET_TIMEOUT_S
        finally:
            await trio.to_thread.run_sync(client.close)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Expose the listener's restarts in `registry` (/metrics)."""
        registry.register(_ListenerCollector(self.stats))

    # -- the writer: one pipeline of scripts per tick --

    def _execute(self, batch: list[Op]) -> None:
        """In a worker thread: run each op's script in one pipeline."""
        todo = list(batch)
        for _attempt in range(2):  # a second pass after NOSCRIPT (Redis restarted)
            pipe = self.client.pipeline(transaction=False)
            for op in todo:
                script: _Script = op.payload
                # Test fix: redis-py blocks `pipe.evalsha` on a cluster pipeline (a
                # RedisClusterException that killed the writer, and the server, at the
                # first create: tests/test_redis.py::test_two_instances_...[cluster]).
                # The plain command is routed by its keys' slot; on one Redis it is the same.
                pipe.execute_command("EVALSHA", self._shas[script.name], len(script.keys), *script.keys, *script.args)
            try:
                results = pipe.execute(raise_on_error=False)
            except DOWN_ERRORS as exc:
                for op in todo:
                    op.error = unavailable(type(exc).__name__)
                return
            missing = []
            for op, result in zip(todo, results, strict=True):
                if isinstance(result, redis.exceptions.NoScriptError):
                    missing.append(op)
                elif isinstance(result, DOWN_ERRORS):
                    op.error = unavailable(type(result).__name__)
                elif isinstance(result, Exception):
                    op.error = result
                else:
                    op.result = result
            if not missing:
                return
            todo = missing
            try:  # Test fix (as DOWN_ERRORS): this raised out of the writer, ending the server
                self._load_scripts()
            except DOWN_ERRORS as exc:
                for op in todo:
                    op.error = unavailable(type(exc).__name__)
                return
        for op in todo:
            op.error = ServerError("scripts could not be loaded", ErrorCode.INTERNAL)

    def _load_scripts(self) -> None:
        for body in SCRIPTS.values():
            self.client.script_load(body)  # on a cluster: on every primary

    async def _run(self, name: str, code: str, *args: Any) -> Any:
        return await self.writer.call(_Script(name, session_keys(code), list(args)))

    # -- the interface --

    async def create(
        self, new_code: Callable[[], str], client_id: str, token_hash: bytes, conn_id: str, now: int
    ) -> Created:
        for _ in range(CODE_ATTEMPTS):
            code = new_code()
            await self._index_for_expiry(code, now + min(self._idle_ms, self._ttl_ms), now + self._ttl_ms)
            result = await self._run(
                "create", code, client_id, token_hash.hex(), conn_id, self._idle_ms, self._ttl_ms, KEY_GRACE_MS
            )
            if result[0] == 1:
                return Created(code, int(result[1]))
        raise ServerError("could not draw a free session code", ErrorCode.INTERNAL)

    async def join(self, code: str, client_id: str, token_hash: bytes, conn_id: str, now: int) -> Joined:
        result = await self._run("join", code, client_id, token_hash.hex(), conn_id, self._idle_ms, KEY_GRACE_MS, code)
        status = result[0]
        if status == -1:
            raise not_found()
        if status == -3:
            raise ClientError("the session already has two members", ErrorCode.SESSION_FULL)
        return Joined(_members(result[1]), int(status), tuple(_stored(e) for e in result[2:]))

    async def resume(
        self, code: str, client_id: str, token_hash: bytes, conn_id: str, last_seq: int, now: int
    ) -> Resumed:
        result = await self._run(
            "resume", code, client_id, token_hash.hex(), conn_id, self._idle_ms, KEY_GRACE_MS, last_seq
        )
        status = result[0]
        if status in (-1, -4):  # no such session, wrong credentials: one answer
            raise no_such_member()
        replay = tuple(m for m in map(_stored, result[3:]) if m.sender != client_id)
        return Resumed(_members(result[2]), int(status), recovered=int(result[1]) <= last_seq, replay=replay)

    async def append(
        self, code: str, client_id: str, conn_id: str, data: bytes, now: int, limits: Sequence[LimitKey] = ()
    ) -> int:
        # Limits go into the append script (one round trip) when their keys can
        # share its hash slot: a member's are kept beside the session; on a
        # cluster the others (per IP) need a check of their own first.
        folded = [k for k in limits if k.per_session or not self.cluster]
        for k in limits:
            if k not in folded:
                decision = await self.limiter.hit(k.rule, k.key)
                if not decision.allowed:
                    raise rate_limited(k.rule.name, decision.retry_after)
        keys = session_keys(code)
        args: list[Any] = [client_id, conn_id, data, self._idle_ms, KEY_GRACE_MS, code, self._history]
        for k in folded:
            keys.append(f"tandem:{{{code}}}:rl:{k.rule.name}:{k.key}" if k.per_session else redis_key(k.rule, k.key))
            args += [k.rule.limit, round(k.rule.window * 1000)]
        result = await self.writer.call(_Script("append", keys, args))
        if result[0] == -1:
            raise not_found()
        if result[0] == -9:
            raise rate_limited(folded[int(result[2]) - 1].rule.name, float(result[1]) / 1000)
        return int(result[0])

    async def leave(self, code: str, client_id: str, conn_id: str, now: int) -> bool:
        result = await self._run("leave", code, client_id, conn_id)
        if result == -5:
            raise ClientError("not a member of that session", ErrorCode.NOT_IN_SESSION)
        if result == 1:
            self._dispatch(Ended(code, None))
            # Test fix: an ended session's entry in the expiry index stayed
            # until its deadline (tests/test_relay.py::test_leave_..._ends_the_session[redis]).
            # Drop it now; if Redis fails here the sweeper drops it at the deadline.
            with contextlib.suppress(ServerError):
                await self._call_in_thread(self.client.zrem, expiry_bucket(code), code)
        return bool(result == 1)

    async def disconnect(self, code: str, client_id: str, conn_id: str, now: int) -> None:
        await self._run("disconnect", code, client_id, conn_id)

    async def sweep(self, now: int) -> list[tuple[str, str]]:
        """Check the sessions whose indexed deadline passed; expire those really due."""
        due = await self._call_in_thread(self._due_codes, now)
        results: dict[str, Any] = {}

        async def expire(code: str) -> None:
            results[code] = await self._run("expire", code, code)

        async with trio.open_nursery() as nursery:  # concurrently: one pipeline
            for code in due:
                nursery.start_soon(expire, code)
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
            await self._call_in_thread(self._update_index, reschedule, finished)
        return expired

    async def shared_secret(self) -> bytes | None:
        """The instances' shared key, created by whichever instance asks first."""
        candidate = secrets.token_hex(32)

        def run() -> bytes | None:
            self.client.set(SHARED_SECRET_KEY, candidate, nx=True)
            value = self.client.get(SHARED_SECRET_KEY)
            return value.encode() if isinstance(value, str) else value

        result: bytes | None = await self._call_in_thread(run)
        return result

    async def check(self) -> None:
        await self._call_in_thread(self.client.ping)
        with self._lock:
            listening = self.healthy or not self._wanted
        if not listening:
            raise unavailable("the pub/sub listener is reconnecting")

    async def history(self, code: str, after: int) -> tuple[StoredMessage, ...]:
        result = await self._run("history", code, after)
        return tuple(_stored(e) for e in result)

    # -- the expiry index --

    async def _index_for_expiry(self, code: str, due: int, ttl_at: int) -> None:
        def run() -> None:
            bucket = expiry_bucket(code)
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(bucket, {code: due})
            pipe.pexpireat(bucket, ttl_at + KEY_GRACE_MS, nx=True)
            pipe.pexpireat(bucket, ttl_at + KEY_GRACE_MS, gt=True)
            pipe.execute()

        await self._call_in_thread(run)

    def _due_codes(self, now: int) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        for n in range(EXPIRY_BUCKETS):
            pipe.zrangebyscore(f"tandem:expiry:{{e{n}}}", "-inf", now, start=0, num=SWEEP_BATCH)
        return [code.decode() for codes in pipe.execute() for code in codes]

    def _update_index(self, reschedule: dict[str, dict[str, int]], finished: dict[str, list[str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for bucket, scores in reschedule.items():
            pipe.zadd(bucket, scores, xx=True)
        for bucket, codes in finished.items():
            pipe.zrem(bucket, *codes)
        pipe.execute()

    async def _call_in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            with trio.fail_after(SOCKET_TIMEOUT_S * 2):
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except (*DOWN_ERRORS, trio.TooSlowError) as exc:
            raise unavailable(type(exc).__name__) from None

    # -- subscriptions --
    #
    # The trio side says which channels it wants (`watch`, `unwatch`); the
    # listener thread owns the PubSub and sends the commands. A channel is
    # confirmed when Redis has answered every SSUBSCRIBE sent for it, so a
    # join or resume that waited for `watch` cannot miss an event.

    async def watch(self, code: str) -> None:
        """Subscribe to the session's channel (if not yet) and wait until it is confirmed."""
        name = channel(code)
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
            raise unavailable("subscription not confirmed")

    def unwatch(self, code: str) -> None:
        with self._lock:
            self._wanted.discard(channel(code))
        self._changes.put(None)

    async def _supervise_listener(self) -> None:
        """Run the listener thread; restart it (counted, logged) whenever it dies."""
        backoff = 0.05
        while not self._stop.is_set():
            started = trio.current_time()
            try:
                await trio.to_thread.run_sync(self._listen, trio.lowlevel.current_trio_token(), abandon_on_cancel=True)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self.stats.reconnects += 1
                if self.healthy:
                    log.warning("redis.listener_disconnected", extra={"fields": {"error": type(exc).__name__}})
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
        pubsub: Any = self.client.pubsub()  # type: ignore[no-untyped-call]
        poll = pubsub.get_sharded_message if self.cluster else pubsub.get_message
        try:
            self._resubscribe(pubsub, poll, token)
            self.healthy = True
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
                while message is not None and len(batch) < 256:
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
                messages = await self.history(code, 0)
                gone = not messages and not await self._call_in_thread(self.client.exists, session_keys(code)[0])
            except ServerError:
                continue
            if gone:
                # Test fix: a session that ended while this listener was away (its
                # `session:expired` published to nobody here) left the members here in
                # it for good (tests/test_redis.py::test_session_expiring_while_an_instance_
                # cannot_listen_...). End it for them now; the reason is gone with the
                # session, so it is the common one.
                notice = protocol.serialize(protocol.SessionExpired(code, "idle"))
                self._dispatch(Ended(code, notice))
                continue
            for m in messages:
                text = protocol.serialize(protocol.Message(code, m.seq, m.sender, m.data, m.ts))
                self._dispatch(Broadcast(code, text, m.sender, m.seq))

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        """On the trio thread: turn published events into hub events, in order."""
        for message in batch:
            kind = _kind(message)
            if kind == "ssubscribe":
                name = message["channel"].decode()
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
                # Test fix: an event read after SUNSUBSCRIBE was sent, or before the
                # newest SSUBSCRIBE of its channel was confirmed, belongs to an earlier
                # subscription; delivered, it reached a member that joined since (a
                # stale `session:presence` in tests/test_redis.py::test_two_instances_...).
                # A join or resume waits for the confirmation, so it needs none of them.
                continue
            self.stats.received += 1
            code = _code_of(name)
            what, exclude, seq, payload = message["data"].split(b"|", 3)
            if what == b"b":
                self._dispatch(Broadcast(code, payload.decode(), exclude.decode() or None, int(seq)))
            elif what == b"t":
                self._dispatch(Takeover(code, exclude.decode(), payload.decode()))
            elif what == b"e":
                self._dispatch(Ended(code, payload.decode()))


class _ListenerCollector(Collector):
    def __init__(self, stats: ListenerStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "tandem_redis_listener_restarts", "Pub/sub listener restarts, by cause", labels=["cause"]
        )
        restarts.add_metric(["disconnected"], self._stats.reconnects)
        restarts.add_metric(["crashed"], self._stats.restarts)
        yield restarts
        yield CounterMetricFamily(
            "tandem_redis_events_received", "Session events received over pub/sub", value=self._stats.received
        )


def _kind(message: dict[str, Any]) -> str:
    kind = message.get("type")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _code_of(name: str) -> str:
    return name.split("{", 1)[1].split("}", 1)[0]


def _sha1(body: str) -> str:
    return hashlib.sha1(body.encode()).hexdigest()
