-- Push the expiry of leases this process still holds. KEYS[i] pairs with ARGV[i + 1].
-- ARGV[1]: ttl ms. Leases already gone are not recreated.
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
