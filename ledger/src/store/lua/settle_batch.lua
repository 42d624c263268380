-- settle_batch: several settles of one tenant in one call (group commit), each exactly as settle.lua
-- would do it run after the previous one (so a request id twice in a batch is settled once). The
-- counter changes are summed per (key, field) and applied once at the end (b_flush, lua/batch.lua);
-- an item that replaces an estimate first flushes, then reverses the estimate directly.
-- KEYS[1] holds ZSET; then per item i: KEYS[2i] its hold hash, KEYS[2i+1] its done marker.
-- ARGV: 1 prefix, 2 now ms (expired holds are reclaimed once, first), 3 reclaim limit, 4 done ttl ms,
--       5 session ttl s, 6 item count, then per item: request id, day id, month id,
--       day expire-at s, month expire-at s, cost, input, output, cache_read, cache_write, model,
--       feature, session, estimated ('0' / '1'), the audit value count and the audit record's
--       field, value pairs; last 3: audit day, expiry, maxlen.
-- Reply: one settle.lua reply per item, in order.
local prefix = ARGV[1]
B.holds = KEYS[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local done_ttl, sess_ttl, n = ARGV[4], ARGV[5], tonumber(ARGV[6])
local replies = {}
local next_a = 6
for i = 1, n do
  local a = next_a
  local audit_at = a + 15
  next_a = audit_at + tonumber(ARGV[audit_at])
  local done_key = KEYS[2 * i + 1]
  local u = {
    cost = ARGV[a + 6], input = ARGV[a + 7], output = ARGV[a + 8], cache_read = ARGV[a + 9],
    cache_write = ARGV[a + 10], model = ARGV[a + 11], feature = ARGV[a + 12], session = ARGV[a + 13],
    bypass = '0', estimated = ARGV[a + 14],
  }
  local prev = redis.call('GET', done_key)
  if prev and not is_estimate(prev) then
    replies[i] = {'DUPLICATE', prev}
  else
    local replaced = ''
    if prev then
      b_flush()
      replaced = unestimate(prefix, prev)
    end
    redis.call('SET', done_key, u.cost, 'PX', done_ttl)
    local held = b_drop_hold(prefix, ARGV[a + 1], KEYS[2 * i])
    b_commit_to(prefix, ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], sess_ttl, u, 'enforcer')
    if replaced ~= '' then audit_argv(prefix, audit_at, {'reversed_nusd', replaced})
    else audit_argv(prefix, audit_at, {}) end
    replies[i] = {'SETTLED', held or '', replaced}
  end
end
b_flush()
alert_run(prefix)
return replies
