-- GCRA rate limit, the arithmetic of server.quotas.base.gcra.
-- KEYS[1]: the theoretical arrival time (TAT, microseconds); absent means never used.
-- ARGV: now, interval_us, burst, cost, slack_ms.
-- Returns {allowed (0|1), retry_after_us, remaining}.
local now = now_us()
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then
  tat = math.max(tonumber(stored), now)
end
local horizon = now + burst * interval
local needed = tat + math.max(cost, 1) * interval
if needed > horizon then
  return {0, needed - horizon, math.max(0, idiv(horizon - tat, interval))}
end
local new_tat = tat + cost * interval
if cost > 0 then
  -- A TAT in the past means the same as none, so the key may go when it passes.
  redis.call('SET', KEYS[1], int(new_tat), 'PX', expiry_ms(new_tat - now, tonumber(ARGV[5])))
end
return {1, 0, idiv(horizon - new_tat, interval)}
