-- A tenant's balance and open holds, after dropping expired holds.
-- KEYS: tenant, holds, hold_amounts   ARGV: now_ms
-- Returns {balance, reserved, created_at, low_balance_threshold or ""} or false when there is no such tenant.
--! include prelude
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
sweep_holds(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
local v = redis.call('HMGET', KEYS[1], 'balance', 'reserved', 'created_at', 'low_balance_threshold')
return {tonumber(v[1]), tonumber(v[2]), v[3], v[4] or ''}
