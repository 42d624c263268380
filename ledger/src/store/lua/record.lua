-- record: post-hoc spend seen by the observer (no reservation); idempotent per event id.
-- KEYS[1] holds ZSET; KEYS[2] the event marker (llmw:{T}:ev:<event id>).
-- ARGV: 1 prefix, 2 now ms, 3 reclaim limit, 4 event ttl ms, 5 day id, 6 month id,
--       7 day expire-at s, 8 month expire-at s, 9 session ttl s,
--       10.. usage: cost, input, output, cache_read, cache_write, model, feature, session, bypass, estimated,
--       20 audit value count, then the audit record's field, value pairs; last 3: audit day, expiry, maxlen.
-- Reply: {'RECORDED'} | {'DUPLICATE'}.
local prefix = ARGV[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local u = read_usage(10)
if not redis.call('SET', KEYS[2], u.cost, 'NX', 'PX', ARGV[4]) then
  return {'DUPLICATE'}
end
commit_all(prefix, 5, u, 'observer')
audit_argv(prefix, 20, {})
alert_run(prefix)
return {'RECORDED'}
