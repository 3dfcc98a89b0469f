-- Admit one request against a key's limits, atomically, for every replica.
-- KEYS: rpm log (ZSET member -> admission time ms), concurrency leases (ZSET member -> lease expiry ms);
--       both in the tenant's hash slot.
-- ARGV: rpm (0 = none), max_concurrency (0 = none), lease_ms, member (unique per request)
-- Time is the server's (TIME), so replicas with skewed clocks still share one window.
-- rpm is a sliding window: at most `rpm` admissions in any 60 s; refused requests do not count.
-- Concurrency leases expire, so a replica killed mid-request leaks no slot for longer than lease_ms.
-- Returns {0, 0} when admitted (both limits recorded), else {1, retry_ms} (rpm) or {2, retry_ms} (concurrency).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local max_conc = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local member = ARGV[4]
local window = 60000

if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    -- The slot frees when the oldest admission in the window leaves it.
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {1, tonumber(oldest[2]) + window - now}
  end
end
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_conc then
    return {2, 1000}
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
return {0, 0}
