-- rate_correct: replaces a call's reserved token count with its real one in the rate windows it
-- was counted in, if its second is still in the ring (else the window has moved past it anyway).
-- KEYS: the llmw:{T}:rl:<scope> hashes. ARGV: 1 the unix second the call was counted at, 2 the
-- change (real − reserved; usually negative). Never leaves a count below zero.
local sec = ARGV[1]
local i = tonumber(sec) % 60
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 's' .. i) == sec then
    if redis.call('HINCRBY', key, 't' .. i, ARGV[2]) < 0 then
      redis.call('HSET', key, 't' .. i, 0)
    end
  end
end
return 0
