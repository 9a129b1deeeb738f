-- Take one of ARGV[2] slots in the sorted set KEYS[1] (member: lease id, score: expiry ms).
-- Expired leases (their holder died or stopped renewing) are dropped first.
-- ARGV[1]: lease id, ARGV[2]: limit, ARGV[3]: ttl ms.
-- Returns {acquired (1/0), slots in use, ms until the earliest lease expires}.
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local used = redis.call('ZCARD', KEYS[1])
if used >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, used, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {1, used + 1, 0}
