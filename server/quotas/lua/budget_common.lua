-- Budgets: KEYS[1] is a hash with 'spent', 'reserved' (their sum is what is used),
-- 'end' (window end, microseconds; absent: no window) and 'r:<id>' = reserved amount.

-- True if the budget exists; a budget whose window has ended is deleted first.
local function budget_live(key, now)
  local ends = redis.call('HGET', key, 'end')
  if ends and now >= tonumber(ends) then
    redis.call('DEL', key)
    return false
  end
  return redis.call('EXISTS', key) == 1
end

local function budget_used(key)
  local v = redis.call('HMGET', key, 'spent', 'reserved')
  return tonumber(v[1] or 0), tonumber(v[2] or 0)
end
