-- Release a hold without charging (the request produced nothing billable).
-- KEYS: tenant, holds, hold_amounts   ARGV: hold id
-- Trailing KEYS/ARGV: the key's budget, as for hold_reserve (see budget.lua).
-- Returns the credits released (0 when the hold was already gone).
--! include budget
budget_forget(KEYS, ARGV, ARGV[1])
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HINCRBY', KEYS[1], 'reserved', 0 - tonumber(held)) < 0 then
  redis.call('HSET', KEYS[1], 'reserved', 0)
end
return tonumber(held)
