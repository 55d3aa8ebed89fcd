-- Reserve `amount` within `limit`; an id already reserved counts once.
-- ARGV: now, reservation id, amount, limit, window_us ('' = none), slack_ms.
-- Returns {allowed (0|1), used after the call}.
local now = now_us()
local key = KEYS[1]
local field = 'r:' .. ARGV[2]
local amount = tonumber(ARGV[3])
local live = budget_live(key, now)
local used = 0
if live then
  local spent, reserved = budget_used(key)
  used = spent + reserved
  if redis.call('HEXISTS', key, field) == 1 then
    return {1, used}
  end
end
if used + amount > tonumber(ARGV[4]) then
  return {0, used}
end
if not live then
  redis.call('HSET', key, 'spent', 0, 'reserved', 0)
  if ARGV[5] ~= '' then
    local window = tonumber(ARGV[5])
    redis.call('HSET', key, 'end', int(now + window))
    redis.call('PEXPIRE', key, expiry_ms(window, tonumber(ARGV[6])))
  end
end
redis.call('HSET', key, field, int(amount))
redis.call('HINCRBY', key, 'reserved', int(amount))
return {1, used + amount}
