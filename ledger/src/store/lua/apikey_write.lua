-- Writes one API key record if the stored one is still what the caller read (compare and set),
-- and bumps the hash's version so every enforcer's cache reloads.
-- KEYS[1] = llmw:apikeys
-- ARGV[1] = key id, ARGV[2] = the record read before ("" = there must be none), ARGV[3] = new record
-- Returns the new version, or -1 when the record changed in between (the caller re-reads).
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur or '') ~= ARGV[2] then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return redis.call('HINCRBY', KEYS[1], '#version', 1)
