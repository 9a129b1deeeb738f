-- Admit one request: count it against several limits and, optionally, take one slot of a
-- model's concurrency cap, all in one step or not at all.
--
-- KEYS[1..n]: one key per limit: a sorted set of request timestamps (score: ms) for a sliding
--   window, or a plain counter. With a slot, KEYS[n + 1] is the model's sorted set of leases
--   (member: lease id, score: expiry ms).
-- ARGV[1]: member (unique per request); ARGV[2]: lease id, or '' for no slot; ARGV[3]: the
--   slot limit; ARGV[4]: lease ttl ms; then per limit: count, window_ms (0 = a plain count),
--   and for a plain count the Unix time in ms at which it may be dropped (0 = never).
-- Returns {allowed (1/0), index of the deciding key (0: none), remaining, reset_ms}. The slot
--   decides as key n + 1: refused when full (reset: ms until its earliest lease expires);
--   when admitted, the limit with the least room decides, or the slot when there are none.
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + math.floor(now_parts[2] / 1000)
local member, lease = ARGV[1], ARGV[2]
local n = #KEYS
if lease ~= '' then
  n = n - 1
end
local best_index, best_remaining, best_reset = 0, -1, 0
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[3 * i + 2])
  local window = tonumber(ARGV[3 * i + 3])
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
local slot_key, ttl = KEYS[n + 1], tonumber(ARGV[4])
if lease ~= '' then
  local slots = tonumber(ARGV[3])
  -- Expired leases (their holder died or stopped renewing) are dropped first.
  redis.call('ZREMRANGEBYSCORE', slot_key, '-inf', now)
  local held = redis.call('ZCARD', slot_key)
  if held >= slots then
    local first = redis.call('ZRANGE', slot_key, 0, 0, 'WITHSCORES')
    return {0, n + 1, 0, tonumber(first[2]) - now}
  end
  if n == 0 then
    best_index, best_remaining, best_reset = 1, slots - held - 1, 0
  end
end
for i = 1, n do
  local key = KEYS[i]
  local window = tonumber(ARGV[3 * i + 3])
  if window > 0 then
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, window)
  else
    redis.call('INCR', key)
    local drop_at = tonumber(ARGV[3 * i + 4])
    if drop_at > 0 then
      redis.call('PEXPIREAT', key, drop_at)
    end
  end
end
if lease ~= '' then
  redis.call('ZADD', slot_key, now + ttl, lease)
  redis.call('PEXPIRE', slot_key, ttl * 2)
end
return {1, best_index, best_remaining, best_reset}
