-- Merchant velocity. Refunds are few enough to keep exactly (sets read with ZCOUNT); orders are
-- many, so they are counted in day buckets of one small hash, and only the order events of the
-- last two days are remembered for deduplication.
--
-- KEYS[1] refunds, KEYS[2] digital-goods quick refunds, KEYS[3] BNPL refunds (sets, score = ms),
-- KEYS[4] order day buckets (hash o<day>, b<day>), KEYS[5] recent order event ids (set).
-- ARGV[1] op, ARGV[2] now (ms). Ops:
--   r rid flags -> {status, refunds_1h, refunds_24h, refunds_7d, dq_24h, bnpl_refunds_7d,
--                   orders_7d, bnpl_orders_7d}
--   o eid bnpl  -> {status}   (ORDER_PLACED)
--   u rid       -> {removed}  (undo a conflicting refund)
local kr, kq, kb, ko, ke = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local HOUR, DAY = 3600000, 86400000
local KEEP = 8 * DAY
local EVENT_KEEP = 2 * DAY
local CAP = 200000
local SLACK = 3600000 -- trim at most once an hour per merchant: the check is cheap, the trim is not
local F_DIGITAL_QUICK, F_BNPL = 4, 16
local day = math.floor(now / DAY)

if op == 'r' then
  local rid, flags = ARGV[3], tonumber(ARGV[4])
  local added = redis.call('ZADD', kr, 'NX', now, rid)
  if added == 1 then
    if bit.band(flags, F_DIGITAL_QUICK) ~= 0 then redis.call('ZADD', kq, now, rid) end
    if bit.band(flags, F_BNPL) ~= 0 then redis.call('ZADD', kb, now, rid) end
  end
  local fields = {}
  for d = day - 6, day do fields[#fields + 1] = 'o' .. d; fields[#fields + 1] = 'b' .. d end
  local buckets = redis.call('HMGET', ko, unpack(fields))
  local orders, bnpl_orders = 0, 0
  for i = 1, #buckets, 2 do
    orders = orders + (tonumber(buckets[i]) or 0)
    bnpl_orders = bnpl_orders + (tonumber(buckets[i + 1]) or 0)
  end
  local out = {1 - added, redis.call('ZCOUNT', kr, now - HOUR, '+inf'),
    redis.call('ZCOUNT', kr, now - DAY, '+inf'), redis.call('ZCOUNT', kr, now - 7 * DAY, '+inf'),
    redis.call('ZCOUNT', kq, now - DAY, '+inf'), redis.call('ZCOUNT', kb, now - 7 * DAY, '+inf'),
    orders, bnpl_orders}
  if added == 1 then
    local oldest = redis.call('ZRANGE', kr, 0, 0, 'WITHSCORES')[2]
    if oldest and tonumber(oldest) < now - KEEP - SLACK then
      for _, k in ipairs({kr, kq, kb}) do redis.call('ZREMRANGEBYSCORE', k, '-inf', now - KEEP) end
      local n = redis.call('ZCARD', kr)
      if n > CAP then redis.call('ZREMRANGEBYRANK', kr, 0, n - CAP - 1) end
    end
    redis.call('PEXPIRE', kr, KEEP)
    if bit.band(flags, F_DIGITAL_QUICK) ~= 0 then redis.call('PEXPIRE', kq, KEEP) end
    if bit.band(flags, F_BNPL) ~= 0 then redis.call('PEXPIRE', kb, KEEP) end
  end
  return out
elseif op == 'o' then
  local added = redis.call('ZADD', ke, 'NX', now, ARGV[3])
  if added == 1 then
    redis.call('HINCRBY', ko, 'o' .. day, 1)
    if ARGV[4] == '1' then redis.call('HINCRBY', ko, 'b' .. day, 1) end
    redis.call('HDEL', ko, 'o' .. (day - 8), 'b' .. (day - 8))
    redis.call('PEXPIRE', ko, KEEP)
    redis.call('ZREMRANGEBYSCORE', ke, '-inf', now - EVENT_KEEP)
    redis.call('PEXPIRE', ke, EVENT_KEEP)
  end
  return {1 - added}
elseif op == 'u' then
  return {redis.call('ZREM', kr, ARGV[3]) + redis.call('ZREM', kq, ARGV[3]) + redis.call('ZREM', kb, ARGV[3])}
end
return redis.error_reply('unknown op')
