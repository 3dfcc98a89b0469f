-- Reserve credits for one request: sweep expired holds, check that the
-- balance minus the open holds covers the new hold, and record it.
-- KEYS: tenant, holds, hold_amounts   ARGV: hold id, amount, now_ms, expires_ms
-- Returns {1, available after} when held, {0, available} when the balance
-- cannot cover it, {-1, 0} when there is no such tenant, {-2, credits left}
-- when the key's budget is used up (trailing KEYS/ARGV: see budget_check).
--! include prelude
--! include budget
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
sweep_holds(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[3]))
local v = redis.call('HMGET', KEYS[1], 'balance', 'reserved')
local available = tonumber(v[1]) - (tonumber(v[2]) or 0)
local amount = tonumber(ARGV[2])
if available < amount then return {0, available} end
local refused = budget_check(KEYS, ARGV, ARGV[1], amount, tonumber(ARGV[3]), tonumber(ARGV[4]))
if refused then return refused end
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], amount)
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
return {1, available - amount}
