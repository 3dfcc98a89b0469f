-- Store a session's title, unless the session was deleted or expired meanwhile.
-- KEYS: meta (HASH)   ARGV: title ('' = the title could not be made), title_state
-- Returns 1 when stored, 0 when the session is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'title', ARGV[1]) end
redis.call('HSET', KEYS[1], 'title_state', ARGV[2])
return 1
