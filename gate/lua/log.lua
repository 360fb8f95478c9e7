-- Velocity logs of accounts, devices and IPs: append-only strings of fixed-width binary records,
-- one per time bucket. gate/velocity.py computes every key name, record, TTL and cap, reads the
-- log buckets with a plain MGET in the same pipeline and turns them into windows itself. Only the
-- write happens here, because Redis's Lua machinery, not the data, is what costs: every key,
-- argument and reply value that crosses into Lua, and every redis.call (docs/BENCHMARKS.md §6).
--
-- op 'r' (a refund request):
--   KEYS  1 the current bucket  [2 the account's tenure counters]
--   ARGV  1 'r'  2 record (kind and refund id first)  3 bucket TTL (ms)  4 cap (bytes)
--         [5 tenure TTL (ms)  6.. tenure counters (BITFIELD u32 offsets '#i') to add 1 to]
--   -> 1 appended | 0 the bucket already holds this refund (a retry, or the same id with other
--   content), so a storm of retries cannot push real history out of a capped bucket; the gate
--   counts each refund id once when it reads, whatever the buckets hold. The tenure counters
--   count exactly what was appended.
-- op 'a' (append a record: an account seen by an order event, a tombstone that takes back a
--   refund whose id turned out to be reused):
--   KEYS  1 bucket  ARGV  1 'a'  2 record  3 bucket TTL (ms)  4 cap (bytes)  -> 1
-- op 'e' (an event, counted once per event id):
--   KEYS  1 the event's dedup key  2 log to append to  [3 the account's tenure counters]
--   ARGV  1 'e'  2 dedup TTL (ms)  3 record ('' = none)  4 log TTL (ms)  5 cap (bytes)
--         [6 tenure TTL (ms)  7.. tenure counters to add 1 to]
--   -> 0 counted now | 1 already counted
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

-- The same without reading the bucket first (APPEND says how long it became): for writers that
-- need no duplicate check. Returns whether the bucket was new.
local function push(key, record, ttl, cap)
  local n = redis.call('APPEND', key, record)
  if n == #record then
    redis.call('PEXPIRE', key, ttl)
    return true
  elseif n > cap then
    local keep = cap / 2 + #record
    redis.call('SET', key, string.sub(redis.call('GET', key), n - keep + 1), 'KEEPTTL')
  end
  return false
end

-- Add 1 to the u32 counters named by ARGV[first..] of a tenure key, and keep it ttl longer.
local function tally(key, ttl, first)
  local args = {'BITFIELD', key, 'OVERFLOW', 'SAT'}
  for i = first, #ARGV do
    args[#args + 1] = 'INCRBY'
    args[#args + 1] = 'u32'
    args[#args + 1] = ARGV[i]
    args[#args + 1] = 1
  end
  redis.call(unpack(args))
  redis.call('PEXPIRE', key, ttl)
end

if op == 'r' then
  local cur = redis.call('GET', KEYS[1])
  if cur and string.find(cur, string.sub(ARGV[2], 1, 5), 1, true) then return 0 end
  append(KEYS[1], cur, ARGV[2], ARGV[3], tonumber(ARGV[4]))
  if KEYS[2] then tally(KEYS[2], ARGV[5], 6) end
  return 1
elseif op == 'a' then
  push(KEYS[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))
  return 1
elseif op == 'e' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return 1 end
  if ARGV[3] ~= '' then
    if not push(KEYS[2], ARGV[3], ARGV[4], tonumber(ARGV[5])) then
      redis.call('PEXPIRE', KEYS[2], ARGV[4], 'GT')
    end
  end
  if KEYS[3] then tally(KEYS[3], ARGV[6], 7) end
  return 0
end
return redis.error_reply('unknown op')
