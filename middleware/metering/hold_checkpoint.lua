-- Record a stream's output so far on its hold (see checkpoint.lua).
-- KEYS: holds, hold_amounts, checkpointed_holds, hold_checkpoints, hold_checkpoint_tails
-- ARGV: hold id, credits so far, entry id, entry JSON (a complete object without
--       "id", flagged estimated), expires_ms, the settlement's tail JSON ('' none)
-- Returns 1 when recorded, 0 when the hold is gone.
--! include prelude
--! include checkpoint
return checkpoint_hold(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), KEYS[5], ARGV[6] or '')
