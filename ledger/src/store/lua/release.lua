-- release: drop a reservation without committing spend (the call failed before anything was billed).
-- KEYS[1] holds ZSET; KEYS[2] the hold hash; KEYS[3] the done marker.
-- ARGV: 1 prefix, 2 now ms, 3 reclaim limit, 4 reservation id; last 3: audit day, expiry, maxlen.
-- Reply: {'RELEASED', amount} | {'UNESTIMATED', amount} when the hold had been abandoned and committed
-- as an estimate (the estimate is reversed and the marker becomes 'released', so this happens once)
-- | {'UNKNOWN'} when the hold no longer exists (settled, released, or never there).
local prefix = ARGV[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local id = ARGV[4]
local h = redis.call('HMGET', KEYS[2], 'feature', 'session', 'model', 'created')
local amount = drop_hold(prefix, id)
if amount then
  audit_add(prefix, {'v', '1', 'kind', 'release', 'path', 'enforcer', 'request_id', id,
    'tenant', prefix_tenant(prefix), 'feature', h[1] or '', 'session', h[2] or '', 'model', h[3] or '',
    'cost_nusd', '0', 'reserved_nusd', amount, 'outcome', 'released', 'started_ms', h[4] or ''})
  return {'RELEASED', amount}
end
local prev = redis.call('GET', KEYS[3])
if prev and is_estimate(prev) then
  local a = unestimate(prefix, prev)
  redis.call('SET', KEYS[3], 'released', 'KEEPTTL')
  local f = split_nl(prev)
  audit_add(prefix, {'v', '1', 'kind', 'release', 'path', 'enforcer', 'request_id', id,
    'tenant', prefix_tenant(prefix), 'feature', f[5] or '', 'session', f[6] or '', 'model', f[7] or '',
    'cost_nusd', '0', 'reversed_nusd', a, 'outcome', 'released'})
  return {'UNESTIMATED', a}
end
return {'UNKNOWN'}
