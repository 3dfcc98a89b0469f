-- Per-key budgets, enforced in the hold scripts. Layout, in the tenant's slot:
--   budget:<key id>        HASH  period (id of the current period: "d:20261202", "m:202612", "t"),
--                                spent (credits charged in it), held (credits of open holds),
--                                hold:<hold id> -> credits of that hold
--   budget_holds:<key id>  ZSET  hold id -> expiry (unix ms)
-- A hold is admitted while spent + open holds are below the budget, so the
-- budget is exceeded by at most one hold, however many requests race.

local function budget_sweep(budget_key, holds_key, now_ms)
  local expired = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now_ms)
  if #expired == 0 then return end
  local freed = 0
  for _, hold in ipairs(expired) do
    freed = freed + (tonumber(redis.call('HGET', budget_key, 'hold:' .. hold)) or 0)
    redis.call('HDEL', budget_key, 'hold:' .. hold)
  end
  redis.call('ZREMRANGEBYSCORE', holds_key, '-inf', now_ms)
  if redis.call('HINCRBY', budget_key, 'held', 0 - freed) < 0 then redis.call('HSET', budget_key, 'held', 0) end
end

-- Credits spent in `period`; a new period starts from zero.
local function budget_spent(budget_key, period)
  local v = redis.call('HMGET', budget_key, 'period', 'spent')
  if v[1] ~= period then
    redis.call('HSET', budget_key, 'period', period, 'spent', 0)
    return 0
  end
  return tonumber(v[2]) or 0
end

-- Returns true and records the hold, or false and the credits left (<= 0).
local function budget_reserve(budget_key, holds_key, hold_id, amount, limit, period, now_ms, expires_ms)
  budget_sweep(budget_key, holds_key, now_ms)
  local spent = budget_spent(budget_key, period)
  local held = tonumber(redis.call('HGET', budget_key, 'held')) or 0
  if spent + held >= limit then return false, limit - spent - held end
  redis.call('ZADD', holds_key, expires_ms, hold_id)
  redis.call('HSET', budget_key, 'hold:' .. hold_id, amount)
  redis.call('HINCRBY', budget_key, 'held', amount)
  return true, limit - spent - held - amount
end

local function budget_release(budget_key, holds_key, hold_id)
  local held = redis.call('HGET', budget_key, 'hold:' .. hold_id)
  if not held then return end
  redis.call('HDEL', budget_key, 'hold:' .. hold_id)
  redis.call('ZREM', holds_key, hold_id)
  if redis.call('HINCRBY', budget_key, 'held', 0 - tonumber(held)) < 0 then redis.call('HSET', budget_key, 'held', 0) end
end

-- Moves the hold to spent; returns the spending after, and true when this charge used the budget up.
local function budget_settle(budget_key, holds_key, hold_id, cost, limit, period)
  budget_release(budget_key, holds_key, hold_id)
  if not limit then return 0, false end
  local before = budget_spent(budget_key, period)
  local after = redis.call('HINCRBY', budget_key, 'spent', cost)
  return after, before < limit and after >= limit
end

-- hold_reserve's part: ARGV ends with "budget", limit, period; KEYS with budget, budget_holds.
-- Returns nil (no budget, or admitted) or the refusal {-2, credits left}.
local function budget_check(keys, argv, hold_id, amount, now_ms, expires_ms)
  local a, k = #argv, #keys
  if a < 3 or argv[a - 2] ~= 'budget' then return nil end
  local ok, left = budget_reserve(keys[k - 1], keys[k], hold_id, amount, tonumber(argv[a - 1]), argv[a], now_ms, expires_ms)
  if ok then return nil end
  return {-2, left}
end

-- hold_release's part (same trailing arguments as hold_reserve's, optional).
local function budget_forget(keys, argv, hold_id)
  local a, k = #argv, #keys
  if a >= 3 and argv[a - 2] == 'budget' then budget_release(keys[k - 1], keys[k], hold_id) end
end
