-- Hold a key off until now + seconds, unless it is already held off for longer.
-- KEYS[1]: the end (microseconds). ARGV: now, duration_us, slack_ms. Returns 1 if moved.
local now = now_us()
local ends = now + tonumber(ARGV[2])
local old = redis.call('GET', KEYS[1])
if old and tonumber(old) >= ends then
  return 0
end
redis.call('SET', KEYS[1], int(ends), 'PX', expiry_ms(ends - now, tonumber(ARGV[3])))
return 1
