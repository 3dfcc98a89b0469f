-- Add credits once per idempotency key.
-- KEYS: tenant, ledger, ledger_ids   ARGV: amount, idempotency id, entry_prefix
-- Returns {status, balance}: 1 applied, 0 already applied (nothing changed), -1 no such tenant.
--! include prelude
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
if redis.call('SADD', KEYS[3], ARGV[2]) == 0 then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', tonumber(ARGV[1]))
ledger_push(KEYS[2], ARGV[3], balance)
return {1, balance}
