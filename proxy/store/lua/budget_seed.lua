-- Start a key's budget from what the key was already charged in the budget's period.
-- Spending is counted in the budget only while the key has one (metering's budget.lua);
-- a budget set, changed or set again mid-period would otherwise start from zero and let
-- the key spend it again. The usage day buckets hold every charge per key (usage.lua),
-- so the period's spending is their sum, read in the same atomic step as it is written.
-- KEYS: budget, the period's usage day buckets (usage:d:<day start>)
-- ARGV: period id, the key id
-- Returns the spending the budget starts from.
local pattern = ARGV[2] .. '|*|credits'
local spent = 0
for i = 2, #KEYS do
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', KEYS[i], cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = page[1]
    for j = 2, #page[2], 2 do spent = spent + tonumber(page[2][j]) end
  until cursor == '0'
end
redis.call('HSET', KEYS[1], 'period', ARGV[1], 'spent', spent)
return spent
