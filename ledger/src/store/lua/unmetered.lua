-- Books one unmetered provider connection (observer egress accounting), once per connection id.
-- KEYS: marker `llmw:{T}:umc:<conn id>`, day hash `llmw:{T}:unmetered:d:<day>`,
--       month hash `llmw:{T}:unmetered:m:<month>` (one tenant, one slot).
-- ARGV: marker ttl ms, day expire-at (s), month expire-at (s), `<service>|<host>`, bytes out,
--       bytes in, seen at (unix ms), the tenant's key prefix, then the audit record (a value
--       count and field, value pairs; common.lua audit_argv) and the common tail (no alert
--       budgets; audit day, expiry, maxlen).
-- Reply: RECORDED or DUPLICATE (a duplicate writes no audit record).
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 'DUPLICATE'
end
local pair = ARGV[4]
local at = tonumber(ARGV[7])
for i = 2, 3 do
  local k = KEYS[i]
  redis.call('HINCRBY', k, 'connections', 1)
  redis.call('HINCRBY', k, 'bytes_out', ARGV[5])
  redis.call('HINCRBY', k, 'bytes_in', ARGV[6])
  redis.call('HINCRBY', k, 'c|' .. pair, 1)
  redis.call('HINCRBY', k, 'o|' .. pair, ARGV[5])
  redis.call('HINCRBY', k, 'i|' .. pair, ARGV[6])
  local first = tonumber(redis.call('HGET', k, 'f|' .. pair) or '')
  if first == nil or at < first then
    redis.call('HSET', k, 'f|' .. pair, ARGV[7])
  end
  local last = tonumber(redis.call('HGET', k, 'l|' .. pair) or '')
  if last == nil or at > last then
    redis.call('HSET', k, 'l|' .. pair, ARGV[7])
  end
  redis.call('EXPIREAT', k, ARGV[i])
end
audit_argv(ARGV[8], 9, {})
return 'RECORDED'
