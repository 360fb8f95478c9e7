-- Account velocity: one sorted set per account holds the account's recent refunds, orders,
-- deliveries, outcomes and the IPs, cities and devices it was seen on (score = time in ms).
-- The account x merchant pair and the order are filters over the same set, so one script reads
-- all three, under one hash tag. Windows come from the newest SCAN entries (exact for every
-- account below that; saturating for the few above it, whose every window is extreme anyway);
-- a retry is recognised exactly by ZSCORE of its member, however old.
--
-- Members (fields separated by '|'; every id is already a keyed hash):
--   R|rid|amount|flags|merchant|order   refund request     O|eid|merchant|order  order placed
--   V|order                             order delivered    X|eid   abuse outcome  P|eid  other outcome
--   I|ip  C|city  D|device              last seen (score updated with GT)
--
-- KEYS[1] the set, KEYS[2] the account's blocklist entry.
-- ARGV[1] op, ARGV[2] now (ms). Ops:
--   r rid amount flags merchant order ip city device -> {status, blocked, windows...}
--   o eid merchant order ip city device               -> {status}   (ORDER_PLACED)
--   v order                                           -> {status}   (ORDER_DELIVERED)
--   x eid / p eid                                     -> {status}   (abuse / other outcome)
--   u rid amount flags merchant order                 -> {removed}  (undo a conflicting refund)
-- status: 0 counted now, 1 already counted (retry), 2 refund id reused with different content.
local key = KEYS[1]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local HOUR, DAY = 3600000, 86400000
local KEEP = 90 * DAY
local CAP = 300 -- an account past this many entries in 90 days saturates every window anyway
local SCAN = 64 -- windows come from the newest entries only: reading them is the main cost (~0.7 µs each)
local SLACK = 3600000 -- trim at most once an hour: the check is cheap, the trim is not
-- flag bits, shared with gate/velocity.py
local F_INR, F_INR_DELIVERED, F_DIGITAL_QUICK, F_CM_UNRETURNED = 1, 2, 4, 8

local function seen(prefix, value, members)
  if value ~= '' then members[#members + 1] = now; members[#members + 1] = prefix .. value end
end

-- Bound the set after a write: drop entries past KEEP (once the oldest is an hour past it), cap
-- the size, and slide the TTL.
local function tidy()
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
  if oldest and tonumber(oldest) < now - KEEP - SLACK then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - KEEP)
  end
  local n = redis.call('ZCARD', key)
  if n > CAP then redis.call('ZREMRANGEBYRANK', key, 0, n - CAP - 1) end
  redis.call('PEXPIRE', key, KEEP + DAY)
end

if op == 'r' then
  local rid, amount, flags, merchant, order = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
  local ip, city, device = ARGV[8], ARGV[9], ARGV[10]
  local mine = 'R|' .. rid .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. merchant .. '|' .. order
  local blocked = redis.call('EXISTS', KEYS[2])
  -- A retry is found exactly, however old (ZSCORE); the scan is bounded to the newest entries.
  local status = redis.call('ZSCORE', key, mine) and 1 or 0
  local items = redis.call('ZRANGE', key, '+inf', now - KEEP, 'BYSCORE', 'REV', 'LIMIT', 0, SCAN,
                           'WITHSCORES')
  local r1h, r24h, r7d, r30d, amt30, inr30, inrd30, dq7, cm30 = 0, 0, 0, 0, 0, 0, 0, 0, 0
  local o30, ab90, pair_r30, pair_o30, ord_n, ord_amt, ord_delivered = 0, 0, 0, 0, 0, 0, 0
  local ips, cities, devices = 0, 0, 0
  local ip_new, city_new, device_new = ip ~= '', city ~= '', device ~= ''
  local ip_m, city_m, device_m = 'I|' .. ip, 'C|' .. city, 'D|' .. device
  for i = 1, #items, 2 do
    local m = items[i]
    local age = now - tonumber(items[i + 1])
    local t = string.byte(m, 1)
    if t == 82 then -- R
      local r, a, f, mm, oo = string.match(m, '^R|([^|]*)|(%d+)|(%d+)|([^|]*)|([^|]*)$')
      if r == rid and m ~= mine then status = 2 end
      a = tonumber(a); f = tonumber(f)
      if oo == order then ord_n = ord_n + 1; ord_amt = ord_amt + a end
      if age < 30 * DAY then
        r30d = r30d + 1; amt30 = amt30 + a
        if mm == merchant then pair_r30 = pair_r30 + 1 end
        if bit.band(f, F_INR) ~= 0 then inr30 = inr30 + 1 end
        if bit.band(f, F_INR_DELIVERED) ~= 0 then inrd30 = inrd30 + 1 end
        if bit.band(f, F_CM_UNRETURNED) ~= 0 then cm30 = cm30 + 1 end
        if age < 7 * DAY then
          if bit.band(f, F_DIGITAL_QUICK) ~= 0 then dq7 = dq7 + 1 end
          r7d = r7d + 1
          if age < DAY then
            r24h = r24h + 1
            if age < HOUR then r1h = r1h + 1 end
          end
        end
      end
    elseif t == 79 then -- O
      if age < 30 * DAY then
        o30 = o30 + 1
        local mm = string.match(m, '^O|[^|]*|([^|]*)|')
        if mm == merchant then pair_o30 = pair_o30 + 1 end
      end
    elseif t == 86 then -- V
      if m == 'V|' .. order then ord_delivered = 1 end
    elseif t == 88 then -- X
      ab90 = ab90 + 1
    elseif age < DAY and t == 73 then -- I
      ips = ips + 1
      if m == ip_m then ip_new = false end
    elseif age < DAY and t == 67 then -- C
      cities = cities + 1
      if m == city_m then city_new = false end
    elseif age < 30 * DAY and t == 68 then -- D
      devices = devices + 1
      if m == device_m then device_new = false end
    end
  end
  if status == 2 then return {2, blocked} end
  if ip_new then ips = ips + 1 end
  if city_new then cities = cities + 1 end
  if device_new then devices = devices + 1 end
  if status == 0 then
    r1h, r24h, r7d, r30d = r1h + 1, r24h + 1, r7d + 1, r30d + 1
    amt30, pair_r30, ord_n, ord_amt = amt30 + amount, pair_r30 + 1, ord_n + 1, ord_amt + amount
    if bit.band(flags, F_INR) ~= 0 then inr30 = inr30 + 1 end
    if bit.band(flags, F_INR_DELIVERED) ~= 0 then inrd30 = inrd30 + 1 end
    if bit.band(flags, F_CM_UNRETURNED) ~= 0 then cm30 = cm30 + 1 end
    if bit.band(flags, F_DIGITAL_QUICK) ~= 0 then dq7 = dq7 + 1 end
    local members = {now, mine}
    seen('I|', ip, members); seen('C|', city, members); seen('D|', device, members)
    redis.call('ZADD', key, 'GT', unpack(members))
    tidy()
  end
  return {status, blocked, r1h, r24h, r7d, r30d, amt30, inr30, inrd30, dq7, cm30, o30,
          ips, cities, devices, ab90, pair_r30, pair_o30, ord_n, ord_amt, ord_delivered}
end

local added
if op == 'o' then
  added = redis.call('ZADD', key, 'NX', now, 'O|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5])
  if added == 1 then
    local members = {}
    seen('I|', ARGV[6], members); seen('C|', ARGV[7], members); seen('D|', ARGV[8], members)
    if #members > 0 then redis.call('ZADD', key, 'GT', unpack(members)) end
  end
elseif op == 'v' then
  added = redis.call('ZADD', key, 'NX', now, 'V|' .. ARGV[3])
elseif op == 'x' or op == 'p' then
  added = redis.call('ZADD', key, 'NX', now, string.upper(op) .. '|' .. ARGV[3])
elseif op == 'u' then
  return {redis.call('ZREM', key, 'R|' .. ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. ARGV[6] .. '|' .. ARGV[7])}
else
  return redis.error_reply('unknown op')
end
if added == 1 then tidy() end
return {1 - added}
