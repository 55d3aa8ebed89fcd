-- Microseconds left of each key's hold-off (0 when none). KEYS: the ends. ARGV: now.
local now = now_us()
local out = {}
for i, key in ipairs(KEYS) do
  local ends = redis.call('GET', key)
  out[i] = 0
  if ends and tonumber(ends) > now then
    out[i] = tonumber(ends) - now
  end
end
return out
