-- Reserve an amount on every budget at once, or on none.
-- KEYS[1]: the reservation's record (a hash: amount, at, n, 1..n = budget keys);
-- KEYS[2]: the ZSET of open reservation ids by reservation time (microseconds);
-- KEYS[3..]: the budgets (hashes of 'spent' and 'reserved').
-- ARGV: now, reservation id, amount, slack_ms, then per budget: limit, expire_ms ('' =
-- never; Unix milliseconds, already including the slack).
-- Returns {allowed (0|1), index of the refusing budget (1-based, 0 if allowed), its used}.
local now = now_us()
local record = KEYS[1]
if redis.call('EXISTS', record) == 1 then
  return {1, 0, 0}  -- already reserved: a retry counts once
end
local amount = tonumber(ARGV[3])
local n = #KEYS - 2
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i + 2], 'spent', 'reserved')
  local used = tonumber(v[1] or 0) + tonumber(v[2] or 0)
  if used + amount > tonumber(ARGV[3 + 2 * i]) then
    return {0, i, used}
  end
end
local wall_ms = nil
for i = 1, n do
  local key = KEYS[i + 2]
  redis.call('HINCRBY', key, 'reserved', int(amount))
  local expire = ARGV[4 + 2 * i]
  if expire ~= '' then
    if not wall_ms then
      local t = redis.call('TIME')
      wall_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    -- A period that ended more than the slack ago still keeps its key for the slack.
    redis.call('PEXPIREAT', key, int(math.max(tonumber(expire), wall_ms + tonumber(ARGV[4]))))
  end
end
local fields = {'amount', int(amount), 'at', int(now), 'n', n}
for i = 1, n do
  fields[#fields + 1] = tostring(i)
  fields[#fields + 1] = KEYS[i + 2]
end
redis.call('HSET', record, unpack(fields))
redis.call('ZADD', KEYS[2], int(now), ARGV[2])
return {1, 0, 0}
