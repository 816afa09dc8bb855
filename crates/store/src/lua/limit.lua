-- Decides a batch of requests on one reading of the clock: four KEYS and eight ARGV per request
-- after ARGV[1], the clock in microseconds (0: Redis's own TIME, which is what instances share;
-- tests pass theirs). Answers one {verdict, a, b, c} per request, in order, in whole microseconds
-- (exact in Lua's doubles, returned as integers):
--   {0, tokens left, quota left, microseconds until the bucket is full}   admitted and counted
--   {1, microseconds until a token frees up, 0, 0}                        throttled
--   {2, tokens left, microseconds until the bucket is full, 0}            quota too low for the cost
--   {3, the clock's day, 0, 0}                                            the window is not today's
-- A key's state is read once and written once per batch however many of its requests the batch
-- holds: a hot key costs Lua arithmetic per request, not Redis commands.
local now, day
local clock = tonumber(ARGV[1])
if clock > 0 then
  now = clock
  day = math.floor(clock / 86400000000)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  day = math.floor(tonumber(t[1]) / 86400)
end
local tats, quotas, usage = {}, {}, {}
local function decide(K, A)
  local interval, tolerance = tonumber(ARGV[A + 2]), tonumber(ARGV[A + 3])
  local has_quota = ARGV[A + 4] == '1'
  local limit, ws, we = tonumber(ARGV[A + 5]), tonumber(ARGV[A + 6]), tonumber(ARGV[A + 7])
  -- What the request spends of the quota and the usage, whole or not at all; 0 spends nothing.
  local cost = tonumber(ARGV[A + 8])
  if has_quota and (day < ws or day >= we) then return {3, day, 0, 0} end
  local tokens, ahead = -1, 0
  if ARGV[A + 1] == '1' then
    local tat = tats[KEYS[K + 1]] or tonumber(redis.call('GET', KEYS[K + 1]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + interval
    ahead = new_tat - now
    if ahead > tolerance then return {1, ahead - tolerance, 0, 0} end
    tokens = math.floor((tolerance - ahead) / interval)
    -- Taken even if the quota refuses: hammering a spent quota is not free.
    tats[KEYS[K + 1]] = new_tat
  end
  local remaining = -1
  if has_quota then
    local q = quotas[KEYS[K + 2]]
    if not q then
      local h = redis.call('HMGET', KEYS[K + 2], 's', 'u')
      if tonumber(h[1]) == ws then
        q = {used = tonumber(h[2]) or 0, ws = ws, we = we, fresh = false}
      else
        q = {used = counted(KEYS[K + 3], KEYS[K + 4], ws, day), ws = ws, we = we, fresh = true}
      end
      quotas[KEYS[K + 2]] = q
    end
    if cost > 0 and q.used + cost > limit then return {2, tokens, ahead, 0} end
    if cost > 0 then
      q.used = q.used + cost
      q.dirty = true
    end
    remaining = math.max(0, limit - q.used)
  end
  usage[KEYS[K + 3]] = (usage[KEYS[K + 3]] or 0) + cost
  return {0, tokens, remaining, ahead}
end
local out = {}
for i = 0, #KEYS / 4 - 1 do out[i + 1] = decide(i * 4, 1 + i * 8) end
for key, tat in pairs(tats) do
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
for key, q in pairs(quotas) do
  if q.dirty then
    redis.call('HSET', key, 's', q.ws, 'u', q.used)
    -- The count outlives its period by two days; set once per period, not per request.
    if q.fresh then redis.call('EXPIREAT', key, (q.we + 2) * 86400) end
  end
end
for key, n in pairs(usage) do
  if n > 0 then redis.call('HINCRBY', key, day, n) end
end
return out
