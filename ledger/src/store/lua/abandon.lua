-- abandon: commit one hold now at its reserved amount as estimated spend, expired or not: a
-- restarted enforcer does this for the holds its previous run left once its spool is replayed
-- (the spool holds the real usage of every call whose settle could not be written).
-- KEYS[1] holds ZSET; KEYS[2] the hold hash; KEYS[3] the done marker.
-- ARGV: 1 prefix, 2 now ms, 3 reclaim limit, 4 reservation id; last 3: audit day, expiry, maxlen.
-- Reply: {'ESTIMATED', amount} | {'UNKNOWN'} when the hold no longer exists.
local prefix = ARGV[1]
reclaim(prefix, tonumber(ARGV[2]), tonumber(ARGV[3]))
local amount = abandon_hold(prefix, ARGV[4])
alert_run(prefix)
if amount then return {'ESTIMATED', amount} end
return {'UNKNOWN'}
