-- Shared helpers, pasted into scripts by `--! include prelude`.
-- Tenant data layout (all in the tenant's hash slot, {tenant}):
--   tenant        HASH  id, balance, reserved, created_at
--   holds         ZSET  hold id -> expiry (unix ms)
--   hold_amounts  HASH  hold id -> credits held
--   ledger        LIST  JSON entries, newest first
--   ledger_ids    SET   ids of applied entries (idempotency: "topup:<key>", "req:<request id>")
--   topups        HASH  "topup:<key>" -> the amount that top-up applied (a reused key must repeat it)

-- Drop holds whose expiry has passed and give their credits back.
local function sweep_holds(tenant_key, holds_key, amounts_key, now_ms)
  local expired = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now_ms)
  if #expired == 0 then return 0 end
  local freed = 0
  for _, hold in ipairs(expired) do
    freed = freed + (tonumber(redis.call('HGET', amounts_key, hold)) or 0)
    redis.call('HDEL', amounts_key, hold)
  end
  redis.call('ZREMRANGEBYSCORE', holds_key, '-inf', now_ms)
  -- 0 - x, not -x: Lua formats a negated zero as "-0", which HINCRBY rejects.
  local reserved = redis.call('HINCRBY', tenant_key, 'reserved', 0 - freed)
  if reserved < 0 then redis.call('HSET', tenant_key, 'reserved', 0) end
  return freed
end

-- A whole number as JSON writes it. Lua's own number formatting (`..`,
-- tostring) writes 10^14 and above with an exponent, losing digits.
local function as_int(n)
  return string.format('%d', n)
end

-- A ledger line: `prefix` is a JSON object missing its closing brace; the
-- balance after the change closes it.
local function ledger_line(prefix, balance)
  return prefix .. ',"balance_after":' .. as_int(balance) .. '}'
end

-- The prefix of a metered entry's line: `entry` (a JSON object) with "id" first.
local function entry_prefix(id, entry)
  return '{"id":"' .. id .. '",' .. string.sub(entry, 2, -2)
end

-- Append a ledger entry, inside the same atomic script as the balance change.
local function ledger_push(ledger_key, prefix, balance)
  redis.call('LPUSH', ledger_key, ledger_line(prefix, balance))
end
