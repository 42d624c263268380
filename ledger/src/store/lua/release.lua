-- release: drop a reservation without committing spend (the call failed before anything was billed).
-- KEYS[1] holds ZSET; KEYS[2] the hold hash; KEYS[3] the done marker.
-- ARGV: 1 prefix, 2 now ms, 3 reclaim limit, 4 reservation id.
-- Reply: {'RELEASED', amount} | {'UNESTIMATED', amount} when the hold had been abandoned and committed
-- as an estimate (the estimate is reversed and the marker becomes 'released', so this happens once)
-- | {'UNKNOWN'} when the hold no longer exists (settled, released, or never there).
local prefix = ARGV[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local amount = drop_hold(prefix, ARGV[4])
if amount then return {'RELEASED', amount} end
local prev = redis.call('GET', KEYS[3])
if prev and is_estimate(prev) then
  local a = unestimate(prefix, prev)
  redis.call('SET', KEYS[3], 'released', 'KEEPTTL')
  return {'UNESTIMATED', a}
end
return {'UNKNOWN'}
