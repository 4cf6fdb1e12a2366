"""Instances on one Redis: each one's heartbeat, and the members of those that died.

Every instance keeps a heartbeat (its entry in one sorted set, scored with
Redis's clock) and the set of members online on it. Any live instance's
reaper claims an instance whose heartbeat is older than DEAD_AFTER_S and marks
its members offline, which tells their peers (`session:presence`). An
instance that finds itself reaped (it was paused) closes its sockets with 1012.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable

import trio

import redis_client
from protocol import ServerError

log = logging.getLogger("tandem.redis")

INSTANCES_KEY = "tandem:instances"
# A heartbeat this often; an instance silent for DEAD_AFTER_S is dead. A
# member of a dead instance is offline, and its peer told, within about
# DEAD_AFTER_S + HEARTBEAT_S (docs/architecture.md, "Redis mode internals": under 10 s).
HEARTBEAT_S = 2.0
DEAD_AFTER_S = 6.0
# The instances' keys outlive the last beat this long, for a reaper that comes
# later (every instance was gone): longer than any session (SESSION_TTL is at
# most a year).
MEMBERS_TTL_S = 400 * 86400

# KEYS: the instances (one key: on a cluster a script's keys share one slot).
# ARGV: id, members TTL (s), "1" for the first beat. Returns 1, or 0 when a
# later beat found the entry gone (this instance was reaped): it is put back.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kept = 1
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
else
  kept = redis.call('ZADD', KEYS[1], 'XX', 'CH', now, ARGV[1])
  if kept == 0 then redis.call('ZADD', KEYS[1], now, ARGV[1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])  -- no key without a TTL
return kept
"""

# KEYS: the instances. ARGV: dead after (ms), this instance's id. Claims (removes)
# every instance silent for that long and returns their ids.
_CLAIM_DEAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, 16)
local claimed = {}
for _, id in ipairs(dead) do
  if id ~= ARGV[2] and redis.call('ZREM', KEYS[1], id) == 1 then claimed[#claimed + 1] = id end
end
return claimed
"""


def members_key(instance: str) -> str:
    return f"tandem:instance:{{{instance}}}:members"


def _entry(code: str, client_id: str, conn_id: str) -> str:
    return f"{code}|{client_id}|{conn_id}"


class Instances:
    """This instance's entry among the instances, and the reaper of dead ones.

    `disconnect(code, client_id, conn_id)` marks a member offline (if that
    connection still holds it); `evicted()` is called when this instance was
    declared dead while alive.
    """

    def __init__(
        self,
        connector: redis_client.Connector,
        disconnect: Callable[[str, str, str], Awaitable[None]],
        evicted: Callable[[], None],
    ) -> None:
        self.redis = connector
        self.id = secrets.token_hex(8)
        self._disconnect = disconnect
        self._evicted = evicted
        self._heartbeat = redis_client.Script(_HEARTBEAT)
        self._claim_dead = redis_client.Script(_CLAIM_DEAD)
        self._stale: set[str] = set()  # entries to drop at the next beat
        self._beats = 0
        self.reaped = 0  # members of dead instances marked offline by this one

    async def online(self, code: str, client_id: str, conn_id: str) -> None:
        """A member is online here. Best effort: Redis down, it is only not reaped."""
        with contextlib.suppress(ServerError):
            await self.redis.call(lambda client: self._add_member(client, _entry(code, client_id, conn_id)))

    def _add_member(self, client: redis_client.Client, entry: str) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.sadd(members_key(self.id), entry)
        pipe.expire(members_key(self.id), int(MEMBERS_TTL_S))  # no key without a TTL
        pipe.execute()

    async def offline(self, code: str, client_id: str, conn_id: str) -> None:
        with contextlib.suppress(ServerError):
            await self.redis.call(lambda client: client.srem(members_key(self.id), _entry(code, client_id, conn_id)))

    def forget(self, code: str, client_id: str, conn_id: str) -> None:
        """Drop an entry at the next beat (from code that cannot wait: an ended session)."""
        self._stale.add(_entry(code, client_id, conn_id))

    async def run(self) -> None:
        """Beat, drop stale entries and reap dead instances, every HEARTBEAT_S."""
        while True:
            with contextlib.suppress(ServerError):
                await self._beat()
                await self._reap()
            await trio.sleep(HEARTBEAT_S)

    async def _beat(self) -> None:
        first = "1" if self._beats == 0 else "0"
        keys, args = [INSTANCES_KEY], [self.id, int(MEMBERS_TTL_S), first]
        kept = await self.redis.call(lambda client: self._heartbeat(client, keys, args))
        await self.redis.call(lambda client: client.expire(members_key(self.id), int(MEMBERS_TTL_S)))
        self._beats += 1
        if self._stale:
            stale, self._stale = list(self._stale), set()
            await self.redis.call(lambda client: client.srem(members_key(self.id), *stale))
        if not kept:
            # Another instance found this one silent (a pause, a partition) and
            # marked its members offline: its sockets are closed, to resume anew.
            log.warning("redis.instance_evicted", extra={"fields": {"instance": self.id}})
            self._evicted()

    async def _reap(self) -> None:
        args = [round(DEAD_AFTER_S * 1000), self.id]
        dead: list[bytes] = await self.redis.call(lambda client: self._claim_dead(client, [INSTANCES_KEY], args))
        for raw in dead:
            await self._reap_members(raw.decode())

    async def _reap_members(self, instance: str) -> None:
        """Every member the dead `instance` held: offline, then its set goes."""
        key = members_key(instance)
        entries = await self.redis.call(lambda client: client.smembers(key))
        for item in entries:
            code, client_id, conn_id = (item.decode() if isinstance(item, bytes) else item).split("|", 2)
            await self._disconnect(code, client_id, conn_id)
        await self.redis.call(lambda client: client.delete(key))
        self.reaped += len(entries)
        log.warning("redis.instance_dead", extra={"fields": {"instance": instance, "members": len(entries)}})

    async def leave(self) -> None:
        """A clean shutdown: this instance's entry goes (its members disconnected already)."""
        with contextlib.suppress(ServerError):
            await self.redis.call(lambda client: client.zrem(INSTANCES_KEY, self.id))
            await self.redis.call(lambda client: client.delete(members_key(self.id)))
