-- Replace a reservation by the actual spend, or drop it when ARGV[3] is '' (release).
-- ARGV: now, reservation id, actual ('' = release). Returns 1, or 0 if it was unknown.
local now = now_us()
local key = KEYS[1]
if not budget_live(key, now) then
  return 0
end
local field = 'r:' .. ARGV[2]
local amount = redis.call('HGET', key, field)
if not amount then
  return 0
end
redis.call('HDEL', key, field)
redis.call('HINCRBY', key, 'reserved', int(-tonumber(amount)))
if ARGV[3] ~= '' then
  redis.call('HINCRBY', key, 'spent', int(tonumber(ARGV[3])))
end
return 1
