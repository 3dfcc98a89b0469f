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
--       8+2P the batch id (unique per batch),
--       then 8 fields per charge: marker, entry id, credits, entry JSON without
--       "id", usage field prefix ("<key id>|<model>|"), input tokens, output
--       tokens, KEYS index of its hour bucket (its day bucket follows it).
--       Flat arguments, not one JSON array: cjson-decoding JSON inside JSON cost
--       Redis more per charge than the arguments cost to encode (in C, hiredis).
-- A batch is applied once: its id is recorded in ledger_ids, so a retried or
-- replayed batch changes nothing twice (the script is atomic: a batch is
-- applied whole or not at all). A charge's entry id is "req:<request id>", or
-- "req:<request id>#<marker>" (the marker is unique per request) when another
-- request reused the client-supplied request id. The balance is written once
-- and the entries pushed in one LPUSH, whatever the size of the batch.
-- Returns {1, lease size after, available after, balance after, events pushed},
-- {-1, 0, 0, 0, 0} when there is no such tenant.
--! include prelude
--! include events
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0, 0, 0} end
local now = tonumber(ARGV[2])
sweep_holds(KEYS[1], KEYS[2], KEYS[3], now)
local pairs_count = tonumber(ARGV[7])
local first = 9 + 2 * pairs_count
local before = tonumber(redis.call('HGET', KEYS[1], 'balance'))
local balance = before
local charged = 0
-- Usage sums per bucket pair and field prefix: {requests, input, output, credits}.
local usage = {}  -- hour bucket's KEYS index -> prefix -> sums
if redis.call('SADD', KEYS[5], ARGV[8 + 2 * pairs_count]) == 1 then
  local lines = {}
  for i = first, #ARGV, 8 do
    local id = ARGV[i + 1]
    if redis.call('SADD', KEYS[5], id) == 0 then
      id = id .. '#' .. ARGV[i]
      redis.call('SADD', KEYS[5], id)
    end
    local credits = tonumber(ARGV[i + 2])
    balance = balance - credits
    charged = charged + credits
    lines[#lines + 1] = ledger_line(entry_prefix(id, ARGV[i + 3]), balance)
    local bucket = tonumber(ARGV[i + 7])
    local prefixes = usage[bucket]
    if not prefixes then prefixes = {}; usage[bucket] = prefixes end
    local sums = prefixes[ARGV[i + 4]]
    if not sums then sums = {0, 0, 0, 0}; prefixes[ARGV[i + 4]] = sums end
    sums[1] = sums[1] + 1
    sums[2] = sums[2] + tonumber(ARGV[i + 5])
    sums[3] = sums[3] + tonumber(ARGV[i + 6])
    sums[4] = sums[4] + credits
  end
  if #lines > 0 then
    balance = redis.call('HINCRBY', KEYS[1], 'balance', as_int(0 - charged))
    redis.call('LPUSH', KEYS[4], unpack(lines))
  end
end
for bucket, prefixes in pairs(usage) do
  for b = bucket, bucket + 1 do  -- the hour bucket, then its day bucket
    for prefix, sums in pairs(prefixes) do
      redis.call('HINCRBY', KEYS[b], prefix .. 'requests', sums[1])
      redis.call('HINCRBY', KEYS[b], prefix .. 'input_tokens', as_int(sums[2]))
      redis.call('HINCRBY', KEYS[b], prefix .. 'output_tokens', as_int(sums[3]))
      redis.call('HINCRBY', KEYS[b], prefix .. 'credits', as_int(sums[4]))
    end
    redis.call('EXPIREAT', KEYS[b], tonumber(ARGV[b + 1]))
  end
end
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
  redis.call('HSET', KEYS[1], 'reserved', as_int(reserved))
  if size > 0 then
    redis.call('HSET', KEYS[3], lease, as_int(size))
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
      '"balance":' .. as_int(balance) .. ',"threshold":' .. as_int(threshold), math.floor(now / 1000))
  end
end
return {1, size, balance - reserved, balance, pushed}
