-- Admit one request against several sliding windows at once, or none of them.
-- KEYS[i]: one sorted set of request timestamps per window (score: ms).
-- ARGV[1]: member (unique per request); then per key: limit, window_ms (0 = a plain count),
-- and for a plain count the Unix time in ms at which it may be dropped (0 = never).
-- Returns {allowed (1/0), index of the deciding key, remaining, reset_ms}.
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local member = ARGV[1]
local best_index, best_remaining, best_reset = 0, -1, 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local used
  if window > 0 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    used = redis.call('ZCARD', key)
  else
    used = tonumber(redis.call('GET', key) or '0')
  end
  local reset = 0
  if window > 0 and used > 0 then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    reset = tonumber(oldest[2]) + window - now
  end
  if used >= limit then
    return {0, i, 0, reset}
  end
  local remaining = limit - used - 1
  if best_remaining < 0 or remaining < best_remaining then
    best_index, best_remaining, best_reset = i, remaining, (used > 0 and reset or window)
  end
end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[3 * i])
  if window > 0 then
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, window)
  else
    redis.call('INCR', key)
    local drop_at = tonumber(ARGV[3 * i + 1])
    if drop_at > 0 then
      redis.call('PEXPIREAT', key, drop_at)
    end
  end
end
return {1, best_index, best_remaining, best_reset}
