-- Admit one request against a key's limits, atomically, for every replica.
-- KEYS: rpm log (ZSET member -> admission time ms), concurrency leases (ZSET member -> lease expiry ms);
--       both in the tenant's hash slot.
-- ARGV: rpm (0 = none), max_concurrency (0 = none), lease_ms, member (unique per request)
-- Time is the server's (TIME), so replicas with skewed clocks still share one window.
-- rpm is a sliding window: at most `rpm` admissions in any 60 s; refused requests do not count.
-- Concurrency leases expire, so a replica killed mid-request leaks no slot for longer than lease_ms.
-- Returns {status, retry_ms, remaining, reset_ms}: status 0 admitted (both limits recorded), 1 refused by rpm,
-- 2 refused by concurrency; remaining = admissions left in the window after this one (-1 without rpm);
-- reset_ms = time until the oldest admission in the window leaves it (remaining goes up), 0 when none is counted.
-- So the reply's x-ratelimit-* headers cost no extra round trip.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local max_conc = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local member = ARGV[4]
local window = 60000

-- The rpm window as it stands: {remaining, reset_ms}.
local function window_state()
  if rpm <= 0 then
    return -1, 0
  end
  local count = redis.call('ZCARD', KEYS[1])
  if count == 0 then
    return rpm, 0
  end
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(rpm - count, 0), tonumber(oldest[2]) + window - now
end

if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    -- The slot frees when the oldest admission in the window leaves it.
    local remaining, reset = window_state()
    return {1, reset, remaining, reset}
  end
end
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_conc then
    local remaining, reset = window_state()
    return {2, 1000, remaining, reset}
  end
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, member)
  redis.call('PEXPIRE', KEYS[1], window)
end
if max_conc > 0 then
  redis.call('ZADD', KEYS[2], now + lease, member)
  redis.call('PEXPIRE', KEYS[2], lease)
end
local remaining, reset = window_state()
return {0, 0, remaining, reset}
