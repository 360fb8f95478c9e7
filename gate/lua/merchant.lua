-- Merchant: daily counters in one ring string, 9 day slots of u32 (the slot's day number, then
-- refunds, quick digital refunds, BNPL refunds, orders, BNPL orders, refunds in each hour),
-- incremented with one BITFIELD. gate/velocity.py lays out the ring, names the counters, reads
-- the ring with a plain GET in the same pipeline and turns it into sliding-window estimates; on
-- the hot path only native commands run here. Merchants are busy: their counts are bucketed,
-- never logged.
--
-- KEYS  1 the refund's (or order event's) dedup key  2 the ring
-- ARGV  1 op  2 dedup TTL (ms)  3 ring TTL (ms)  4 today's day number  5 '#<i>' of today's
--       slot's day field  6 byte offset of today's slot  7.. '#<i>' of the counters to add 1 to
-- op 'c' (count a refund request or an order event) -> 0 counted now | 1 already counted
-- op 'u' (take back a refund counted under a reused refund id) -> 1 if it had been counted, else 0
-- The increments happen only if the dedup key was new. The first of a day finds the slot
-- holding an earlier day (or nothing): it clears the slot, writes the day, increments again and
-- renews the ring's TTL, once a day per merchant. A slot holding a later day means the event is
-- more than 8 days late: it is not counted in the ring (its increments are taken back).
local op = ARGV[1]

local function bitfield(first, by)
  local args = {KEYS[2], 'GET', 'u32', ARGV[5]}
  if first then args = {KEYS[2], 'SET', 'u32', ARGV[5], ARGV[4]} end
  for i = 7, #ARGV do
    args[#args + 1] = 'INCRBY'; args[#args + 1] = 'u32'; args[#args + 1] = ARGV[i]
    args[#args + 1] = by
  end
  return redis.call('BITFIELD', unpack(args))
end

if op == 'u' then
  if redis.call('DEL', KEYS[1]) == 0 then return 0 end
  bitfield(false, '-1')
  return 1
end
local status = 1
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then
  status = 0
  local held, day = bitfield(false, '1')[1], tonumber(ARGV[4])
  if held > day then
    bitfield(false, '-1') -- the slot holds a later day: this one is too old for the ring
  elseif held < day then
    redis.call('SETRANGE', KEYS[2], ARGV[6], string.rep('\0', 120))
    bitfield(true, '1')
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
return status
