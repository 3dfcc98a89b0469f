-- Fold the oldest `n` ledger entries into one opening-balance entry (ledger retention).
-- The caller read them and summed their credits; the script checks that the
-- newest of them is still where it was (another fold did not run meanwhile),
-- so the ledger keeps summing to the balance.
-- KEYS: ledger   ARGV: n, the newest folded entry (exact JSON), opening entry JSON
-- Returns 1 when folded, 0 when the ledger changed under the caller.
local n = tonumber(ARGV[1])
if redis.call('LLEN', KEYS[1]) < n or redis.call('LINDEX', KEYS[1], 0 - n) ~= ARGV[2] then return 0 end
redis.call('LTRIM', KEYS[1], 0, 0 - n - 1)
redis.call('RPUSH', KEYS[1], ARGV[3])
return 1
