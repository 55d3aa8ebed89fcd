-- Settle (replace the hold by the actual spend) or release (drop it) a reservation, on
-- every budget its record names. The budgets are read from the record, not passed in.
-- KEYS[1]: the record; KEYS[2]: the ZSET of open reservations.
-- ARGV: now (unused), reservation id, actual spend ('' = release).
-- Returns 1, or 0 if the reservation is not open.
local record = KEYS[1]
local v = redis.call('HMGET', record, 'amount', 'n')
if not v[1] then
  return 0
end
local amount = tonumber(v[1])
for i = 1, tonumber(v[2]) do
  local key = redis.call('HGET', record, tostring(i))
  -- A budget whose key expired (its period ended long ago) has nothing left to count.
  if key and redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'reserved', int(-amount))
    if ARGV[3] ~= '' then
      redis.call('HINCRBY', key, 'spent', int(tonumber(ARGV[3])))
    end
  end
end
redis.call('DEL', record)
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
