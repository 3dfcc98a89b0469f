-- Delete one response and the item index entries that still point at it (a
-- later response that re-sent the same item id owns that entry now).
-- KEYS[1]: the response hash; KEYS[2..]: its item keys   ARGV[1]: the response id
local owner = ARGV[1] .. ' '
for i = 2, #KEYS do
  local value = redis.call('GET', KEYS[i])
  if value and string.sub(value, 1, #owner) == owner then
    redis.call('DEL', KEYS[i])
  end
end
return redis.call('DEL', KEYS[1])
