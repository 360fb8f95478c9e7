-- Device or IP velocity: which accounts were seen on it (score = last seen, ms) and which refunds
-- were asked from it (score = request time). Both sets are read with ZCOUNT, so a busy NAT address
-- costs the same as a quiet one.
--
-- KEYS[1] accounts set, KEYS[2] refunds set, KEYS[3] blocklist entry; all under one hash tag.
-- ARGV[1] op, ARGV[2] now (ms). Ops:
--   r rid account  -> {status, blocked, accounts_24h, accounts_7d, refunds_1h, refunds_24h}
--   a account      -> {0}        (seen by an order event)
--   u rid          -> {removed}  (undo a conflicting refund)
local ka, kr = KEYS[1], KEYS[2]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local HOUR, DAY = 3600000, 86400000
local KEEP = 8 * DAY -- longest window (7 d) plus a day, and at least the replay horizon
local CAP = 5000
local SLACK = 3600000 -- trim at most once an hour per key: the check is cheap, the trim is not

-- Keep the sets bounded: drop what is older than KEEP once the clock set's oldest member is more
-- than an hour past it, cap the size, and slide the TTL.
local function tidy(clock, keys)
  local oldest = redis.call('ZRANGE', clock, 0, 0, 'WITHSCORES')[2]
  local stale = oldest and tonumber(oldest) < now - KEEP - SLACK
  for _, k in ipairs(keys) do
    if stale then
      redis.call('ZREMRANGEBYSCORE', k, '-inf', now - KEEP)
      local n = redis.call('ZCARD', k)
      if n > CAP then redis.call('ZREMRANGEBYRANK', k, 0, n - CAP - 1) end
    end
    redis.call('PEXPIRE', k, KEEP)
  end
end

if op == 'r' then
  local added = redis.call('ZADD', kr, 'NX', now, ARGV[3])
  if added == 1 then redis.call('ZADD', ka, 'GT', now, ARGV[4]) end
  local out = {1 - added, redis.call('EXISTS', KEYS[3]),
    redis.call('ZCOUNT', ka, now - DAY, '+inf'), redis.call('ZCOUNT', ka, now - 7 * DAY, '+inf'),
    redis.call('ZCOUNT', kr, now - HOUR, '+inf'), redis.call('ZCOUNT', kr, now - DAY, '+inf')}
  if added == 1 then tidy(kr, {ka, kr}) end
  return out
elseif op == 'a' then
  redis.call('ZADD', ka, 'GT', now, ARGV[3])
  tidy(ka, {ka})
  return {0}
elseif op == 'u' then
  return {redis.call('ZREM', kr, ARGV[3])}
end
return redis.error_reply('unknown op')
