"""The Lua scripts of :class:`broker.state.redis.RedisStore`: each runs atomically on the Redis server (one
round trip), which is what makes its operation atomic (the module docstring of :mod:`broker.state.redis` says why
each operation needs it and what a Cluster changes)."""

from __future__ import annotations

from typing import Final

# KEYS: the claims; ARGV[i]: PX of KEYS[i]. All or nothing: one existing key refuses them all.
CLAIM_ALL_SCRIPT: Final = """
if redis.call('EXISTS', unpack(KEYS)) > 0 then return 0 end
for i = 1, #KEYS do redis.call('SET', KEYS[i], '1', 'PX', ARGV[i]) end
return 1
"""

# KEYS: ARGV[1] revocation keys, then the claims; ARGV[2..]: PX of each claim. Returns -i when revocation i
# exists, +j when claim j was already taken (nothing is then set), 0 when all claims were recorded.
GUARD_SCRIPT: Final = """
local nrev = tonumber(ARGV[1])
for i = 1, nrev do if redis.call('EXISTS', KEYS[i]) == 1 then return -i end end
for i = nrev + 1, #KEYS do if redis.call('EXISTS', KEYS[i]) == 1 then return i - nrev end end
for i = nrev + 1, #KEYS do redis.call('SET', KEYS[i], '1', 'PX', ARGV[i - nrev + 1]) end
return 0
"""

# Counter reservation (CONTRACT §12). KEYS: counter sorted sets (distinct); ARGV[1]: the event's score (now);
# then for key i, ARGV[3i-1..3i+1]: window cut-off (now - window: events at or below it are out), PX, member.
# Returns, per key, the members in the window BEFORE this event (the caller parses count and sum from them,
# exactly as window_stats does). Types are checked before any write: a key of another type refuses the whole
# reservation with nothing added (a script error does not roll back writes already made).
RESERVE_SCRIPT: Final = """
for i = 1, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'zset' and t ~= 'none' then return redis.error_reply('WRONGTYPE counter key holds another type') end
end
local seen = {}
for i = 1, #KEYS do
  local cut, px, member = ARGV[3 * i - 1], ARGV[3 * i], ARGV[3 * i + 1]
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', cut)
  seen[i] = redis.call('ZRANGE', KEYS[i], 0, -1)
  redis.call('ZADD', KEYS[i], ARGV[1], member)
  redis.call('PEXPIRE', KEYS[i], px)
end
return seen
"""

# KEYS[1]: revocation; ARGV[1]: PX. PTTL is -2 when absent, -1 without expiry: never shorten a revocation.
REVOKE_SCRIPT: Final = """
local left = redis.call('PTTL', KEYS[1])
if left == -1 or left >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""

# Records are hashes {v: version, d: JSON text}: the version is compared without decoding JSON in Lua.
# KEYS[1]: record; ARGV[1]: JSON; ARGV[2]: PX. Unconditional write, version + 1 (no ABA for a stale CAS).
PUT_JSON_SCRIPT: Final = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
redis.call('HSET', KEYS[1], 'v', v + 1, 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return v + 1
"""

# KEYS[1]: record; ARGV[1]: expected version (0 = absent); ARGV[2]: JSON; ARGV[3]: PX.
CAS_JSON_SCRIPT: Final = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', v + 1, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
