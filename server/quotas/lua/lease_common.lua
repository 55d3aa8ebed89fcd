-- Take one of `limit` slots of the ZSET `key` (holder -> expiry, microseconds) for
-- `holder` until now + ttl_us; a holder with a live lease keeps it (its ttl restarts).
-- Returns acquired (0|1), live count after the call.
local function lease_take(key, holder, limit, ttl_us, now, slack_ms)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
  local count = redis.call('ZCARD', key)
  local held = redis.call('ZSCORE', key, holder)
  if not held and count >= limit then
    return 0, count
  end
  redis.call('ZADD', key, int(now + ttl_us), holder)
  if not held then
    count = count + 1
  end
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', key, expiry_ms(tonumber(last[2]) - now, slack_ms))
  return 1, count
end

-- Extend holder's live lease in `key` to now + ttl_us. Returns 1, or 0 if it had expired.
local function lease_extend(key, holder, ttl_us, now, slack_ms)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
  if not redis.call('ZSCORE', key, holder) then
    return 0
  end
  redis.call('ZADD', key, 'XX', int(now + ttl_us), holder)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', key, expiry_ms(tonumber(last[2]) - now, slack_ms))
  return 1
end
