"""The Redis store's Lua scripts: one script per step of a session's life.

Each script touches the keys of one session only, which share the hash tag
`{CODE}` (one Redis Cluster slot), so it runs atomically on any topology. A
script that changes what members see publishes the change as an event's
fields on the session's shard channel; `redis_store` turns them into events.
"""

from __future__ import annotations

from limiter import LUA_WINDOW_FUNCTIONS
from protocol import Member
from session_store import (
    Ended,
    Event,
    MessageStored,
    Paired,
    PeerLeft,
    PresenceChanged,
    StoredMessage,
    Takeover,
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
-- The members in join order with their state: "client_id:1,client_id:0" (1: online).
local function clients(s, ids)
  local parts = {}
  for i, id in ipairs(ids) do
    parts[i] = id .. ':' .. (redis.call('HEXISTS', s, 'o:' .. id) == 1 and '1' or '0')
  end
  return table.concat(parts, ',')
end
-- Publish an event on the session's shard channel as its fields, kind first
-- (redis_store.parse_event): m|seq|ts|from|data, a|clients, p|client_id|0 or 1,
-- l|client_id, t|client_id|conn_id, e|reason; with tracing on, tp|seq|traceparent
-- just before the m of that seq (tracing.py; parse_event, and so an instance
-- not tracing, skips it).
local function emit(...)
  redis.call('SPUBLISH', KEYS[3], table.concat({...}, '|'))
end
-- A member's rate-limit keys beside the session (tandem:{code}:rl:<rule>:<client_id>)
-- are registered in the hash as 'k:<key>' by append; leave (one member's, or all)
-- and expiry delete them, so none outlives its session.
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
  redis.call('PEXPIREAT', KEYS[4], int(at))  -- the mids, when there are any
end
"""

# KEYS: session hash, history list, channel, mids (redis_scripts.session_keys).
# ARGV per script below.
# A member's authenticated `sub` is the field 'u:<client_id>' (none with authentication off).
# ARGV: client_id, token_hash, conn_id, idle_ms, ttl_ms, grace, user ('' for none)
_CREATE = """
local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local idle_at, ttl_at = now + tonumber(ARGV[4]), now + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'created', int(now), 'idle_at', int(idle_at), 'ttl_at', int(ttl_at),
  'seq', 0, 'trim', 0, 'r', ARGV[1], 'm:' .. ARGV[1], ARGV[2], 'o:' .. ARGV[1], ARGV[3])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'u:' .. ARGV[1], ARGV[7]) end
refresh(KEYS[1], KEYS[2], idle_at, ttl_at, tonumber(ARGV[6]))
return {1, math.min(idle_at, ttl_at)}
"""

# ARGV: client_id, token_hash, conn_id, idle_ms, grace, user ('' for none)
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
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'u:' .. ARGV[1], ARGV[6]) end
refresh(KEYS[1], KEYS[2], idle_at, tonumber(v[2]), tonumber(ARGV[5]))
local members = clients(KEYS[1], ids)
if #ids == 2 then emit('a', members) end
local out = {tonumber(v[3]), members}
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[#out + 1] = entry end
return out
"""

# ARGV: client_id, token_hash, conn_id, idle_ms, grace, last_seq, user ('' for none: not checked)
_RESUME = """
local now = now_ms()
local v = alive(KEYS[1], now)
if not v then return {-1} end
local cid = ARGV[1]
local token = redis.call('HGET', KEYS[1], 'm:' .. cid)
if not token or token ~= ARGV[2] then return {-4} end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'u:' .. cid) ~= ARGV[7] then return {-4} end
local previous = redis.call('HGET', KEYS[1], 'o:' .. cid)
local idle_at = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'o:' .. cid, ARGV[3], 'idle_at', int(idle_at))
refresh(KEYS[1], KEYS[2], idle_at, tonumber(v[2]), tonumber(ARGV[5]))
if previous and previous ~= ARGV[3] then emit('t', cid, previous) end
emit('p', cid, '1')
local out = {tonumber(v[3]), tonumber(v[4]), clients(KEYS[1], split(v[5]))}
local after = tonumber(ARGV[6])
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if tonumber(string.match(entry, '^(%d+)|')) > after then out[#out + 1] = entry end
end
return out
"""

# KEYS[5..]: rate-limit keys. ARGV: client_id, conn_id, data, idle_ms, grace,
# history_size, mid ('' for none), then (limit, window_ms) per rate-limit key,
# then (with tracing on) the send's W3C traceparent, published as `tp` before the message.
# Returns {seq}, {seq, 1} (a duplicate `mid`: nothing stored or counted),
# {-1} (no such session or member) or {-9, retry_ms, key index}.
# A history entry (and a message event's fields) is seq|ts|from|#mid|mid|data.
_APPEND = """
local now = now_ms()
local cid, mid, traceparent = ARGV[1], ARGV[7], ARGV[2 * #KEYS]
local v = redis.call('HMGET', KEYS[1], 'idle_at', 'ttl_at', 'o:' .. cid)
if not v[1] or tonumber(v[1]) <= now or tonumber(v[2]) <= now or v[3] ~= ARGV[2] then return {-1} end
if mid ~= '' then
  local stored = redis.call('HGET', KEYS[4], cid .. '|' .. mid)
  if stored then
    -- A resend is activity; its write also makes a WAIT after it cover the original's.
    local idle_at = now + tonumber(ARGV[4])
    redis.call('HSET', KEYS[1], 'idle_at', int(idle_at))
    refresh(KEYS[1], KEYS[2], idle_at, tonumber(v[2]), tonumber(ARGV[5]))
    return {tonumber(stored), 1}
  end
end
for i = 5, #KEYS do
  local limit, window = tonumber(ARGV[2 * i - 2]), tonumber(ARGV[2 * i - 1])
  local recent = window_recent(KEYS[i], limit, window, now)
  if #recent >= limit then return {-9, recent[limit] + window - now, i - 4} end
end
local own = string.sub(KEYS[1], 1, -2)  -- 'tandem:{code}:'
for i = 5, #KEYS do
  window_add(KEYS[i], tonumber(ARGV[2 * i - 2]), tonumber(ARGV[2 * i - 1]), now)
  if string.sub(KEYS[i], 1, #own) == own then redis.call('HSETNX', KEYS[1], 'k:' .. KEYS[i], 1) end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local idle_at = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'idle_at', int(idle_at))
local entry = int(seq) .. '|' .. int(now) .. '|' .. cid .. '|' .. #mid .. '|' .. mid .. '|' .. ARGV[3]
if mid ~= '' then redis.call('HSET', KEYS[4], cid .. '|' .. mid, int(seq)) end
local size = tonumber(ARGV[6])
local length = redis.call('RPUSH', KEYS[2], entry)
if length > size then
  -- The mids of the messages leaving history are forgotten with them.
  for _, old in ipairs(redis.call('LRANGE', KEYS[2], 0, length - size - 1)) do
    local from, n, rest = string.match(old, '^%d+|%d+|([^|]*)|(%d+)|(.*)$')
    if from and tonumber(n) > 0 then redis.call('HDEL', KEYS[4], from .. '|' .. string.sub(rest, 1, tonumber(n))) end
  end
  redis.call('LTRIM', KEYS[2], -size, -1)
  redis.call('HSET', KEYS[1], 'trim', int(seq - size))
end
refresh(KEYS[1], KEYS[2], idle_at, tonumber(v[2]), tonumber(ARGV[5]))
if traceparent and traceparent ~= '' then emit('tp', int(seq), traceparent) end
emit('m', entry)
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
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
  return 1
end
drop_limits(KEYS[1], cid)
redis.call('HSET', KEYS[1], 'r', table.concat(rest, ','))
redis.call('HDEL', KEYS[1], 'm:' .. cid, 'o:' .. cid, 'u:' .. cid)
emit('l', cid)
return 0
"""

# ARGV: client_id, conn_id
_DISCONNECT = """
local cid = ARGV[1]
if redis.call('HGET', KEYS[1], 'o:' .. cid) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'o:' .. cid)
emit('p', cid, '0')
return 1
"""

# ARGV: (none)
_EXPIRE = """
local now = now_ms()
local v = redis.call('HMGET', KEYS[1], 'idle_at', 'ttl_at')
if not v[1] then return {-1} end
local idle_at, ttl_at = tonumber(v[1]), tonumber(v[2])
if math.min(idle_at, ttl_at) > now then return {0, math.min(idle_at, ttl_at)} end
local reason = ttl_at <= idle_at and 'ttl' or 'idle'
drop_limits(KEYS[1], nil)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
emit('e', reason)
return {1, reason}
"""

# The session's members and the connection holding each ('' while offline),
# or nothing when the session is gone. For a resync.
_STATE = """
local r = redis.call('HGET', KEYS[1], 'r')
if not r then return {} end
local out = {r}
for _, id in ipairs(split(r)) do out[#out + 1] = redis.call('HGET', KEYS[1], 'o:' .. id) or '' end
return out
"""

# KEYS: session hash, history list. ARGV: after_seq. The history for a resync.
_HISTORY = """
local out = {}
for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if tonumber(string.match(entry, '^(%d+)|')) > tonumber(ARGV[1]) then out[#out + 1] = entry end
end
return out
"""

# The admin API's view of a live session: {created, expires_at, seq, clients,
# then each member's user ('' for none)} (clients as "client_id:1,client_id:0"),
# or nothing when there is none.
_INFO = """
local v = alive(KEYS[1], now_ms())
if not v then return {} end
local ids = split(v[5])
local out = {tonumber(redis.call('HGET', KEYS[1], 'created')), math.min(tonumber(v[1]), tonumber(v[2])),
  tonumber(v[3]), clients(KEYS[1], ids)}
for _, id in ipairs(ids) do out[#out + 1] = redis.call('HGET', KEYS[1], 'u:' .. id) or '' end
return out
"""

# An operator ends a live session: like expiry, with reason "ended". 1, or 0 when there is none.
_END = """
if not alive(KEYS[1], now_ms()) then return 0 end
drop_limits(KEYS[1], nil)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
emit('e', 'ended')
return 1
"""

# ARGV: client_id, token_hash, user ('' for none: not checked). A member's
# credentials, checked without a change: 1, -1 (no live session) or -4 (wrong
# client_id or token, or another user's member).
_MEMBER = """
if not alive(KEYS[1], now_ms()) then return -1 end
if redis.call('HGET', KEYS[1], 'm:' .. ARGV[1]) ~= ARGV[2] then return -4 end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'u:' .. ARGV[1]) ~= ARGV[3] then return -4 end
return 1
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
        "state": _STATE,
        "info": _INFO,
        "end": _END,
        "member": _MEMBER,
    }.items()
}


def session_keys(code: str) -> list[str]:
    """The keys (and shard channel) of one session, all in the slot of `{code}`:
    the session hash, the history list, the channel, the members' mids (seq by
    client_id|mid, for the messages in history)."""
    return [f"tandem:{{{code}}}:s", f"tandem:{{{code}}}:h", f"tandem:{{{code}}}:c", f"tandem:{{{code}}}:d"]


def channel(code: str) -> str:
    return f"tandem:{{{code}}}:c"


def stored_message(entry: bytes) -> StoredMessage:
    """A history entry (and a message event's fields): seq|ts|from|#mid|mid|data
    (and seq|ts|from|data, written before `mid` existed)."""
    parts = entry.split(b"|", 4)
    if len(parts) == 5 and parts[3].isdigit():
        seq, ts, sender, size, rest = parts
        n = int(size)
        return StoredMessage(int(seq), sender.decode(), rest[n + 1 :], int(ts), rest[:n].decode() if n else None)
    seq, ts, sender, data = entry.split(b"|", 3)
    return StoredMessage(int(seq), sender.decode(), data, int(ts))


def members(clients: bytes) -> tuple[Member, ...]:
    """Members from the scripts' "client_id:1,client_id:0" (1: online)."""
    return tuple(Member(m[:-2].decode(), m.endswith(b":1")) for m in clients.split(b","))


def parse_event(code: str, fields: bytes) -> Event | None:
    """An event from the fields a script published (redis_scripts.emit); None if unknown."""
    kind, _, rest = fields.partition(b"|")
    match kind:
        case b"m":
            return MessageStored(code, stored_message(rest))
        case b"a":
            return Paired(code, members(rest))
        case b"p":
            client_id, _, online = rest.partition(b"|")
            return PresenceChanged(code, client_id.decode(), online == b"1")
        case b"l":
            return PeerLeft(code, rest.decode())
        case b"t":
            client_id, _, conn_id = rest.partition(b"|")
            return Takeover(code, client_id.decode(), conn_id.decode())
        case b"e":
            return Ended(code, rest.decode())
    return None
