-- Checkpoint helpers, pasted by `--! include checkpoint` (after `--! include prelude`, and for
-- settle_checkpoints after budget, events and usage, whose settle_extras it calls).
-- A stream's hold moves at its first checkpoint from `holds` (released when it
-- expires, see sweep_holds) to `checkpointed_holds`, which sweep_holds never
-- touches: such a hold is settled at its checkpoint when it expires.
--   checkpointed_holds  ZSET  hold id -> expiry (unix ms), pushed on by every checkpoint
--   hold_checkpoints    HASH  hold id -> "<credits>|<entry id>|<entry JSON without its id>"
--   hold_checkpoint_tails HASH hold id -> JSON {"k": [...], "a": [...]}: hold_settle's trailing
--                       KEYS and ARGV (usage.lua's settle_extras), so a hold charged at its
--                       checkpoint counts in the usage aggregates, the key's budget and the
--                       low-balance event like one settled by its request
-- A hold settled or released the normal way leaves its checkpoint behind; the
-- sweep below drops it once it expires (the hold amount is gone by then).

-- Record the output so far on a hold and push its expiry out. Returns 1, or 0
-- when the hold is gone (settled, released or swept meanwhile).
local function checkpoint_hold(holds_key, amounts_key, checkpointed_key, checkpoints_key, hold, credits, entry_id, entry, expires_ms,
                               tails_key, tail)
  local held = redis.call('HGET', amounts_key, hold)
  if not held then return 0 end
  if tail ~= '' then redis.call('HSET', tails_key, hold, tail) end
  redis.call('ZREM', holds_key, hold)
  redis.call('ZADD', checkpointed_key, expires_ms, hold)
  -- Never more than was held: the checkpoint is charged without further checks.
  local charge = math.min(tonumber(credits), tonumber(held))
  redis.call('HSET', checkpoints_key, hold, as_int(charge) .. '|' .. entry_id .. '|' .. entry)
  return 1
end

-- Settle every expired checkpointed hold at its checkpoint (its replica is
-- gone: a live one would have pushed the expiry out or settled it): charge the
-- checkpoint once per entry id, as hold_settle would (its tail too: usage, budget, events),
-- and release the hold. The tail's keys are KEYS of the calling script (the sweeper reads the
-- tails first and declares them). Returns the number of holds charged and of events pushed.
local function settle_checkpoints(tenant_key, amounts_key, ledger_key, ids_key, checkpointed_key, checkpoints_key, now_ms, tails_key)
  local expired = redis.call('ZRANGEBYSCORE', checkpointed_key, '-inf', now_ms)
  local charged, pushed = 0, 0
  for _, hold in ipairs(expired) do
    local held = redis.call('HGET', amounts_key, hold)
    local checkpoint = redis.call('HGET', checkpoints_key, hold)
    if held then
      redis.call('HDEL', amounts_key, hold)
      if redis.call('HINCRBY', tenant_key, 'reserved', 0 - tonumber(held)) < 0 then
        redis.call('HSET', tenant_key, 'reserved', 0)
      end
      local credits, id, entry
      if checkpoint then credits, id, entry = string.match(checkpoint, '^(%d+)|([^|]*)|(.*)$') end
      if id then
        if redis.call('SADD', ids_key, id) == 0 then
          -- Another request reused this client-supplied request id: an entry id of its own.
          id = id .. '#' .. hold
          if redis.call('SADD', ids_key, id) == 0 then id = nil end
        end
      end
      if id then
        local balance = redis.call('HINCRBY', tenant_key, 'balance', 0 - tonumber(credits))
        ledger_push(ledger_key, entry_prefix(id, entry), balance)
        charged = charged + 1
        local tail = redis.call('HGET', tails_key, hold)
        if tail then
          tail = cjson.decode(tail)
          local keys = {tenant_key}
          for _, key in ipairs(tail.k) do keys[#keys + 1] = key end
          pushed = pushed + settle_extras(keys, tail.a, hold, tonumber(credits), balance)
        end
      end
    end
    redis.call('HDEL', checkpoints_key, hold)
    redis.call('HDEL', tails_key, hold)
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', checkpointed_key, '-inf', now_ms) end
  return charged, pushed
end
