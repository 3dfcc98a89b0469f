-- The sweeper's per-tenant step: settle the tenant's expired checkpointed holds
-- at their checkpoints and release its expired plain holds.
-- KEYS: tenant, holds, hold_amounts, ledger, ledger_ids, checkpointed_holds, hold_checkpoints,
--       hold_checkpoint_tails, then the keys the due holds' tails name (read by the sweeper first)
-- ARGV: now_ms, then the hold ids the sweeper found due in its deadline index
-- Returns one number per hold id of ARGV[2..]: its expiry when it is still open
-- and checkpointed (the index is behind: a later checkpoint pushed it out), else 0;
-- then the number of webhook events pushed.
--! include prelude
--! include events
--! include budget
--! include usage
--! include checkpoint
local now = tonumber(ARGV[1])
local answer = {}
local pushed = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  sweep_holds(KEYS[1], KEYS[2], KEYS[3], now)
  local _
  _, pushed = settle_checkpoints(KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], now, KEYS[8])
end
for i = 2, #ARGV do
  answer[i - 1] = tonumber(redis.call('ZSCORE', KEYS[6], ARGV[i])) or 0
end
answer[#answer + 1] = pushed
return answer
