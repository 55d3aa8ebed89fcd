-- Take one of `limit` slots. KEYS[1]: ZSET of holder -> expiry (microseconds).
-- ARGV: now, holder, limit, ttl_us, slack_ms. Returns {acquired (0|1), live count}.
local now = now_us()
local holder = ARGV[2]
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
local count = redis.call('ZCARD', KEYS[1])
local held = redis.call('ZSCORE', KEYS[1], holder)
if not held and count >= limit then
  return {0, count}
end
redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[4])), holder)
if not held then
  count = count + 1
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], expiry_ms(tonumber(last[2]) - now, tonumber(ARGV[5])))
return {1, count}
