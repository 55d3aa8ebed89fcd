-- One GCRA decision, the arithmetic of server.quotas.base.gcra, on the TAT (microseconds)
-- kept in `key` (absent means never used). Returns {allowed (0|1), retry_after_us, remaining}.
local function gcra(key, now, interval, burst, cost, slack_ms)
  local stored = redis.call('GET', key)
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
    redis.call('SET', key, int(new_tat), 'PX', expiry_ms(new_tat - now, slack_ms))
  end
  return {1, 0, idiv(horizon - new_tat, interval)}
end
