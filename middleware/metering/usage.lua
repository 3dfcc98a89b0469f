-- What hold_settle records besides the charge: usage aggregates, the key's
-- budget, and webhook events. Needs `--! include budget` and `--! include events` first.
-- Layout, in the tenant's slot (see proxy/store/usage.py):
--   usage:h:<hour start>  HASH  "<key id>|<model>|<metric>" -> count, EXPIREAT hour end + usage.retention_days
--   usage:d:<day start>   HASH  the same by UTC day,            EXPIREAT day end + usage.daily_retention_days
-- metrics: requests, input_tokens, output_tokens, credits.

local function usage_add(bucket_key, expire_at, prefix, input, output, credits)
  redis.call('HINCRBY', bucket_key, prefix .. 'requests', 1)
  redis.call('HINCRBY', bucket_key, prefix .. 'input_tokens', input)
  redis.call('HINCRBY', bucket_key, prefix .. 'output_tokens', output)
  redis.call('HINCRBY', bucket_key, prefix .. 'credits', credits)
  redis.call('EXPIREAT', bucket_key, expire_at)
end

-- A budget period id (budgets.py: d:YYYYMMDD, m:YYYYMM, t) as the event's fields:
-- "period" as the key's budget names it, and the UTC day or month it covers.
local function period_fields(id)
  local kind = id:sub(1, 1)
  if kind == 'd' then
    return ',"period":"day","period_start":"' .. id:sub(3, 6) .. '-' .. id:sub(7, 8) .. '-' .. id:sub(9, 10) .. '"'
  elseif kind == 'm' then
    return ',"period":"month","period_start":"' .. id:sub(3, 6) .. '-' .. id:sub(7, 8) .. '"'
  end
  return ',"period":"total"'
end

-- The trailing arguments (after hold_settle's own), in this order:
-- KEYS: usage hour bucket, usage day bucket, events, budget, budget_holds
-- ARGV: "usage", key id, model, input tokens, output tokens, hour expire-at, day expire-at,
--       events on ("1"/""), budget ("" none), budget period id, created_at (unix s)
-- Returns the number of events pushed.
local function settle_extras(keys, argv, hold_id, cost, balance)
  local a, k = #argv - 10, #keys - 4
  if a < 1 or argv[a] ~= 'usage' then return 0 end
  local prefix = argv[a + 1] .. '|' .. argv[a + 2] .. '|'
  local input, output = tonumber(argv[a + 3]), tonumber(argv[a + 4])
  usage_add(keys[k], tonumber(argv[a + 5]), prefix, input, output, cost)
  usage_add(keys[k + 1], tonumber(argv[a + 6]), prefix, input, output, cost)
  local limit = tonumber(argv[a + 8])
  local spent, exhausted = 0, false
  if hold_id ~= '' or limit then
    spent, exhausted = budget_settle(keys[k + 3], keys[k + 4], hold_id, cost, limit, argv[a + 9])
  end
  if argv[a + 7] ~= '1' then return 0 end
  local pushed, created = 0, argv[a + 10]
  local threshold = tonumber(redis.call('HGET', keys[1], 'low_balance_threshold'))
  if threshold and balance + cost >= threshold and balance < threshold then
    pushed = pushed + event_push(keys[k + 2], keys[1], 'tenant.balance_low',
      '"balance":' .. as_int(balance) .. ',"threshold":' .. as_int(threshold), created)
  end
  if exhausted then
    pushed = pushed + event_push(keys[k + 2], keys[1], 'key.budget_exhausted',
      '"key_id":"' .. argv[a + 1] .. '","budget":' .. as_int(limit) .. ',"spent":' .. as_int(spent) .. period_fields(argv[a + 9]), created)
  end
  return pushed
end
