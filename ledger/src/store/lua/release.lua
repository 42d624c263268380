-- release: drop a reservation without committing spend (the call failed before anything was billed).
-- KEYS[1] holds ZSET; KEYS[2] the hold hash.
-- ARGV: 1 prefix, 2 now ms, 3 reclaim limit, 4 reservation id.
-- Reply: {'RELEASED', amount} | {'UNKNOWN'} when the hold no longer exists (settled, released or reclaimed).
local prefix = ARGV[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local amount = drop_hold(prefix, ARGV[4])
if amount then return {'RELEASED', amount} end
return {'UNKNOWN'}
