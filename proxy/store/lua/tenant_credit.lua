-- Add credits once per idempotency key.
-- KEYS: tenant, ledger, ledger_ids, events, topups (HASH: idempotency id -> the amount it applied)
-- ARGV: amount, idempotency id, entry_prefix, events on ("1" or ""), created_at, largest balance
-- Returns {status, balance, events pushed}: 1 applied, 0 already applied (nothing changed), -1 no such tenant,
-- -2 refused: the balance would pass the largest (sums must stay exact in Lua's doubles),
-- -3 refused: the key already applied another amount (a key applied before amounts were kept counts as the same).
--! include prelude
--! include events
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0} end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance')) or 0
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then
  local applied = redis.call('HGET', KEYS[5], ARGV[2])
  if applied and applied ~= ARGV[1] then return {-3, balance, 0} end
  return {0, balance, 0}
end
if balance + tonumber(ARGV[1]) > tonumber(ARGV[6]) then return {-2, balance, 0} end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[5], ARGV[2], ARGV[1])
balance = redis.call('HINCRBY', KEYS[1], 'balance', tonumber(ARGV[1]))
ledger_push(KEYS[2], ARGV[3], balance)
local pushed = 0
if ARGV[4] == '1' then
  pushed = event_push(KEYS[4], KEYS[1], 'tenant.credits_added', '"amount":' .. ARGV[1] .. ',"balance":' .. as_int(balance), ARGV[5])
end
return {1, balance, pushed}
