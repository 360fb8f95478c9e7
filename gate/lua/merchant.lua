-- Merchant: counters in one small string per day, incremented with BITFIELD (one command however
-- many counters) and returned raw; gate/velocity.py names the keys, lays out the counters and
-- turns them into sliding-window estimates. Only native commands run here. Merchants are busy:
-- their counts are bucketed, never logged.
--
-- op 'r' (a refund request):
--   KEYS  1 the refund's dedup key  2 today's counters  3.. the days before, newest first
--   ARGV  1 'r'  2 dedup TTL (ms)  3 counters TTL (ms)  4.. the counters to add 1 to ('#<i>':
--         the i-th u32), the day's refund counter first
--   -> {0 counted now | 1 already counted, {counters of each day}}
-- op 'o' (an order event): KEYS 1 the event's dedup key  2 today's counters; ARGV as for 'r'
--   (the day's order counter first) -> {0 | 1}
-- op 'u' (take back a refund counted under a reused refund id): as 'r', but subtracts 1
--   -> {1 if it had been counted, else 0}
-- The increments happen only if the dedup key was new; the first of a day sets the TTL.
local op = ARGV[1]

local function add(by)
  local args = {KEYS[2]}
  for i = 4, #ARGV do
    args[#args + 1] = 'INCRBY'; args[#args + 1] = 'u32'; args[#args + 1] = ARGV[i]
    args[#args + 1] = by
  end
  return redis.call('BITFIELD', unpack(args))[1]
end

if op == 'u' then
  if redis.call('DEL', KEYS[1]) == 0 then return {0} end
  add('-1')
  return {1}
end
local status = 1
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then
  status = 0
  if add('1') == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
end
if op == 'o' then return {status} end
return {status, redis.call('MGET', unpack(KEYS, 2))}
