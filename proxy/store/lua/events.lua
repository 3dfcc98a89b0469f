-- Webhook events (see proxy/admin/webhooks.py), pushed by the script that
-- detects them, so an event exists exactly when its cause was written.
-- Layout, in the tenant's slot:
--   events  LIST  event JSON, newest first (capped at 10000: the oldest beyond are dropped)
--   tenant  HASH  event_seq (the last event number), low_balance_threshold, events_dropped
--                 (dropped by the cap since the deliverer last logged them)
local function event_push(events_key, tenant_key, event_type, data_json, created_at)
  local seq = redis.call('HINCRBY', tenant_key, 'event_seq', 1)
  local tenant = redis.call('HGET', tenant_key, 'id')
  -- Tenant ids are [A-Za-z0-9._-] and types are constants: nothing to escape.
  redis.call('LPUSH', events_key, '{"id":"evt_' .. tenant .. '_' .. seq .. '","type":"' .. event_type
    .. '","created_at":' .. created_at .. ',"data":{"tenant":"' .. tenant .. '",' .. data_json .. '}}')
  if redis.call('LLEN', events_key) > 10000 then
    redis.call('LTRIM', events_key, 0, 9999)
    redis.call('HINCRBY', tenant_key, 'events_dropped', 1)
  end
  return 1
end
