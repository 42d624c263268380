-- settle: replace a reservation with the actual cost; idempotent per request id.
-- KEYS[1] holds ZSET; KEYS[2] the hold hash; KEYS[3] the done marker (llmw:{T}:done:<request id>).
-- ARGV: 1 prefix, 2 now ms, 3 reclaim limit, 4 request id (= reservation id), 5 done ttl ms,
--       6 day id, 7 month id, 8 day expire-at s, 9 month expire-at s, 10 session ttl s,
--       11.. usage: cost, input, output, cache_read, cache_write, model, feature, session, bypass, estimated,
--       21 audit value count, then the audit record's field, value pairs; last 3: audit day, expiry, maxlen.
-- Reply: {'SETTLED', held amount released or '', estimate replaced or ''}
--        | {'DUPLICATE', the done marker's value}.
-- A done marker holding an estimate (the hold was abandoned and committed at its reserved amount)
-- is replaced: the estimate is reversed and the real usage committed instead, once.
local prefix = ARGV[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local u = read_usage(11)
local prev = redis.call('GET', KEYS[3])
local replaced = ''
if prev then
  if not is_estimate(prev) then return {'DUPLICATE', prev} end
  replaced = unestimate(prefix, prev)
end
redis.call('SET', KEYS[3], u.cost, 'PX', ARGV[5])
local held = drop_hold(prefix, ARGV[4])
commit_all(prefix, 6, u, 'enforcer')
alert_run(prefix)
if replaced ~= '' then audit_argv(prefix, 21, {'reversed_nusd', replaced}) else audit_argv(prefix, 21, {}) end
return {'SETTLED', held or '', replaced}
