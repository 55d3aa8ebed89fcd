-- Open reservations made more than older_than ago, oldest first.
-- KEYS[1]: the ZSET of open reservations. ARGV: now, older_than_us, limit.
local before = now_us() - tonumber(ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(before), 'LIMIT', 0,
                  tonumber(ARGV[3]))
