-- Put a checkpointed hold into the sweeper's deadline index (one shard, its own slot).
-- KEYS: index shard   ARGV: expiry (unix ms), "<tenant>/<hold id>"
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]), ARGV[2])
return 1
