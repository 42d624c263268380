-- llmwarden ledger: group-commit helpers for the batch scripts (reserve_batch.lua, settle_batch.lua),
-- prepended after common.lua. A batch processes its items in order with exactly the single scripts'
-- semantics, but its counter writes are collected here and applied by b_flush, one HINCRBY per
-- (key, field): increments are summed, and `unhold` (never negative, never re-create an expired
-- hash) is simulated on the value read once from Redis. Sums are Lua doubles: the caller keeps each
-- item's amounts and token counts below 2^46 and a batch at 64 items, so every sum stays below 2^52
-- and exact. A value at or above B_SAFE is never simulated: b_unhold flushes and calls unhold.

local B_SAFE = 4503599627370496 -- 2^52

local B = {}

-- Key and field names, built once per script call: a string concatenation costs far more than
-- the table lookups that find it again.
local NAMES = {}
local function name(a, b, c)
  local t = NAMES[a]
  if not t then
    t = {}
    NAMES[a] = t
  end
  local u = t[b]
  if not u then
    u = {}
    t[b] = u
  end
  local v = u[c]
  if not v then
    v = a .. b .. c
    u[c] = v
  end
  return v
end

-- Forgets every pending write and every value read (after b_flush, Redis holds the truth).
local function b_reset()
  B.keys = {}     -- keys with a pending counter write, in first-write order
  B.fields = {}   -- key -> its fields with a pending write, in first-write order
  B.delta = {}    -- key -> field -> pending change (a number)
  B.base = {}     -- key -> field -> the value in Redis (a number), or false when absent; once read
  B.exists = {}   -- key -> whether the key exists in Redis; once checked
  B.written = {}  -- key -> true once a pending increment creates it
  B.exp_keys = {} -- keys with a pending expiry, in order
  B.exp = {}      -- key -> {'EXPIREAT', at_s} or {'EXPIRE', ttl_s}; the last one set wins
  B.zadd = {}     -- score, member pairs for one ZADD on B.holds
  B.zrem = {}     -- members for one ZREM on B.holds
  B.del = {}      -- keys for one DEL
  B.groups = {}   -- settled usage summed per (day, month, feature, model, estimated), see b_commit_group
  B.group_of = {}
  B.soft = {}     -- key -> field -> true: a usage counter, not written when its sum is 0 (commit's add)
end
b_reset()

-- Applies every pending write: one HINCRBY per (key, field) in first-write order (so new fields are
-- created in the order the single scripts create them), then the expiries, ZADD, ZREM and DEL.
-- A field whose net change is 0 is still written unless it is known to exist (HINCRBY by 0 creates
-- it with 0, as the single scripts' writes would have), except a usage counter (B.soft): commit
-- (common.lua) skips adding '0', so a sum of 0 is not written either.
local function b_flush()
  for _, g in ipairs(B.groups) do
    for _, key in ipairs(g.keys) do
      local d = B.delta[key]
      d['spend'] = d['spend'] + g.cost
      d['requests'] = d['requests'] + g.n
      d['input_tokens'] = d['input_tokens'] + g.input
      d['output_tokens'] = d['output_tokens'] + g.output
      d['cache_read_tokens'] = d['cache_read_tokens'] + g.cache_read
      d['cache_write_tokens'] = d['cache_write_tokens'] + g.cache_write
      d[g.src] = d[g.src] + g.cost
      if g.bypass then d['bypass'] = d['bypass'] + g.cost end
      if g.estimated then d['estimated'] = d['estimated'] + g.cost end
      if g.ff then
        d[g.ff[1]] = d[g.ff[1]] + g.cost
        d[g.ff[2]] = d[g.ff[2]] + g.n
      end
      if g.mf then
        d[g.mf[1]] = d[g.mf[1]] + g.cost
        d[g.mf[2]] = d[g.mf[2]] + g.n
        d[g.mf[3]] = d[g.mf[3]] + g.input
        d[g.mf[4]] = d[g.mf[4]] + g.output
      end
    end
  end
  for _, key in ipairs(B.keys) do
    local d, base, soft = B.delta[key], B.base[key] or {}, B.soft[key] or {}
    for _, field in ipairs(B.fields[key]) do
      local n = d[field]
      if n ~= 0 or not (base[field] or soft[field]) then
        redis.call('HINCRBY', key, field, string.format('%d', n))
      end
    end
  end
  for _, key in ipairs(B.exp_keys) do
    local e = B.exp[key]
    redis.call(e[1], key, e[2])
  end
  if #B.zadd > 0 then redis.call('ZADD', B.holds, unpack(B.zadd)) end
  if #B.zrem > 0 then redis.call('ZREM', B.holds, unpack(B.zrem)) end
  if #B.del > 0 then redis.call('DEL', unpack(B.del)) end
  b_reset()
end

-- The pending-change table of `key`, with `field` registered (first-write order).
local function b_slot(key, field)
  local d = B.delta[key]
  if not d then
    d = {}
    B.delta[key] = d
    B.fields[key] = {}
    B.keys[#B.keys + 1] = key
  end
  if d[field] == nil then
    d[field] = 0
    local f = B.fields[key]
    f[#f + 1] = field
  end
  return d
end

-- HINCRBY key field n (a number), deferred.
local function b_incr(key, field, n)
  local d = b_slot(key, field)
  d[field] = d[field] + n
  B.written[key] = true
end

-- Sets a key's expiry at flush time: cmd is 'EXPIREAT' (v = unix s) or 'EXPIRE' (v = ttl s).
local function b_expiry(cmd, key, v)
  if not B.exp[key] then B.exp_keys[#B.exp_keys + 1] = key end
  B.exp[key] = {cmd, v}
end

-- Whether `key` exists in Redis (not counting pending writes); checked once.
local function b_in_redis(key)
  local e = B.exists[key]
  if e == nil then
    e = redis.call('EXISTS', key) == 1
    B.exists[key] = e
  end
  return e
end

-- Whether `key` exists once the pending writes are applied.
local function b_exists(key)
  return B.written[key] or b_in_redis(key)
end

-- The value of key.field in Redis (a number), or false when absent; read once.
local function b_base(key, field)
  local b = B.base[key]
  if not b then
    b = {}
    B.base[key] = b
  end
  local v = b[field]
  if v == nil then
    v = false
    if b_in_redis(key) then
      local s = redis.call('HGET', key, field)
      if s then v = tonumber(s) end
    end
    b[field] = v
  end
  return v
end

-- Records values read by the caller with one HMGET (`vals[i]` for `fields[i]`) as b_base values.
local function b_seed(key, fields, vals)
  local b = B.base[key]
  if not b then
    b = {}
    B.base[key] = b
  end
  for i, f in ipairs(fields) do
    if vals[i] then b[f] = tonumber(vals[i]) else b[f] = false end
  end
end

-- unhold (common.lua), deferred: subtracts `amount` (a decimal string) never going below 0, and
-- does nothing when the key does not exist.
local function b_unhold(key, field, amount)
  if not b_exists(key) then return end
  local a = tonumber(amount)
  local base = b_base(key, field)
  if a >= B_SAFE or (base and math.abs(base) >= B_SAFE) then
    b_flush()
    unhold(key, field, amount)
    return
  end
  local d = b_slot(key, field)
  local v = (base or 0) + d[field] - a
  if v < 0 then v = 0 end
  d[field] = v - (base or 0)
end

-- drop_hold (common.lua), deferred: the hold hash (`hold_key`, of hold `id`) is read now; the
-- counters, ZREM and DEL are pending.
local function b_drop_hold(prefix, id, hold_key)
  local h = redis.call('HMGET', hold_key, 'amount', 'day', 'month', 'feature', 'session')
  B.zrem[#B.zrem + 1] = id
  local amount = h[1]
  if not amount then return false end
  if amount ~= '0' then
    local dk = name(prefix, 'spend:d:', h[2])
    local mk = name(prefix, 'spend:m:', h[3])
    b_unhold(dk, 'held', amount)
    b_unhold(mk, 'held', amount)
    if h[4] and h[4] ~= '' then
      local fh = name('feature:', h[4], ':held')
      b_unhold(dk, fh, amount)
      b_unhold(mk, fh, amount)
    end
    if h[5] and h[5] ~= '' then
      b_unhold(name(prefix, 'session:', h[5]), 'held', amount)
    end
  end
  B.del[#B.del + 1] = hold_key
  return amount
end

-- The fields commit (common.lua) writes for usage `u` from `source`, in its order.
local function b_commit_fields(u, source)
  local f = {'spend', 'requests', 'input_tokens', 'output_tokens', 'cache_read_tokens',
    'cache_write_tokens', 'src:' .. source}
  if u.bypass == '1' then f[#f + 1] = 'bypass' end
  if u.estimated == '1' then f[#f + 1] = 'estimated' end
  if u.feature ~= '' then
    f[#f + 1] = name('feature:', u.feature, ':spend')
    f[#f + 1] = name('feature:', u.feature, ':requests')
  end
  if u.model ~= '' then
    f[#f + 1] = name('model:', u.model, ':spend')
    f[#f + 1] = name('model:', u.model, ':requests')
    f[#f + 1] = name('model:', u.model, ':input_tokens')
    f[#f + 1] = name('model:', u.model, ':output_tokens')
  end
  return f
end

-- commit_to (common.lua), deferred: a period hash is only created when its expiry is known. Usage
-- is summed per group of items with the same hashes, feature, model and flags (b_flush adds each
-- group's sums once); a group's first item registers its fields, in commit's order.
local function b_commit_to(prefix, day, month, day_exp, month_exp, sess_ttl, u, source)
  alert_touch(day, month)
  local dk = name(prefix, 'spend:d:', day)
  local mk = name(prefix, 'spend:m:', month)
  local keys = {}
  if day_exp or b_exists(dk) then keys[#keys + 1] = dk end
  if month_exp or b_exists(mk) then keys[#keys + 1] = mk end
  local gk = table.concat({#keys, day, month, u.feature, u.model, u.bypass, u.estimated, source}, '\n')
  local g = B.group_of[gk]
  if not g then
    g = {keys = keys, n = 0, cost = 0, input = 0, output = 0, cache_read = 0, cache_write = 0,
      src = 'src:' .. source, bypass = u.bypass == '1', estimated = u.estimated == '1'}
    if u.feature ~= '' then
      g.ff = {name('feature:', u.feature, ':spend'), name('feature:', u.feature, ':requests')}
    end
    if u.model ~= '' then
      g.mf = {name('model:', u.model, ':spend'), name('model:', u.model, ':requests'),
        name('model:', u.model, ':input_tokens'), name('model:', u.model, ':output_tokens')}
    end
    B.group_of[gk] = g
    B.groups[#B.groups + 1] = g
    -- The group's first item registers the fields, as its commit would create them.
    local fields = b_commit_fields(u, source)
    for _, key in ipairs(keys) do
      local soft = B.soft[key] or {}
      B.soft[key] = soft
      for _, f in ipairs(fields) do
        b_slot(key, f)
        soft[f] = true
      end
      B.written[key] = true
    end
  end
  if day_exp then b_expiry('EXPIREAT', dk, day_exp) end
  if month_exp then b_expiry('EXPIREAT', mk, month_exp) end
  g.n = g.n + 1
  g.cost = g.cost + tonumber(u.cost)
  g.input = g.input + tonumber(u.input)
  g.output = g.output + tonumber(u.output)
  g.cache_read = g.cache_read + tonumber(u.cache_read)
  g.cache_write = g.cache_write + tonumber(u.cache_write)
  if u.session ~= '' then
    local sk = name(prefix, 'session:', u.session)
    b_incr(sk, 'spend', tonumber(u.cost))
    B.soft[sk] = B.soft[sk] or {}
    B.soft[sk]['spend'] = true
    b_incr(sk, 'requests', 1)
    b_expiry('EXPIRE', sk, sess_ttl or 86400)
  end
end
