-- Create a tenant with an opening balance (recorded as a "grant" ledger entry).
-- KEYS: tenant, ledger, ledger_ids   ARGV: id, credits, created_at, entry_prefix
-- Returns 1 when created, 0 when the tenant already exists.
--! include prelude
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local credits = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'balance', credits, 'reserved', 0, 'created_at', ARGV[3])
if credits ~= 0 then
  redis.call('SADD', KEYS[3], 'grant:' .. ARGV[1])
  ledger_push(KEYS[2], ARGV[4], credits)
end
return 1
