-- Append one finished turn to a session, trim it, refresh its expiry and index it (atomic,
-- so concurrent turns on one session never lose each other).
-- KEYS: meta (HASH), messages (LIST), index (ZSET of the tenant's sessions by updated_at ms)
-- ARGV: id, now_ms, ttl_seconds, max_messages, max_tokens, system ('' = keep the stored one),
--       created_at the turn read the session with ('' = it was new), then the turn's messages
--       as JSON, each serialised with "role" as its first key.
-- Layout: meta holds id, created_at, updated_at (ms), message_count, tokens (estimate of the
-- list), system (the session's system message, JSON, never trimmed), title, title_state.
-- Returns {message_count, first}: first is 1 for the session's first stored turn (start a title);
-- {-1, 0} when the session the turn was read from is gone (deleted or expired meanwhile): a
-- deleted session is not brought back by a turn that was in flight.
local meta, list, index = KEYS[1], KEYS[2], KEYS[3]
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_messages, max_tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local system, read_created_at = ARGV[6], ARGV[7]
local first_message = 8

if read_created_at ~= '' and redis.call('HGET', meta, 'created_at') ~= read_created_at then
  return {-1, 0}
end

-- Same estimate as elsewhere in the gateway: ~4 bytes of JSON per token plus framing.
local function estimate(message) return math.floor(#message / 4) + 4 end

if redis.call('HSETNX', meta, 'created_at', now) == 1 then
  redis.call('HSET', meta, 'id', ARGV[1], 'tokens', 0)
end
if system ~= '' then
  redis.call('HSET', meta, 'system', system)
else
  system = redis.call('HGET', meta, 'system') or ''
end

local tokens = tonumber(redis.call('HGET', meta, 'tokens')) or 0
local added = #ARGV - first_message + 1
for i = first_message, #ARGV do
  redis.call('RPUSH', list, ARGV[i])
  tokens = tokens + estimate(ARGV[i])
end

local len = redis.call('LLEN', list)
local message_budget, token_budget = max_messages, max_tokens
if system ~= '' then
  message_budget = message_budget - 1
  token_budget = token_budget - estimate(system)
end
-- Drop whole turns, oldest first: a turn runs from one user message up to the next, so an
-- assistant's tool calls are never separated from their tool results. The latest turn is never
-- dropped, even when it alone exceeds the bounds: the messages just appended and, when they
-- start with tool results (the client answering the last turn's tool calls), the rest of that
-- turn back to its user message. With no user message before them, nothing is dropped.
local function is_user(message) return string.sub(message, 1, 14) == '{"role":"user"' end
local kept = added
if (len > message_budget or tokens > token_budget) and not is_user(ARGV[first_message]) then
  kept = len
  local older = redis.call('LRANGE', list, 0, len - added - 1)
  for i = #older, 1, -1 do
    if is_user(older[i]) then
      kept = len - i + 1
      break
    end
  end
end
while (len > message_budget or tokens > token_budget) and len > kept do
  tokens = tokens - estimate(redis.call('LPOP', list))
  len = len - 1
  while len > kept and not is_user(redis.call('LINDEX', list, 0)) do
    tokens = tokens - estimate(redis.call('LPOP', list))
    len = len - 1
  end
end

local count = len
if system ~= '' then count = count + 1 end
redis.call('HSET', meta, 'updated_at', now, 'tokens', tokens, 'message_count', count)
local first = redis.call('HSETNX', meta, 'title_state', 'pending')
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', list, ttl)
redis.call('ZADD', index, now, ARGV[1])
-- Index entries older than the expiry belong to sessions that are gone.
redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl * 1000)
redis.call('EXPIRE', index, ttl)
return {count, first}
