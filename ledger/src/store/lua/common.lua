-- llmwarden ledger: helpers shared by every script (prepended to each one, see store/scripts.rs).
-- Money is integer nano-USD. Amounts are passed to HINCRBY as the strings the caller sent, so Redis
-- does the arithmetic in 64-bit integers; Lua numbers (doubles) are only used to compare against caps.

-- Audit trail (docs/audit.md): every script that moves money appends one record per call to the
-- tenant's stream of the current UTC day, llmw:{T}:audit:<day>, in the same script as the money,
-- so the ledger and the audit trail never disagree. The LAST three ARGV of every script are the
-- audit day id ('' = audit off), the stream's absolute expiry (unix s) and its MAXLEN (0 = none;
-- trimmed with '~', so Redis trims whole nodes cheaply). The stream id (XADD '*', Redis time) is
-- the record's commit time; scripts are replicated by effects (the default since Redis 5).
local AUDIT_DAY, AUDIT_EXP, AUDIT_MAXLEN = ARGV[#ARGV - 2], ARGV[#ARGV - 1], ARGV[#ARGV]
-- A script called without these arguments (a script that moves no money) writes no record.
if not (AUDIT_DAY and string.match(AUDIT_DAY, '^%d%d%d%d%-%d%d%-%d%d$')) then AUDIT_DAY = '' end

-- The tenant of a key prefix "llmw:{T}:".
local function prefix_tenant(prefix)
  return string.sub(prefix, 7, -3)
end

-- Appends one record (a flat field, value list) to the tenant's audit stream of the day.
local function audit_add(prefix, fields)
  if AUDIT_DAY == '' then return end
  local key = prefix .. 'audit:' .. AUDIT_DAY
  -- NOMKSTREAM: the day's stream exists (and has its expiry) except for its first record, so
  -- the common case is one command; the first record creates it and sets the expiry.
  local added
  if AUDIT_MAXLEN ~= '0' then
    added = redis.call('XADD', key, 'NOMKSTREAM', 'MAXLEN', '~', AUDIT_MAXLEN, '*', unpack(fields))
  else
    added = redis.call('XADD', key, 'NOMKSTREAM', '*', unpack(fields))
  end
  if not added then
    if AUDIT_MAXLEN ~= '0' then
      redis.call('XADD', key, 'MAXLEN', '~', AUDIT_MAXLEN, '*', unpack(fields))
    else
      redis.call('XADD', key, '*', unpack(fields))
    end
    redis.call('EXPIREAT', key, AUDIT_EXP)
  end
end

-- Appends a record built by the caller: ARGV[i] is the count of values that follow (field, value
-- pairs), `extra` a list of fields the script adds (may be empty). Returns the index after them.
local function audit_argv(prefix, i, extra)
  local n = tonumber(ARGV[i])
  local f = {unpack(ARGV, i + 1, i + n)}
  for k, v in ipairs(extra) do f[n + k] = v end
  if #f > 0 then audit_add(prefix, f) end
  return i + n + 1
end

-- Budget alerts (docs/audit.md): after money moves, each budget that applies to the tenant is
-- compared with its thresholds (percent of the limit, ascending); a threshold crossed for the first
-- time in a period appends one alert to llmw:{T}:alerts, decided here, in the script that moved
-- the money, so N enforcers and the observer never double-fire or miss. The once-per-period
-- marker is the period hash's field `alerted:tenant` / `alerted:feature:<f>` (the highest threshold
-- fired; it expires with the hash). ARGV, from the end, before the three audit arguments:
-- the thresholds ("50,80,100"; '' = alerts off), the budget count n, and before it n budgets of
-- 4 values: kind ('t' tenant / 'f' feature), period ('d' / 'm'), feature ('' for 't'), limit.
-- The tail is parsed on the first alert_run that has periods to check: a script that commits
-- nothing (most reserves) does not pay for it.
local ALERT_PCTS, ALERT_CAPS = nil, nil
local function alert_setup()
  ALERT_PCTS, ALERT_CAPS = {}, {}
  local pcts, n = ARGV[#ARGV - 3] or '', tonumber(ARGV[#ARGV - 4]) or 0
  local base = #ARGV - 4 - 4 * n
  -- Only a well-formed tail is read (a script called without one checks no thresholds).
  if AUDIT_DAY == '' and ARGV[#ARGV - 2] ~= '' then n, pcts = 0, '' end
  if not string.match(pcts, '^[%d,]*$') or n < 0 or n > 256 or base < 1 then n, pcts = 0, '' end
  for p in string.gmatch(pcts, '%d+') do ALERT_PCTS[#ALERT_PCTS + 1] = tonumber(p) end
  for i = 0, n - 1 do
    local b = base + 4 * i
    ALERT_CAPS[#ALERT_CAPS + 1] = {kind = ARGV[b], period = ARGV[b + 1], feature = ARGV[b + 2],
      limit = ARGV[b + 3]}
  end
end
local alert_periods, alert_seen = {}, {}

-- Notes that the day and month hashes (by id) received committed spend in this script.
local function alert_touch(day, month)
  local k = day .. '\n' .. month
  if not alert_seen[k] then
    alert_seen[k] = true
    alert_periods[#alert_periods + 1] = {day, month}
  end
end

-- Fires every threshold crossed in the periods touched since the last call, once per
-- (budget, period, threshold).
local function alert_run(prefix)
  local periods = alert_periods
  alert_periods, alert_seen = {}, {}
  if #periods == 0 then return end
  if not ALERT_PCTS then alert_setup() end
  if #ALERT_PCTS == 0 then return end
  for _, pm in ipairs(periods) do
    for _, c in ipairs(ALERT_CAPS) do
      local pid = (c.period == 'd') and pm[1] or pm[2]
      local key = prefix .. 'spend:' .. c.period .. ':' .. pid
      local field, mark = 'spend', 'alerted:tenant'
      if c.kind == 'f' then
        field, mark = 'feature:' .. c.feature .. ':spend', 'alerted:feature:' .. c.feature
      end
      local limit = tonumber(c.limit)
      local spend_s = redis.call('HGET', key, field) or '0'
      local spend = tonumber(spend_s)
      if limit > 0 and spend * 100 >= limit * ALERT_PCTS[1] then
        local prev = tonumber(redis.call('HGET', key, mark) or '0')
        local top = prev
        for _, pct in ipairs(ALERT_PCTS) do
          if pct > prev and spend * 100 >= limit * pct then
            top = pct
            local tenant = prefix_tenant(prefix)
            local period = (c.period == 'd') and 'day' or 'month'
            redis.call('XADD', prefix .. 'alerts', 'MAXLEN', '~', '10000', '*',
              'v', '1', 'kind', 'budget_threshold',
              'id', table.concat({tenant, c.feature, period, pid, tostring(pct)}, '|'),
              'tenant', tenant, 'feature', c.feature, 'period', period, 'period_id', pid,
              'threshold_pct', tostring(pct), 'limit_nusd', c.limit, 'spend_nusd', spend_s)
          end
        end
        if top > prev then redis.call('HSET', key, mark, string.format('%d', top)) end
      end
    end
  end
end

-- A denial's scope as the audit trail names it: tenant/day, tenant/month, feature/day,
-- feature/month, session.
local function cap_scope(kind, period)
  if kind == 's' then return 'session' end
  local who = (kind == 'f') and 'feature' or 'tenant'
  return who .. '/' .. ((period == 'd') and 'day' or 'month')
end

-- Spend and session hashes seen to exist in this script. No script deletes one, and keys do not
-- expire while a script runs, so a key once seen stays; an absent key is asked again.
local EXISTING = {}
local function key_exists(key)
  if EXISTING[key] then return true end
  if redis.call('EXISTS', key) == 1 then
    EXISTING[key] = true
    return true
  end
  return false
end

-- Subtracts `amount` (a decimal string) from a counter (held, or a committed estimate being
-- replaced), never leaving it negative and never re-creating a hash that has already expired.
-- Subtracting '0' changes nothing (and Redis refuses the increment '-0').
local function unhold(key, field, amount)
  if amount == '0' or not key_exists(key) then return end
  local v = redis.call('HINCRBY', key, field, '-' .. amount)
  if v < 0 then redis.call('HSET', key, field, '0') end
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

-- Sets the absolute expiry (unix seconds) of a period hash; idempotent.
local function expire_at(key, at_s)
  redis.call('EXPIREAT', key, at_s)
end

-- Adds a decimal string to a counter; adding '0' is skipped (readers take an absent field as 0,
-- and the batch scripts skip a zero sum the same way), which saves a command for the token kinds
-- most calls do not use.
local function add(key, field, v)
  if v ~= '0' then redis.call('HINCRBY', key, field, v) end
end

-- Adds committed spend and usage to one period hash. `u` is the table built by read_usage.
local function commit(key, u, source)
  EXISTING[key] = true
  add(key, 'spend', u.cost)
  redis.call('HINCRBY', key, 'requests', '1')
  add(key, 'input_tokens', u.input)
  add(key, 'output_tokens', u.output)
  add(key, 'cache_read_tokens', u.cache_read)
  add(key, 'cache_write_tokens', u.cache_write)
  add(key, 'src:' .. source, u.cost)
  if u.bypass == '1' then add(key, 'bypass', u.cost) end
  if u.estimated == '1' then add(key, 'estimated', u.cost) end
  if u.feature ~= '' then
    add(key, 'feature:' .. u.feature .. ':spend', u.cost)
    redis.call('HINCRBY', key, 'feature:' .. u.feature .. ':requests', '1')
  end
  if u.model ~= '' then
    add(key, 'model:' .. u.model .. ':spend', u.cost)
    redis.call('HINCRBY', key, 'model:' .. u.model .. ':requests', '1')
    add(key, 'model:' .. u.model .. ':input_tokens', u.input)
    add(key, 'model:' .. u.model .. ':output_tokens', u.output)
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
-- `day_exp`/`month_exp` are the period hashes' absolute expiries (unix s); `sess_ttl` the session ttl (s).
-- A period hash is only created when its expiry is known (never a hash without TTL).
local function commit_to(prefix, day, month, day_exp, month_exp, sess_ttl, u, source)
  alert_touch(day, month)
  local dk = prefix .. 'spend:d:' .. day
  local mk = prefix .. 'spend:m:' .. month
  -- A period hash gets its expiry where it is created, and every writer that may create one sets
  -- it (the expiry is a function of the period id alone), so a hash seen to exist in this script
  -- already carries it: the EXPIREAT is only sent for a hash this commit may create.
  local had_d, had_m = EXISTING[dk], EXISTING[mk]
  if day_exp or key_exists(dk) then
    commit(dk, u, source)
    if day_exp and not had_d then expire_at(dk, day_exp) end
  end
  if month_exp or key_exists(mk) then
    commit(mk, u, source)
    if month_exp and not had_m then expire_at(mk, month_exp) end
  end
  if u.session ~= '' then
    local sk = prefix .. 'session:' .. u.session
    add(sk, 'spend', u.cost)
    redis.call('HINCRBY', sk, 'requests', '1')
    redis.call('EXPIRE', sk, sess_ttl or 86400)
  end
end

-- commit_to with the ARGV layout from `base`: day id, month id, day expire-at (s), month expire-at (s),
-- session ttl (s).
local function commit_all(prefix, base, u, source)
  commit_to(prefix, ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4], u, source)
end

-- Splits a done-marker value on '\n' (names never contain control characters).
local function split_nl(s)
  local out, start = {}, 1
  while true do
    local i = string.find(s, '\n', start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- Whether a done marker records an estimate committed for an abandoned hold (rather than a real
-- settle): "est\n<amount>\n<day>\n<month>\n<feature>\n<session>\n<model>".
local function is_estimate(v)
  return string.sub(v, 1, 4) == 'est\n'
end

-- Commits an abandoned hold (expired, or given up by its restarted owner) as spend: its reserved
-- amount, flagged `estimated`, one request, src:enforcer, no tokens. Exactly once per request id:
-- the done marker is set NX to an "est" value describing what was committed, so a later real settle
-- can replace the estimate (see unestimate) and a later reserve of the id is refused.
-- Drops the hold. Returns the amount, or false when the hold does not exist.
local function abandon_hold(prefix, id)
  local hold_key = prefix .. 'hold:' .. id
  local h = redis.call('HMGET', hold_key, 'amount', 'day', 'month', 'feature', 'session', 'model',
    'day_exp', 'month_exp', 'session_ttl', 'done_ttl', 'created', 'instance')
  if not h[1] then
    redis.call('ZREM', prefix .. 'holds', id)
    return false
  end
  local amount = h[1]
  local u = {
    cost = amount, input = '0', output = '0', cache_read = '0', cache_write = '0',
    model = h[6] or '', feature = h[4] or '', session = h[5] or '', bypass = '0', estimated = '1',
  }
  local marker = table.concat({'est', amount, h[2], h[3], u.feature, u.session, u.model}, '\n')
  local fresh = redis.call('SET', prefix .. 'done:' .. id, marker, 'NX', 'PX', h[10] or 604800000)
  drop_hold(prefix, id)
  if fresh then
    commit_to(prefix, h[2], h[3], h[7], h[8], h[9], u, 'enforcer')
    audit_add(prefix, {'v', '1', 'kind', 'estimate', 'path', 'enforcer', 'request_id', id,
      'tenant', prefix_tenant(prefix), 'feature', u.feature, 'session', u.session, 'model', u.model,
      'cost_nusd', amount, 'reserved_nusd', amount, 'estimated', '1', 'outcome', 'abandoned',
      'started_ms', h[11] or '', 'instance', h[12] or ''})
  end
  return amount
end

-- Reverses what abandon_hold committed, given its done-marker value (counters never go negative,
-- expired hashes are not re-created). Returns the estimated amount it removed.
local function unestimate(prefix, v)
  local f = split_nl(v)
  local amount, feature, session, model = f[2], f[5] or '', f[6] or '', f[7] or ''
  for _, key in ipairs({prefix .. 'spend:d:' .. f[3], prefix .. 'spend:m:' .. f[4]}) do
    unhold(key, 'spend', amount)
    unhold(key, 'requests', '1')
    unhold(key, 'src:enforcer', amount)
    unhold(key, 'estimated', amount)
    if feature ~= '' then
      unhold(key, 'feature:' .. feature .. ':spend', amount)
      unhold(key, 'feature:' .. feature .. ':requests', '1')
    end
    if model ~= '' then
      unhold(key, 'model:' .. model .. ':spend', amount)
      unhold(key, 'model:' .. model .. ':requests', '1')
    end
  end
  if session ~= '' then
    local sk = prefix .. 'session:' .. session
    unhold(sk, 'spend', amount)
    unhold(sk, 'requests', '1')
  end
  return amount
end

-- Reclaims up to `limit` holds whose expiry (ZSET score, ms) is at or before `now_ms`: each is
-- committed at its reserved amount as estimated spend (abandon_hold), because its owner neither
-- settled nor released it, so the call may well have been billed. Returns how many were reclaimed.
local function reclaim(prefix, now_ms, limit)
  local ids = redis.call('ZRANGEBYSCORE', prefix .. 'holds', '-inf', string.format('%d', now_ms),
    'LIMIT', '0', string.format('%d', limit))
  for _, id in ipairs(ids) do abandon_hold(prefix, id) end
  if #ids > 0 then alert_run(prefix) end
  return #ids
end

-- Rate limits (docs/enforcer.md, "Rate limits"): a sliding window of the last 60 seconds per
-- scope, kept as a ring of 60 one-second slots in the hash llmw:{T}:rl:<scope>: field s<i> is the
-- unix second slot i holds, r<i> its requests, t<i> its tokens (i = second mod 60). A block of
-- ARGV at `at`: the limit count, then per limit its scope, rpm, tpm (0 = none), then the call's
-- tokens. Only reserve scripts read it.
-- The 180 field names, built on first use (this file runs at every script call: a call without
-- rate limits must not pay for them).
local RL_FIELDS = nil
local function rl_fields()
  if not RL_FIELDS then
    RL_FIELDS = {}
    for i = 0, 59 do
      RL_FIELDS[#RL_FIELDS + 1] = 's' .. i
      RL_FIELDS[#RL_FIELDS + 1] = 'r' .. i
      RL_FIELDS[#RL_FIELDS + 1] = 't' .. i
    end
  end
  return RL_FIELDS
end

-- The index after the block at `at`.
local function rl_end(at)
  return at + 2 + 3 * tonumber(ARGV[at])
end

-- Whether one more request of the block's tokens fits every limit at unix second `now_s`: nil,
-- or {limit index, 'r'|'t', used, limit, seconds until it fits}.
local function rl_check(prefix, at, now_s)
  local n = tonumber(ARGV[at])
  local tokens = tonumber(ARGV[at + 1 + 3 * n])
  for j = 1, n do
    local b = at + (j - 1) * 3
    local rpm, tpm = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    local v = redis.call('HMGET', prefix .. 'rl:' .. ARGV[b + 1], unpack(rl_fields()))
    local slots, req, tok = {}, 0, 0
    for i = 0, 59 do
      local s = tonumber(v[3 * i + 1] or '')
      -- Seconds newer than `now_s` count too: replicas stamp a call before its script runs,
      -- so a call stamped earlier can arrive after later-stamped ones were counted.
      if s and s > now_s - 60 then
        local r, t = tonumber(v[3 * i + 2] or '0'), tonumber(v[3 * i + 3] or '0')
        req, tok = req + r, tok + t
        slots[#slots + 1] = {s, r, t}
      end
    end
    local which, used, limit, add, col
    if rpm > 0 and req + 1 > rpm then
      which, used, limit, add, col = 'r', req, rpm, 1, 2
    elseif tpm > 0 and tok + tokens > tpm then
      which, used, limit, add, col = 't', tok, tpm, tokens, 3
    end
    if which then
      table.sort(slots, function(x, y) return x[1] < y[1] end)
      local left, retry = used, 60
      for _, sl in ipairs(slots) do
        left = left - sl[col]
        if left + add <= limit then
          retry = math.min(60, sl[1] + 60 - now_s)
          break
        end
      end
      return {j, which, used, limit, retry}
    end
  end
  return nil
end

-- Counts one request and its tokens at second `now_s` in every limit of the block.
local function rl_commit(prefix, at, now_s)
  local n = tonumber(ARGV[at])
  local tokens = ARGV[at + 1 + 3 * n]
  local i = now_s % 60
  local now_str = string.format('%d', now_s)
  for j = 1, n do
    local key = prefix .. 'rl:' .. ARGV[at + (j - 1) * 3 + 1]
    if redis.call('HGET', key, 's' .. i) ~= now_str then
      redis.call('HSET', key, 's' .. i, now_str, 'r' .. i, '0', 't' .. i, '0')
    end
    redis.call('HINCRBY', key, 'r' .. i, '1')
    redis.call('HINCRBY', key, 't' .. i, tokens)
    redis.call('EXPIRE', key, '61')
  end
end

-- Appends a refused reserve's own context to a denial's record `f`: the caller passes only the
-- path and provider (ARGV), the rest is in the reserve's arguments already, so a reserve that is
-- admitted (the common case) sends no record fields it will not use.
local function deny_context(f, prefix, id, amount, started_ms, feature, session, model)
  f[#f + 1] = 'request_id'; f[#f + 1] = id
  f[#f + 1] = 'tenant'; f[#f + 1] = prefix_tenant(prefix)
  if feature ~= '' then f[#f + 1] = 'feature'; f[#f + 1] = feature end
  if session ~= '' then f[#f + 1] = 'session'; f[#f + 1] = session end
  if model ~= '' then f[#f + 1] = 'model'; f[#f + 1] = model end
  f[#f + 1] = 'reserved_nusd'; f[#f + 1] = amount
  f[#f + 1] = 'started_ms'; f[#f + 1] = started_ms
  return f
end

-- The audit record of a rate refusal (`ctx`: deny_context's fields) and the script's reply.
local function rl_refuse(prefix, at, audit_at, d, ctx)
  local scope = ARGV[at + (d[1] - 1) * 3 + 1]
  local f = {'v', '1', 'kind', 'deny', 'outcome', 'rate_limited', 'cost_nusd', '0',
    'scope', 'rate/' .. scope .. '/' .. ((d[2] == 'r') and 'rpm' or 'tpm')}
  for _, v in ipairs(ctx) do f[#f + 1] = v end
  audit_argv(prefix, audit_at, f)
  return {'RATE', d[1], d[2], string.format('%d', d[3]), string.format('%d', d[4]),
    string.format('%d', d[5])}
end
