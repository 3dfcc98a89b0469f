-- Take or keep a lease: one holder at a time, lapsing after `ttl_ms` unless renewed.
-- KEYS: lease   ARGV: holder id, ttl_ms
-- Returns 1 when the caller holds the lease (taken or renewed), 0 when another does.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
