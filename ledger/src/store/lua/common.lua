-- llmwarden ledger: helpers shared by every script (prepended to each one, see store/scripts.rs).
-- Money is integer nano-USD. Amounts are passed to HINCRBY as the strings the caller sent, so Redis
-- does the arithmetic in 64-bit integers; Lua numbers (doubles) are only used to compare against caps.

-- Subtracts `amount` (a decimal string) from a held counter, never leaving it negative and never
-- re-creating a hash that has already expired.
local function unhold(key, field, amount)
  if redis.call('EXISTS', key) == 0 then return end
  local v = redis.call('HINCRBY', key, field, '-' .. amount)
  if v < 0 then redis.call('HSET', key, field, 0) end
end

-- Removes hold `id` of the tenant whose key prefix is `prefix` ("llmw:{T}:"): subtracts its amount
-- from every held counter it added to, deletes the hold hash and its ZSET entry.
-- Returns the held amount as a string, or false when the hold does not exist.
local function drop_hold(prefix, id)
  local hold_key = prefix .. 'hold:' .. id
  local h = redis.call('HMGET', hold_key, 'amount', 'day', 'month', 'feature', 'session')
  redis.call('ZREM', prefix .. 'holds', id)
  local amount = h[1]
  if not amount then return false end
  if amount ~= '0' then
    local dk = prefix .. 'spend:d:' .. h[2]
    local mk = prefix .. 'spend:m:' .. h[3]
    unhold(dk, 'held', amount)
    unhold(mk, 'held', amount)
    if h[4] and h[4] ~= '' then
      unhold(dk, 'feature:' .. h[4] .. ':held', amount)
      unhold(mk, 'feature:' .. h[4] .. ':held', amount)
    end
    if h[5] and h[5] ~= '' then
      unhold(prefix .. 'session:' .. h[5], 'held', amount)
    end
  end
  redis.call('DEL', hold_key)
  return amount
end

-- Reclaims up to `limit` holds whose expiry (ZSET score, ms) is at or before `now_ms`.
-- Returns how many were reclaimed.
local function reclaim(prefix, now_ms, limit)
  local ids = redis.call('ZRANGEBYSCORE', prefix .. 'holds', '-inf', now_ms, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do drop_hold(prefix, id) end
  return #ids
end

-- Sets the absolute expiry (unix seconds) of a period hash; idempotent.
local function expire_at(key, at_s)
  redis.call('EXPIREAT', key, at_s)
end

-- Adds committed spend and usage to one period hash. `u` is the table built by read_usage.
local function commit(key, u, source)
  redis.call('HINCRBY', key, 'spend', u.cost)
  redis.call('HINCRBY', key, 'requests', 1)
  redis.call('HINCRBY', key, 'input_tokens', u.input)
  redis.call('HINCRBY', key, 'output_tokens', u.output)
  redis.call('HINCRBY', key, 'cache_read_tokens', u.cache_read)
  redis.call('HINCRBY', key, 'cache_write_tokens', u.cache_write)
  redis.call('HINCRBY', key, 'src:' .. source, u.cost)
  if u.bypass == '1' then redis.call('HINCRBY', key, 'bypass', u.cost) end
  if u.estimated == '1' then redis.call('HINCRBY', key, 'estimated', u.cost) end
  if u.feature ~= '' then
    redis.call('HINCRBY', key, 'feature:' .. u.feature .. ':spend', u.cost)
    redis.call('HINCRBY', key, 'feature:' .. u.feature .. ':requests', 1)
  end
  if u.model ~= '' then
    redis.call('HINCRBY', key, 'model:' .. u.model .. ':spend', u.cost)
    redis.call('HINCRBY', key, 'model:' .. u.model .. ':requests', 1)
    redis.call('HINCRBY', key, 'model:' .. u.model .. ':input_tokens', u.input)
    redis.call('HINCRBY', key, 'model:' .. u.model .. ':output_tokens', u.output)
  end
end

-- Usage arguments shared by settle and record, starting at ARGV[i]:
-- cost, input, output, cache_read, cache_write, model, feature, session, bypass, estimated.
local function read_usage(i)
  return {
    cost = ARGV[i], input = ARGV[i + 1], output = ARGV[i + 2], cache_read = ARGV[i + 3],
    cache_write = ARGV[i + 4], model = ARGV[i + 5], feature = ARGV[i + 6], session = ARGV[i + 7],
    bypass = ARGV[i + 8], estimated = ARGV[i + 9],
  }
end

-- Commits usage to the day hash, the month hash and the session hash (when there is a session).
-- ARGV layout from `base`: day id, month id, day expire-at (s), month expire-at (s), session ttl (s).
local function commit_all(prefix, base, u, source)
  local dk = prefix .. 'spend:d:' .. ARGV[base]
  local mk = prefix .. 'spend:m:' .. ARGV[base + 1]
  commit(dk, u, source)
  commit(mk, u, source)
  expire_at(dk, ARGV[base + 2])
  expire_at(mk, ARGV[base + 3])
  if u.session ~= '' then
    local sk = prefix .. 'session:' .. u.session
    redis.call('HINCRBY', sk, 'spend', u.cost)
    redis.call('HINCRBY', sk, 'requests', 1)
    redis.call('EXPIRE', sk, ARGV[base + 4])
  end
end

