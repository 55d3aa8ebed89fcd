-- Live leases. KEYS[1]: ZSET of holder -> expiry (microseconds). ARGV: now.
-- Read-only: expired members are pruned by the next acquire or renew.
local now = now_us()
return redis.call('ZCOUNT', KEYS[1], '(' .. int(now), '+inf')
