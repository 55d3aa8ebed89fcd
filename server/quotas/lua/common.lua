-- Prepended to every quota script. ARGV[1] is "now" in whole microseconds, or '' to
-- use the Redis server's TIME: the one clock all replicas share.
local function now_us()
  if ARGV[1] ~= '' then
    return tonumber(ARGV[1])
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- An integer as exact decimal text (tostring would print 1.7e+15 and lose digits).
local function int(n)
  return string.format('%d', n)
end

-- floor(a / b) for integers, corrected where the double quotient rounds across one.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- Milliseconds (rounded up, at least 1) for PEXPIRE, plus the caller's slack.
local function expiry_ms(us, slack_ms)
  return int(math.max(1, math.ceil(us / 1000)) + slack_ms)
end
