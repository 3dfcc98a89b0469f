-- Store one response and index its items, all with the same expiry, in one
-- step (a reader never sees a record without its TTL, nor an item whose
-- response is missing).
-- KEYS[1]: the response hash; KEYS[2..]: one item key per indexed item
-- ARGV[1]: ttl seconds; ARGV[2]: how many hash field/value arguments follow;
-- then those pairs; then one value per item key, in KEYS order: "<response id> <item JSON>"
-- An item key holds "<owners> <item JSON>", owners being the comma-separated ids of the
-- stored responses that carry the item (a client re-sends earlier output items as input),
-- newest last and at most MAX_OWNERS: a delete removes the entry only with its last owner.
local MAX_OWNERS = 16
local ttl = tonumber(ARGV[1])
local pairs_end = 2 + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3, pairs_end))
redis.call('EXPIRE', KEYS[1], ttl)
for i = 2, #KEYS do
  local value = ARGV[pairs_end + i - 1]
  local old = redis.call('GET', KEYS[i])
  if old then
    local owner = string.sub(value, 1, string.find(value, ' ', 1, true) - 1)
    local owners = {}
    for earlier in string.gmatch(string.sub(old, 1, (string.find(old, ' ', 1, true) or 1) - 1), '[^,]+') do
      if earlier ~= owner then table.insert(owners, earlier) end
    end
    while #owners >= MAX_OWNERS do table.remove(owners, 1) end
    table.insert(owners, owner)
    value = table.concat(owners, ',') .. string.sub(value, #owner + 1)
  end
  redis.call('SET', KEYS[i], value, 'EX', ttl)
end
return 1
