-- One GCRA decision, the arithmetic of server.quotas.base.gcra, on a stored TAT
-- (microseconds; nil means never used).
-- Returns {allowed (0|1), retry_after_us, remaining}, and the TAT to store (nil: unchanged).
local function gcra_decide(stored, now, interval, burst, cost)
  local tat = now
  if stored then
    tat = math.max(stored, now)
  end
  local horizon = now + burst * interval
  local needed = tat + math.max(cost, 1) * interval
  if needed > horizon then
    return {0, needed - horizon, math.max(0, idiv(horizon - tat, interval))}, nil
  end
  local new_tat = tat + cost * interval
  if cost > 0 then
    return {1, 0, idiv(horizon - new_tat, interval)}, new_tat
  end
  return {1, 0, idiv(horizon - new_tat, interval)}, nil
end

-- A TAT in the past means the same as none, so the key may go when it passes.
local function gcra_store(key, tat, now, slack_ms)
  redis.call('SET', key, int(tat), 'PX', expiry_ms(tat - now, slack_ms))
end

