-- reserve_batch: several reserves of one tenant in one call (group commit), each exactly as
-- reserve.lua would do it run after the previous one: a cap check sees the amounts held by the
-- earlier items of the batch. Each counter pair a cap reads is read once (HMGET); the held
-- increments, expiries and ZADD are applied once at the end (b_flush, lua/batch.lua).
-- KEYS[1] holds ZSET (llmw:{T}:holds); then per item i: KEYS[2i] its hold hash, KEYS[2i+1] its done marker.
-- ARGV: 1 prefix, 2 now ms (the latest item's; expired holds are reclaimed once, first),
--       3 reclaim limit, 4 session ttl s, 5 hold safety ttl ms, 6 done ttl ms, 7 item count, then per
--       item: reservation id, now ms, amount, ttl ms, day id, month id, day expire-at s,
--       month expire-at s, feature ('' = none), session ('' = none), model ('' = none),
--       instance id ('' = none), cap count, then per cap: kind ('t' / 'f' / 's'), period ('d' / 'm'), limit,
--       then the rate limit block (common.lua: count, scope/rpm/tpm each, the call's tokens),
--       then the audit value count and the field, value pairs a denial's record takes from the
--       caller (path, provider; common.lua deny_context adds the rest); last 3: audit day, expiry, maxlen.
-- Reply: one reserve.lua reply per item, in order.
local prefix = ARGV[1]
B.holds = KEYS[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local sess_ttl, grace, done_ttl, n = ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])

-- The counters as Redis holds them (strings, false when absent): raw[key][field], read once.
local raw = {}
local function counters(key, fs, fh)
  local r = raw[key]
  if not r then
    r = {}
    raw[key] = r
  end
  if r[fs] == nil or r[fh] == nil then
    local v = redis.call('HMGET', key, fs, fh)
    r[fs], r[fh] = v[1], v[2]
    b_seed(key, {fs, fh}, v)
  end
  return r[fs] or '0', r[fh] or '0'
end

local replies = {}
local a = 8
for i = 1, n do
  local id, now_s, amount_s, ttl = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local day, month, day_exp, month_exp = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local feature, session, model, instance = ARGV[a + 8], ARGV[a + 9], ARGV[a + 10], ARGV[a + 11]
  local ncaps = tonumber(ARGV[a + 12])
  local caps = a + 13
  local rl_at = caps + 3 * ncaps
  local audit_at = rl_end(rl_at)
  a = audit_at + 1 + tonumber(ARGV[audit_at])
  local hold_key, done_key = KEYS[2 * i], KEYS[2 * i + 1]
  -- The common case (neither exists) costs one call.
  if redis.call('EXISTS', hold_key, done_key) > 0 then
    local existing = redis.call('HMGET', hold_key, 'amount', 'expires')
    if existing[1] then
      replies[i] = {'ALLOW', existing[1], existing[2], 'existing'}
    elseif redis.call('EXISTS', done_key) == 1 then
      replies[i] = {'SETTLED'}
    end
  end
  if not replies[i] then
    local amount = tonumber(amount_s)
    local dk = name(prefix, 'spend:d:', day)
    local mk = name(prefix, 'spend:m:', month)
    for c = 1, ncaps do
      local base = caps + (c - 1) * 3
      local kind, period, limit = ARGV[base], ARGV[base + 1], tonumber(ARGV[base + 2])
      local key = (period == 'd') and dk or mk
      local fs, fh = 'spend', 'held'
      if kind == 'f' then
        fs, fh = name('feature:', feature, ':spend'), name('feature:', feature, ':held')
      elseif kind == 's' then
        key = name(prefix, 'session:', session)
      end
      local spend_s, held_s = counters(key, fs, fh)
      local d = B.delta[key] and B.delta[key][fh] or 0
      if d ~= 0 then held_s = string.format('%d', tonumber(held_s) + d) end
      if tonumber(spend_s) + tonumber(held_s) + amount > limit then
        audit_argv(prefix, audit_at, deny_context({'v', '1', 'kind', 'deny', 'outcome', 'denied',
          'cost_nusd', '0', 'scope', cap_scope(kind, period), 'limit_nusd', ARGV[base + 2],
          'spent_nusd', spend_s, 'held_nusd', held_s}, prefix, id, amount_s, now_s, feature,
          session, model))
        replies[i] = {'DENY', c, spend_s, held_s}
        break
      end
    end
    if not replies[i] then
      -- Rate counters are written at once (not batched): a later item of the batch reads them.
      local sec = math.floor(tonumber(now_s) / 1000)
      local limited = rl_check(prefix, rl_at, sec)
      if limited then
        replies[i] = rl_refuse(prefix, rl_at, audit_at, limited,
          deny_context({}, prefix, id, amount_s, now_s, feature, session, model))
      else
        rl_commit(prefix, rl_at, sec)
      end
    end
    if not replies[i] then
      local expires = tonumber(now_s) + tonumber(ttl)
      b_incr(dk, 'held', amount)
      b_incr(mk, 'held', amount)
      if feature ~= '' then
        local fh = name('feature:', feature, ':held')
        b_incr(dk, fh, amount)
        b_incr(mk, fh, amount)
      end
      b_expiry('EXPIREAT', dk, day_exp)
      b_expiry('EXPIREAT', mk, month_exp)
      if session ~= '' then
        local sk = name(prefix, 'session:', session)
        b_incr(sk, 'held', amount)
        b_expiry('EXPIRE', sk, sess_ttl)
      end
      redis.call('HSET', hold_key, 'amount', amount_s, 'day', day, 'month', month,
        'feature', feature, 'session', session, 'created', now_s, 'expires', expires,
        'model', model, 'day_exp', day_exp, 'month_exp', month_exp, 'session_ttl', sess_ttl,
        'done_ttl', done_ttl, 'instance', instance)
      redis.call('PEXPIRE', hold_key, tonumber(ttl) + grace)
      B.zadd[#B.zadd + 1] = expires
      B.zadd[#B.zadd + 1] = id
      replies[i] = {'ALLOW', amount_s, string.format('%d', expires), 'new'}
    end
  end
end
b_flush()
return replies
