-- Store one response: its fields and its expiry in one step (a reader never
-- sees a record without its TTL).
-- KEYS: the response hash   ARGV: ttl seconds, then field, value pairs
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
