-- Extend a live lease. KEYS[1]: ZSET of holder -> expiry (microseconds).
-- ARGV: now, holder, ttl_us, slack_ms. Returns 1, or 0 if the lease had expired.
local now = now_us()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', int(now + tonumber(ARGV[3])), ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], expiry_ms(tonumber(last[2]) - now, tonumber(ARGV[4])))
return 1
