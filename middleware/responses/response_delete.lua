-- Delete one response, and take it off the owners of its item index entries: an entry
-- goes with its last owner that is still stored (see response_put.lua), so an item that
-- an earlier, still stored response also carries stays referenceable.
-- KEYS[1]: the response hash; KEYS[2 .. 1 + ARGV[2]]: its item keys; then the hashes of
-- the other owners the caller read from those entries, in ARGV[3..] order
-- ARGV[1]: the response id; ARGV[2]: how many item keys; ARGV[3..]: the other owners' ids
local id, items = ARGV[1], tonumber(ARGV[2])
-- Owners added since the caller read the entries are not in this table: they count as stored.
local gone = {}
for i = 3, #ARGV do
  if redis.call('EXISTS', KEYS[items + i - 1]) == 0 then gone[ARGV[i]] = true end
end
for i = 2, items + 1 do
  local value = redis.call('GET', KEYS[i])
  local space = value and string.find(value, ' ', 1, true)
  if space then
    local kept, dropped = {}, false
    for owner in string.gmatch(string.sub(value, 1, space - 1), '[^,]+') do
      if owner == id or gone[owner] then dropped = true else table.insert(kept, owner) end
    end
    if #kept == 0 then
      redis.call('DEL', KEYS[i])
    elseif dropped then
      redis.call('SET', KEYS[i], table.concat(kept, ',') .. string.sub(value, space), 'KEEPTTL')
    end
  end
end
return redis.call('DEL', KEYS[1])
