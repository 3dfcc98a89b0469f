-- Write a replica's batch of leased charges and resize its credit lease, atomically (see leases.py).
-- A lease is an ordinary hold (`holds`/`hold_amounts`), so every other replica's
-- hold_reserve already counts it as reserved; the charges it covered move from
-- the lease to the balance here.
-- KEYS: tenant, holds, hold_amounts, ledger, ledger_ids, events,
--       then the usage buckets of the batch in pairs (hour, day)
-- ARGV: 1 lease id ("" = none: the batch alone), 2 now_ms, 3 lease ttl ms,
--       4 wanted lease size (credits), 5 margin (the tenant must have this many
--       times the increase available; 0: never grow it), 6 events on ("1"/""), 7 P (bucket pairs),
--       8..7+2P the expire-at (unix s) of each bucket key,
--       then the charges as one JSON array of arrays: marker, entry id, credits,
--       entry JSON without "id", usage field prefix ("<key id>|<model>|"), input
--       tokens, output tokens, KEYS index of its hour bucket (its day bucket follows).
--       One JSON argument, not eight per charge: encoding a RESP argument costs
--       the gateway more than cjson costs Redis to decode it.
-- A charge is applied once: its marker (unique per request) is recorded in
-- ledger_ids, so a retried or replayed batch changes nothing twice. Its entry
-- id is "req:<request id>", or "req:<request id>#<marker>" when another
-- request reused the client-supplied request id.
-- Returns {1, lease size after, available after, balance after, events pushed},
-- {-1, 0, 0, 0, 0} when there is no such tenant.
--! include prelude
--! include events
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0, 0, 0} end
local now = tonumber(ARGV[2])
sweep_holds(KEYS[1], KEYS[2], KEYS[3], now)
local pairs_count = tonumber(ARGV[7])
local charges = cjson.decode(ARGV[8 + 2 * pairs_count])
local before = tonumber(redis.call('HGET', KEYS[1], 'balance'))
local charged = 0
local usage = {}  -- KEYS index -> field -> count
local function add(index, field, n)
  local fields = usage[index]
  if not fields then fields = {}; usage[index] = fields end
  fields[field] = (fields[field] or 0) + n
end
for _, c in ipairs(charges) do
  local marker = c[1]
  if redis.call('SADD', KEYS[5], 'm:' .. marker) == 1 then
    local id = c[2]
    if redis.call('SADD', KEYS[5], id) == 0 then
      id = id .. '#' .. marker
      redis.call('SADD', KEYS[5], id)
    end
    local credits = c[3]
    local balance = redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', 0 - credits))
    ledger_push(KEYS[4], '{"id":"' .. id .. '",' .. string.sub(c[4], 2, -2), balance)
    charged = charged + credits
    local prefix, bucket = c[5], c[8]
    for b = bucket, bucket + 1 do
      add(b, prefix .. 'requests', 1)
      add(b, prefix .. 'input_tokens', c[6])
      add(b, prefix .. 'output_tokens', c[7])
      add(b, prefix .. 'credits', credits)
    end
  end
end
for index, fields in pairs(usage) do
  for field, n in pairs(fields) do redis.call('HINCRBY', KEYS[index], field, string.format('%d', n)) end
  redis.call('EXPIREAT', KEYS[index], tonumber(ARGV[index + 1]))
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance'))
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved')) or 0
local size = 0
local lease = ARGV[1]
if lease ~= '' then
  -- The charges were covered by the lease: that much of it is spent, not reserved any more.
  size = tonumber(redis.call('HGET', KEYS[3], lease)) or 0
  local used = math.min(charged, size)
  size = size - used
  reserved = reserved - used
  local want = tonumber(ARGV[4])
  local margin = tonumber(ARGV[5])
  if want > size then
    -- Margin 0: a batch that may only shrink the lease (one queued after a store outage).
    local extra = want - size
    if margin > 0 and balance - reserved >= extra * margin then
      size = want
      reserved = reserved + extra
    end
  elseif want < size then
    reserved = reserved - (size - want)
    size = want
  end
  if reserved < 0 then reserved = 0 end
  redis.call('HSET', KEYS[1], 'reserved', string.format('%d', reserved))
  if size > 0 then
    redis.call('HSET', KEYS[3], lease, string.format('%d', size))
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), lease)
  else
    redis.call('HDEL', KEYS[3], lease)
    redis.call('ZREM', KEYS[2], lease)
  end
end
local pushed = 0
if ARGV[6] == '1' and charged > 0 then
  local threshold = tonumber(redis.call('HGET', KEYS[1], 'low_balance_threshold'))
  if threshold and before >= threshold and balance < threshold then
    pushed = event_push(KEYS[6], KEYS[1], 'tenant.balance_low',
      '"balance":' .. balance .. ',"threshold":' .. threshold, math.floor(now / 1000))
  end
end
return {1, size, balance - reserved, balance, pushed}
