-- Several GCRA rate limits decided in order, stopping at the first refusal (later keys
-- are neither spent nor looked at): as if asked one after another, but atomically.
-- KEYS[i]: the TAT of limit i. ARGV: now, slack_ms, then interval_us, burst, cost per key.
-- Returns {allowed, retry_after_us, remaining} for each limit decided, flattened.
local now = now_us()
local slack_ms = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local a = 3 * i
  local answer = gcra(key, now, tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
                      slack_ms)
  out[#out + 1] = answer[1]
  out[#out + 1] = answer[2]
  out[#out + 1] = answer[3]
  if answer[1] == 0 then
    break
  end
end
return out
