-- Velocity logs of accounts, devices and IPs: append-only strings of fixed-width binary records,
-- one per time bucket. gate/velocity.py computes every key name, record, TTL and cap, and turns
-- the logs into windows itself: this script runs only native commands, because Redis's Lua
-- interpreter, not the data, is what costs (docs/BENCHMARKS.md §6).
--
-- op 'r' (a refund request):
--   KEYS  the entity's other keys to read (blocklist entry, ...), then its log buckets, current
--         bucket first
--   ARGV  1 'r'  2 index in KEYS of the current bucket  3 record  4 bucket TTL (ms)
--         5 cap (bytes)  6 the record's first bytes (kind and refund id)
--   -> the values of all KEYS (read before the append)
--   The record is appended unless the current bucket already holds this refund (a retry, or
--   the same id with other content); the gate counts each refund id once when it reads.
-- op 'a' (append a record: an account seen by an order event, a tombstone that takes back a
--   refund whose id turned out to be reused):
--   KEYS  1 bucket  ARGV  1 'a'  2 record  3 bucket TTL (ms)  4 cap (bytes)  -> {0}
-- op 'e' (an event, counted once per event id):
--   KEYS  1 the event's dedup key  2 log to append to
--   ARGV  1 'e'  2 dedup TTL (ms)  3 record ('' = none)  4 log TTL (ms)  5 cap (bytes)
--   -> {0 counted now | 1 already counted}
--
-- A bucket at its cap keeps its newest half plus the new record (records are fixed width and
-- half the cap is a whole number of records), so the newest history always survives.
local op = ARGV[1]

local function append(key, cur, record, ttl, cap)
  if not cur then
    redis.call('SET', key, record, 'PX', ttl)
  elseif #cur < cap then
    redis.call('APPEND', key, record)
  else
    redis.call('SET', key, string.sub(cur, #cur - cap / 2 + 1) .. record, 'KEEPTTL')
  end
end

if op == 'r' then
  local values = redis.call('MGET', unpack(KEYS))
  local i = tonumber(ARGV[2])
  local cur = values[i]
  if not (cur and string.find(cur, ARGV[6], 1, true)) then
    append(KEYS[i], cur, ARGV[3], ARGV[4], tonumber(ARGV[5]))
  end
  return values
elseif op == 'a' then
  append(KEYS[1], redis.call('GET', KEYS[1]), ARGV[2], ARGV[3], tonumber(ARGV[4]))
  return {0}
elseif op == 'e' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return {1} end
  if ARGV[3] ~= '' then
    local cur = redis.call('GET', KEYS[2])
    append(KEYS[2], cur, ARGV[3], ARGV[4], tonumber(ARGV[5]))
    if cur then redis.call('PEXPIRE', KEYS[2], ARGV[4], 'GT') end
  end
  return {0}
end
return redis.error_reply('unknown op')
