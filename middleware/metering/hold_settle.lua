-- Settle one request: release its hold, charge the cost, append one ledger
-- entry — once per request id, so a retried settlement changes nothing.
-- KEYS: tenant, holds, hold_amounts, ledger, ledger_ids
-- ARGV: hold id ("" when none), cost, entry id, entry JSON without its "id"
--       (a complete object; "id" and "balance_after" are added here), now_ms
-- Ids are built from request ids, which the HTTP layer limits to [A-Za-z0-9._:-],
-- so they are pasted into the JSON without escaping.
-- Trailing KEYS/ARGV: usage aggregates, the key's budget and events (see usage.lua).
-- Returns {1, balance[, events pushed when any]} when charged, {0, balance} when already settled,
-- {-1, 0} when there is no such tenant.
--! include prelude
--! include events
--! include budget
--! include usage
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
sweep_holds(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[5]))
local held = ARGV[1] ~= '' and redis.call('HGET', KEYS[3], ARGV[1])
local id = ARGV[3]
if redis.call('SADD', KEYS[5], id) == 0 then
  -- Seen before. With our hold gone this is a retry of an applied settlement;
  -- with the hold still open, another request reused the client-supplied
  -- request id and is charged under an entry id of its own.
  if not held then return {0, tonumber(redis.call('HGET', KEYS[1], 'balance'))} end
  id = id .. '#' .. ARGV[1]
  if redis.call('SADD', KEYS[5], id) == 0 then
    return {0, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
  end
end
if held then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if redis.call('HINCRBY', KEYS[1], 'reserved', 0 - tonumber(held)) < 0 then
    redis.call('HSET', KEYS[1], 'reserved', 0)
  end
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', 0 - tonumber(ARGV[2]))
ledger_push(KEYS[4], entry_prefix(id, ARGV[4]), balance)
local pushed = settle_extras(KEYS, ARGV, ARGV[1], tonumber(ARGV[2]), balance)
if pushed > 0 then return {1, balance, pushed} end
return {1, balance}
