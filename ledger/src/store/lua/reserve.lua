-- reserve: atomically check every cap against committed + held + amount, then hold the amount.
-- KEYS[1] holds ZSET (llmw:{T}:holds); KEYS[2] the hold hash; KEYS[3] the done marker.
-- ARGV: 1 prefix, 2 now ms, 3 reclaim limit, 4 reservation id, 5 amount, 6 ttl ms,
--       7 day id, 8 month id, 9 day expire-at s, 10 month expire-at s, 11 session ttl s,
--       12 feature ('' = none), 13 session ('' = none), 14 hold safety ttl ms, 15 model ('' = none),
--       16 done ttl ms, 17 instance id ('' = none), 18 cap count, then per cap: kind ('t' tenant, 'f' feature, 's' session), period ('d' / 'm'), limit;
--       then the rate limit block (common.lua: count, scope/rpm/tpm each, the call's tokens);
--       then the audit value count and the field, value pairs a denial's record takes from the
--       caller (path, provider; the script adds the rest, common.lua deny_context); last 3: audit
--       day, expiry, maxlen.
-- Reply: {'ALLOW', amount, expires_ms, 'new'|'existing'} | {'DENY', cap index (1-based), spend, held}
--        | {'RATE', limit index, 'r'|'t', used, limit, retry-after s}
--        | {'SETTLED'} when the request id was already settled.
local prefix = ARGV[1]
local now = tonumber(ARGV[2])
reclaim(prefix, now, tonumber(ARGV[3]))

local id = ARGV[4]
-- The common case (neither the hold nor the done marker exists) costs one call.
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
  local existing = redis.call('HMGET', KEYS[2], 'amount', 'expires')
  if existing[1] then
    return {'ALLOW', existing[1], existing[2], 'existing'}
  end
  if redis.call('EXISTS', KEYS[3]) == 1 then
    return {'SETTLED'}
  end
end

local amount_s = ARGV[5]
local amount = tonumber(amount_s)
local dk = prefix .. 'spend:d:' .. ARGV[7]
local mk = prefix .. 'spend:m:' .. ARGV[8]
local feature = ARGV[12]
local session = ARGV[13]
local sk = prefix .. 'session:' .. session

local n = tonumber(ARGV[18])
local rl_at = 19 + n * 3
local audit_at = rl_end(rl_at)
for i = 1, n do
  local base = 18 + (i - 1) * 3
  local kind, period, limit = ARGV[base + 1], ARGV[base + 2], tonumber(ARGV[base + 3])
  local key = (period == 'd') and dk or mk
  local fs, fh = 'spend', 'held'
  if kind == 'f' then
    fs, fh = 'feature:' .. feature .. ':spend', 'feature:' .. feature .. ':held'
  elseif kind == 's' then
    key = sk
  end
  local v = redis.call('HMGET', key, fs, fh)
  if v[1] or v[2] then EXISTING[key] = true end
  local spend_s, held_s = v[1] or '0', v[2] or '0'
  if tonumber(spend_s) + tonumber(held_s) + amount > limit then
    audit_argv(prefix, audit_at, deny_context({'v', '1', 'kind', 'deny', 'outcome', 'denied',
      'cost_nusd', '0', 'scope', cap_scope(kind, period), 'limit_nusd', ARGV[base + 3],
      'spent_nusd', spend_s, 'held_nusd', held_s}, prefix, id, amount_s, ARGV[2], feature, session,
      ARGV[15]))
    return {'DENY', i, spend_s, held_s}
  end
end

local now_s = math.floor(now / 1000)
local limited = rl_check(prefix, rl_at, now_s)
if limited then
  return rl_refuse(prefix, rl_at, audit_at, limited,
    deny_context({}, prefix, id, amount_s, ARGV[2], feature, session, ARGV[15]))
end
rl_commit(prefix, rl_at, now_s)

-- Numbers go to Redis as strings formatted with %d: a Lua number passed to redis.call is
-- formatted as a float (%.17g), which costs more.
local expires = string.format('%d', now + tonumber(ARGV[6]))
-- A period hash seen above already carries its expiry (common.lua, commit_to).
local had_d, had_m = EXISTING[dk], EXISTING[mk]
redis.call('HINCRBY', dk, 'held', amount_s)
redis.call('HINCRBY', mk, 'held', amount_s)
if feature ~= '' then
  redis.call('HINCRBY', dk, 'feature:' .. feature .. ':held', amount_s)
  redis.call('HINCRBY', mk, 'feature:' .. feature .. ':held', amount_s)
end
if not had_d then expire_at(dk, ARGV[9]) end
if not had_m then expire_at(mk, ARGV[10]) end
if session ~= '' then
  redis.call('HINCRBY', sk, 'held', amount_s)
  redis.call('EXPIRE', sk, ARGV[11])
end
redis.call('HSET', KEYS[2], 'amount', amount_s, 'day', ARGV[7], 'month', ARGV[8],
  'feature', feature, 'session', session, 'created', ARGV[2], 'expires', expires,
  'model', ARGV[15], 'day_exp', ARGV[9], 'month_exp', ARGV[10], 'session_ttl', ARGV[11],
  'done_ttl', ARGV[16], 'instance', ARGV[17])
redis.call('PEXPIRE', KEYS[2], string.format('%d', tonumber(ARGV[6]) + tonumber(ARGV[14])))
redis.call('ZADD', KEYS[1], expires, id)
return {'ALLOW', amount_s, expires, 'new'}
