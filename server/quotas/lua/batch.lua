-- The decisions of several callers in one call, each as its own script would make it, in
-- the order given (so the answers are those of the calls one after another, at one
-- instant). KEYS are taken in order by the decisions; ARGV: now, slack_ms, then each
-- decision as its kind and its fields:
--   'rate', n, then n times interval_us, burst, cost (n keys: TATs). As gcra_all: stops
--        at the first refusal. Answer: {allowed, retry_after_us, remaining} per limit
--        decided, flattened.
--   'take', holder, ttl_us, n, then n times limit (n keys: lease ZSETs). All or none: at
--        the first refusal the holder's leases on the keys before it are dropped. Answer:
--        {acquired, live count} per lease decided, flattened.
--   'renew', holder, ttl_us (1 key). Answer: {1} or {0} (expired).
--   'drop', n, then n holders (n keys: lease ZSETs): each holder's lease given back.
--        Answer: {}.
-- Returns one answer per decision. TATs read here are kept in a table and written once
-- each, at the end, with the expiry of their last value.
local now = now_us()
local slack_ms = tonumber(ARGV[2])
local tats = {}
local dirty = {}
local out = {}
local a, k = 3, 1
while a <= #ARGV do
  local kind = ARGV[a]
  local answer = {}
  if kind == 'rate' then
    local n = tonumber(ARGV[a + 1])
    a = a + 2
    local refused = false
    for i = 1, n do
      local key = KEYS[k]
      if not refused then
        if tats[key] == nil then
          local stored = redis.call('GET', key)
          tats[key] = stored and tonumber(stored) or false
        end
        local d, new_tat = gcra_decide(tats[key] or nil, now, tonumber(ARGV[a]),
                                       tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
        answer[#answer + 1] = d[1]
        answer[#answer + 1] = d[2]
        answer[#answer + 1] = d[3]
        if new_tat then
          tats[key] = new_tat
          dirty[key] = true
        end
        refused = d[1] == 0
      end
      a = a + 3
      k = k + 1
    end
  elseif kind == 'take' then
    local holder = ARGV[a + 1]
    local ttl_us = tonumber(ARGV[a + 2])
    local n = tonumber(ARGV[a + 3])
    a = a + 4
    local first = k
    local refused = false
    for i = 1, n do
      if not refused then
        local acquired, count = lease_take(KEYS[k], holder, tonumber(ARGV[a]), ttl_us, now,
                                           slack_ms)
        answer[#answer + 1] = acquired
        answer[#answer + 1] = count
        if acquired == 0 then
          refused = true
          for j = first, k - 1 do
            redis.call('ZREM', KEYS[j], holder)
          end
        end
      end
      a = a + 1
      k = k + 1
    end
  elseif kind == 'renew' then
    answer[1] = lease_extend(KEYS[k], ARGV[a + 1], tonumber(ARGV[a + 2]), now, slack_ms)
    a = a + 3
    k = k + 1
  elseif kind == 'drop' then
    local n = tonumber(ARGV[a + 1])
    for i = 1, n do
      redis.call('ZREM', KEYS[k], ARGV[a + 1 + i])
      k = k + 1
    end
    a = a + 2 + n
  else
    return redis.error_reply('unknown decision kind ' .. tostring(kind))
  end
  out[#out + 1] = answer
end
for key in pairs(dirty) do
  gcra_store(key, tats[key], now, slack_ms)
end
return out
