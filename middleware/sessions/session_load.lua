-- Read a session: its metadata and its stored messages, in one consistent snapshot.
-- KEYS: meta (HASH), messages (LIST)
-- Returns {meta as a flat field/value array (empty: no such session), messages}.
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
