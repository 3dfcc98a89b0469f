-- Delete a session and its index entry.
-- KEYS: meta (HASH), messages (LIST), index (ZSET)   ARGV: id
-- Returns 1 when the session existed, else 0.
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return existed
