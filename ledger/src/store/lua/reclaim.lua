-- reclaim: commit the tenant's expired holds (up to ARGV[3] per call) at their reserved amount as
-- estimated spend, once per request id (see abandon_hold in common.lua).
-- KEYS[1] holds ZSET. ARGV: 1 prefix, 2 now ms, 3 limit; last 3: audit day, expiry, maxlen.
-- Reply: the number of holds reclaimed.
return reclaim(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
