-- GCRA rate limit.
-- KEYS[1]: the theoretical arrival time (TAT, microseconds); absent means never used.
-- ARGV: now, interval_us, burst, cost, slack_ms.
-- Returns {allowed (0|1), retry_after_us, remaining}.
return gcra(KEYS[1], now_us(), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
            tonumber(ARGV[5]))
