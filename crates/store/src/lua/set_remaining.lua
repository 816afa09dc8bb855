-- AWS UpdateUsage: sets the live quota count of one key under one plan so that ARGV[2] are used in
-- the period starting on day ARGV[1] and ending before day ARGV[3]; ARGV[4] is today. Answers by
-- how much the count changed.
local q = redis.call('HMGET', KEYS[1], 's', 'u')
local used = 0
if tonumber(q[1]) == tonumber(ARGV[1]) then used = tonumber(q[2]) or 0 else used = counted(KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[4])) end
redis.call('HSET', KEYS[1], 's', ARGV[1], 'u', ARGV[2])
redis.call('EXPIREAT', KEYS[1], (tonumber(ARGV[3]) + 2) * 86400)
return tonumber(ARGV[2]) - used
