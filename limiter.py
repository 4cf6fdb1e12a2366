"""Limits per client: who it is (its address, through trusted proxies), how many
sockets it holds, and rate limits as sliding-window logs in memory or in Redis.

A key keeps the times of its last `limit` admitted requests, so no span of
`window` seconds admits more than `limit` (a counter interpolates, GCRA admits
a burst) and `retry_after` is exact. `decide` is the rule with the clock passed
in; MemoryLimiter and RedisLimiter's Lua both follow it, checked by one table.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import Scope

import redis_client
from logging_setup import Outage
from protocol import ClientError, ErrorCode, ServerError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("tandem.limiter")

# Keys the in-memory limiter tracks at most; the least recently used go first
# (an attacker cycling addresses must not grow memory without bound).
MEMORY_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Rule:
    """`limit` requests per `window` seconds for one kind of request."""

    name: str
    limit: int
    window: float

    @property
    def policy(self) -> str:
        """The IETF RateLimit-Policy item for this rule."""
        return f'"{self.name}";q={self.limit};w={round(self.window)}'


@dataclass(frozen=True, slots=True)
class Limits:
    """The rules in force; None where a limit is off."""

    messages_user: Rule | None = None
    messages_ip: Rule | None = None
    connections_ip: Rule | None = None
    join_failures_ip: Rule | None = None  # failed joins and resumes per address
    code_failures: Rule | None = None  # failed joins and resumes per code, any address
    api_ip: Rule | None = None
    email_session: Rule | None = None  # e-mail invitations per session
    email_recipient: Rule | None = None  # e-mail invitations per recipient address, from any session


# IPv6 addresses are counted per block: one subscriber usually holds a /64
# and can rotate through it at will; a site often holds a /48 (65,536 /64s),
# so guessing failures, which a legitimate user rarely has, count per /48.
IPV6_BLOCK = 64
IPV6_SITE = 48


def address_block(ip: str, ipv6_prefix: int = IPV6_BLOCK) -> str:
    """What a limit per address counts: an IPv4 address, or an IPv6 address's block."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


def client_ip(scope: Scope, trusted: tuple[Network, ...]) -> str:
    """The socket's peer, or with a trusted proxy as peer, the nearest untrusted
    address of X-Forwarded-For (read from the right)."""
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded: list[str] = [
        value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"x-forwarded-for"
    ]
    hops: list[str] = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class SocketCount:
    """Open WebSockets, in total and per address (a limiter pseudonym).

    A socket counts from before its upgrade until it closes; `open` refuses
    one past MAX_SOCKETS or MAX_SOCKETS_IP (0: no cap), before any work is done.
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total_cap = total
        self.per_address_cap = per_address
        self.total = 0
        self.by_address: dict[str, int] = {}

    def open(self, address: str) -> str | None:
        """Count one socket of `address`; or return the name of the cap it would pass."""
        if self.total_cap and self.total >= self.total_cap:
            return "max_sockets"
        held = self.by_address.get(address, 0)
        if self.per_address_cap and held >= self.per_address_cap:
            return "max_sockets_ip"
        self.total += 1
        self.by_address[address] = held + 1
        return None

    def close(self, address: str) -> None:
        self.total -= 1
        held = self.by_address.pop(address) - 1
        if held:
            self.by_address[address] = held


class Pseudonyms:
    """Limiter keys for addresses and codes: keyed hashes, never the values.

    Redis holds limiter keys where anyone with access can read them; an
    unkeyed hash of an address is undone by hashing every address. The key is
    HASH_KEY, or one every instance on the store shares.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _hash(self, kind: bytes, value: str) -> str:
        return hmac.new(self._key, kind + value.encode(), hashlib.sha256).hexdigest()[:24]

    def address(self, ip: str, ipv6_prefix: int = IPV6_BLOCK) -> str:
        return self._hash(b"ip:", address_block(ip, ipv6_prefix))

    def code(self, code: str) -> str:
        return self._hash(b"code:", code)

    def user(self, sub: str) -> str:
        """An authenticated user (a token's `sub`) as a limiter key."""
        return self._hash(b"user:", sub)

    def recipient(self, address: str) -> str:
        """An e-mail address as limiter key: in lower case and without a `+tag`, so that
        `Bob+1@x.org` and `bob+2@x.org` count as the one mailbox they usually are."""
        local, _, domain = address.lower().rpartition("@")
        return self._hash(b"email:", f"{local.partition('+')[0]}@{domain}")

    def mac(self, text: str) -> str:
        """A tag proving this server (or an instance sharing its key) wrote `text`: admin cursors."""
        return self._hash(b"mac:", text)


@dataclass(frozen=True, slots=True)
class LimitKey:
    """One limit to check for a request: `rule` counted under `key`.

    `per_session`: the key belongs to one session (a member), so a store may
    keep it beside the session's own keys (same Redis Cluster slot).
    """

    rule: Rule
    key: str
    per_session: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: int  # requests still allowed in the current window
    retry_after: float  # seconds until the next request is allowed; 0 if allowed
    reset: float  # seconds until the window holds no request at all
    stamp: float = 0.0  # the time `hit` recorded, in the limiter's clock: what `refund` removes

    def headers(self, rule: Rule) -> dict[str, str]:
        """Retry-After (when refused) and the IETF draft RateLimit headers."""
        out = {
            "RateLimit-Policy": rule.policy,
            "RateLimit": f'"{rule.name}";r={self.remaining};t={max(0, round(self.reset))}',
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, int(-(-self.retry_after // 1))))
        return out


@dataclass(frozen=True, slots=True)
class Refusal:
    rule: str
    decision: Decision


def decide(history: Sequence[float], now: float, rule: Rule, consume: bool = True) -> tuple[Decision, list[float]]:
    """Admit one request at `now` given the key's admitted times, newest first.

    Returns the decision and the new history. With `consume=False` it only
    asks (nothing is recorded): how failed joins are checked before a join.
    """
    recent = [t for t in history[: rule.limit] if t > now - rule.window]
    if len(recent) >= rule.limit:
        oldest = recent[rule.limit - 1]
        wait = oldest + rule.window - now
        return Decision(False, 0, wait, recent[0] + rule.window - now), recent
    if consume:
        recent = [now, *recent][: rule.limit]
    reset = recent[0] + rule.window - now if recent else 0.0
    return Decision(True, rule.limit - len(recent), 0.0, reset, now), recent


def record(history: Sequence[float], now: float, rule: Rule) -> list[float]:
    """Record one event (a failed resume against a code) at `now`, whatever the count."""
    recent = [t for t in history[: rule.limit] if t > now - rule.window]
    return [now, *recent][: rule.limit]


def refund(history: Sequence[float], stamp: float) -> list[float]:
    """Take back one request admitted at `stamp`: counted first, it succeeded."""
    recent = list(history)
    if stamp in recent:
        recent.remove(stamp)
    return recent


class Limiter(Protocol):
    async def hit(self, rule: Rule, key: str) -> Decision:
        """Check and count one request."""
        ...

    async def peek(self, rule: Rule, key: str) -> Decision:
        """Check without counting."""
        ...

    async def record(self, rule: Rule, key: str) -> None:
        """Count one event without checking."""
        ...

    async def refund(self, rule: Rule, key: str, stamp: float) -> None:
        """Take back the request that `hit` admitted at `stamp`.

        Attempts that only count when they fail (joins, resumes) are counted
        first, in the same atomic step as the check, and refunded on success:
        a check followed by a later record lets concurrent attempts all pass.
        """
        ...


class MemoryLimiter:
    """Per-process limits; the embedded store's, and Redis's fallback."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MEMORY_MAX_KEYS,
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._keys: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def _store(self, slot: tuple[str, str], history: list[float]) -> None:
        self._keys[slot] = history
        self._keys.move_to_end(slot)
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)

    def now(self) -> float:
        return self._clock()

    def hit_all(self, keys: Sequence[LimitKey], now: float | None = None) -> Refusal | None:
        """Admit one request under every key, or return the first refusal (nothing counted).

        `now` (default: the clock) is the stamp `refund_all` takes back.
        """
        now = self._clock() if now is None else now
        for k in keys:
            decision, _ = decide(self._keys.get((k.rule.name, k.key), ()), now, k.rule, consume=False)
            if not decision.allowed:
                return Refusal(k.rule.name, decision)
        for k in keys:
            slot = (k.rule.name, k.key)
            self._store(slot, decide(self._keys.get(slot, ()), now, k.rule)[1])
        return None

    def refund_all(self, keys: Sequence[LimitKey], stamp: float) -> None:
        """Take back what `hit_all` counted at `stamp`."""
        for k in keys:
            slot = (k.rule.name, k.key)
            history = self._keys.get(slot)
            if history is not None:
                self._keys[slot] = refund(history, stamp)

    def hit_now(self, rule: Rule, key: str) -> Decision:
        slot = (rule.name, key)
        decision, history = decide(self._keys.get(slot, ()), self._clock(), rule)
        self._store(slot, history)
        return decision

    async def hit(self, rule: Rule, key: str) -> Decision:
        return self.hit_now(rule, key)

    async def peek(self, rule: Rule, key: str) -> Decision:
        return decide(self._keys.get((rule.name, key), ()), self._clock(), rule, consume=False)[0]

    async def record(self, rule: Rule, key: str) -> None:
        slot = (rule.name, key)
        self._store(slot, record(self._keys.get(slot, ()), self._clock(), rule))

    async def refund(self, rule: Rule, key: str, stamp: float) -> None:
        slot = (rule.name, key)
        history = self._keys.get(slot)
        if history is not None:
            self._keys[slot] = refund(history, stamp)


# The rule of `decide` in Lua, shared by LUA_WINDOW and the session store's
# append script. A key is a list of admitted times in ms, newest first.
LUA_WINDOW_FUNCTIONS = """
local function window_recent(key, limit, window, now)
  local recent = {}
  for _, v in ipairs(redis.call('LRANGE', key, 0, limit - 1)) do
    local t = tonumber(v)
    if t > now - window then recent[#recent + 1] = t end
  end
  return recent
end
local function window_add(key, limit, window, now)
  redis.call('LPUSH', key, string.format('%d', now))
  redis.call('LTRIM', key, 0, limit - 1)
  redis.call('PEXPIRE', key, window)
end
"""

# KEYS[1]: the key. ARGV: limit, window_ms, mode ("hit", "peek", "record" or
# "refund"), now_ms ("" = Redis TIME; the tests pass their own clock; for
# "refund" the stamp to take back). The reply's fifth item is the stamp.
LUA_WINDOW = (
    LUA_WINDOW_FUNCTIONS
    + """
local limit, window, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now
if ARGV[4] ~= '' then now = tonumber(ARGV[4]) else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if mode == 'refund' then
  redis.call('LREM', KEYS[1], 1, string.format('%d', now))
  return {1, 0, '0', '0', tostring(now)}
end
local recent = window_recent(KEYS[1], limit, window, now)
if mode ~= 'record' and #recent >= limit then
  return {0, 0, tostring(recent[limit] + window - now), tostring(recent[1] + window - now), tostring(now)}
end
if mode ~= 'peek' then
  window_add(KEYS[1], limit, window, now)
  table.insert(recent, 1, now)
  if #recent > limit then recent[#recent] = nil end
end
local reset = 0
if #recent > 0 then reset = recent[1] + window - now end
return {1, limit - #recent, '0', tostring(reset), tostring(now)}
"""
)


def redis_key(rule: Rule, key: str) -> str:
    """Hash-tagged per key, so that a Redis Cluster spreads the limiter."""
    return f"tandem:rl:{{{rule.name}:{key}}}"


def parse_reply(reply: Sequence[Any]) -> Decision:
    allowed, remaining, retry_ms, reset_ms, stamp_ms = reply
    return Decision(
        bool(allowed),
        int(remaining),
        float(retry_ms) / 1000,
        float(reset_ms) / 1000,
        float(stamp_ms),
    )


class RedisLimiter:
    """Limits shared by every instance on one Redis; one EVALSHA per check.

    While Redis is unreachable it fails open onto a per-process MemoryLimiter
    (or, with `fail_closed`, refuses), counted and logged once per outage.
    """

    def __init__(self, connector: redis_client.Connector, *, fail_closed: bool = False) -> None:
        self._redis = connector
        self._script = redis_client.Script(LUA_WINDOW)
        self._fallback = MemoryLimiter()
        self._fail_closed = fail_closed
        self.outage = Outage(log, "limiter.redis_down", "limiter.redis_back")
        self.fallbacks = 0  # checks decided without Redis

    def _call(self, rule: Rule, key: str, mode: str, now_ms: int | None = None) -> Decision:
        """In a worker thread: one check (`now_ms`: a refund's stamp, or a test's clock)."""
        args = [rule.limit, round(rule.window * 1000), mode, "" if now_ms is None else now_ms]
        return parse_reply(self._script(self._redis.client, [redis_key(rule, key)], args))

    async def _run(self, rule: Rule, key: str, mode: str, stamp_ms: int | None = None) -> Decision:
        try:
            decision = await redis_client.call(self._call, rule, key, mode, stamp_ms)
        except ServerError as exc:  # an outage (redis_client.DOWN_ERRORS), mapped in one place
            self.fallbacks += 1
            self.outage.failed(exc.message, fail_closed=self._fail_closed, redis=self._redis.display)
            if self._fail_closed:
                return Decision(False, 0, 1.0, 1.0)
            match mode:
                case "hit":
                    return await self._fallback.hit(rule, key)
                case "peek":
                    return await self._fallback.peek(rule, key)
                case "refund":  # a stamp of Redis's clock: nothing to take back here
                    return Decision(True, 0, 0.0, 0.0)
                case _:
                    await self._fallback.record(rule, key)
                    return Decision(True, 0, 0.0, 0.0)
        self.outage.recovered(fallbacks=self.fallbacks)
        return decision

    async def hit(self, rule: Rule, key: str) -> Decision:
        return await self._run(rule, key, "hit")

    async def peek(self, rule: Rule, key: str) -> Decision:
        return await self._run(rule, key, "peek")

    async def record(self, rule: Rule, key: str) -> None:
        await self._run(rule, key, "record")

    async def refund(self, rule: Rule, key: str, stamp: float) -> None:
        await self._run(rule, key, "refund", round(stamp))


def rate_limited(rule_name: str, retry_after: float) -> ClientError:
    return ClientError(
        f"rate limit {rule_name} exceeded",
        ErrorCode.RATE_LIMITED,
        retry_after=round(max(retry_after, 0.001), 3),
    )
