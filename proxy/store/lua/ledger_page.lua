-- One page of the ledger, newest first, with a cursor that stays put while new entries arrive.
-- A cursor is the position of an entry counted from the oldest (0); a page after cursor c
-- starts at the entry just older than c.
-- KEYS: ledger   ARGV: cursor ("" for the newest page), limit
-- Returns {length, index of the first row, rows}.
local n = redis.call('LLEN', KEYS[1])
local first = 0
if ARGV[1] ~= '' then first = math.max(0, n - tonumber(ARGV[1])) end
return {n, first, redis.call('LRANGE', KEYS[1], first, first + tonumber(ARGV[2]) - 1)}
