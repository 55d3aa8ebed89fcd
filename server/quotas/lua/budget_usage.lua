-- A budget's {spent, reserved} in its current window. ARGV: now.
local now = now_us()
if not budget_live(KEYS[1], now) then
  return {0, 0}
end
local spent, reserved = budget_used(KEYS[1])
return {spent, reserved}
