-- Store one response and index its items, all with the same expiry, in one
-- step (a reader never sees a record without its TTL, nor an item whose
-- response is missing).
-- KEYS[1]: the response hash; KEYS[2..]: one item key per indexed item
-- ARGV[1]: ttl seconds; ARGV[2]: how many hash field/value arguments follow;
-- then those pairs; then one value per item key, in KEYS order
local ttl = tonumber(ARGV[1])
local pairs_end = 2 + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3, pairs_end))
redis.call('EXPIRE', KEYS[1], ttl)
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[pairs_end + i - 1], 'EX', ttl)
end
return 1
