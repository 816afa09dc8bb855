-- Decides a batch of requests on one reading of the clock: ARGV[1] is the clock in microseconds (0:
-- Redis's own TIME, which is what instances share; tests pass theirs). ARGV[2] holds the RECORDs
-- (limiter.rs builds them), each for as many requests in a row as its first number says, then:
-- flags (1 throttle + 2 quota + 4 the credits of a plan in shadow + 8 the bucket kept in the quota's
-- hash, as `t`); the place in KEYS of its limits' names (quota, usage, adjustments, and the bucket when
-- it is kept apart: a method's, or the plan's in a plan without a quota); the place of its
-- credits' name (`b` balance, `w` first day of the refill period last refilled in; 0 without
-- credits); interval, tolerance, limit, window start, window end, cost; refill amount (0 for none),
-- refill period start, its end. A name the batch shares is in KEYS once.
-- A request's answer is {verdict, a, b, c, credits}, in whole microseconds (exact in Lua's doubles),
-- `credits` the balance after it (-1 without credits):
--   {0, tokens left, quota left, microseconds until the bucket is full, credits}   admitted
--   {1, microseconds until a token frees up, 0, 0, -1}                            throttled
--   {2, tokens left, microseconds until the bucket is full, 0, -1}                quota too low
--   {3, the clock's day, 0, 0, -1}                                                a window is not today's
--   {4, tokens left, microseconds until the bucket is full, quota left, credits}  credits too low
-- A key's state is read once and written once per batch however many of its requests the batch
-- holds: a hot key costs Lua arithmetic per request, not Redis commands. The plan's bucket of a plan
-- with a quota is a field of the quota's hash, read and written with it: two commands fewer a key.
-- The answers go back in order, packed in one string, in RUNs: how many requests in a row it answers,
-- the first one's answer, and by how much each of a, b, c and credits steps from one to the next. A
-- busy key's requests (one record, each taking a token and a unit of quota) are one RUN: one
-- `struct.pack` instead of one a request, the most expensive thing the script did per request.
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
local RECORD, RUN = '<I2BI4I4I8I8I8I8I8I8I8I8I8', '<I2Bi8i8i8i8i8i8i8i8'
-- Locals: globals are looked up by name on every use.
local KEYS, pack, floor, max = KEYS, struct.pack, math.floor, math.max
local tats, quotas, usage, credits = {}, {}, {}, {}
local runs, r = {}, 0
-- The live quota count (and the plan's bucket kept with it) named by KEYS[K], for the period from
-- day ws to day we; read once a batch.
local function quota(K, ws, we)
  local q = quotas[KEYS[K]]
  if not q then
    local h = redis.call('HMGET', KEYS[K], 's', 'u', 't')
    if tonumber(h[1]) == ws then
      q = {used = tonumber(h[2]) or 0, ws = ws, we = we, fresh = false}
    else
      q = {used = counted(KEYS[K + 1], KEYS[K + 2], ws, day), ws = ws, we = we, fresh = true}
    end
    q.tat = tonumber(h[3])
    quotas[KEYS[K]] = q
  end
  return q
end
-- The run being answered: its length, status, first answer, last answer and steps.
local run_n, run_s, f1, f2, f3, f4, l1, l2, l3, l4, d1, d2, d3, d4 = 0
local function flush()
  if run_n > 0 then
    r = r + 1
    runs[r] = pack(RUN, run_n, run_s, f1, f2, f3, f4, d1, d2, d3, d4)
  end
end
local function answer(s, a, b, c, d)
  if run_n == 1 and s == run_s then
    d1, d2, d3, d4 = a - l1, b - l2, c - l3, d - l4
  elseif not (run_n > 1 and s == run_s and a - l1 == d1 and b - l2 == d2 and c - l3 == d3 and d - l4 == d4) then
    flush()
    run_n, run_s, f1, f2, f3, f4, d1, d2, d3, d4 = 0, s, a, b, c, d, 0, 0, 0, 0
  end
  run_n, l1, l2, l3, l4 = run_n + 1, a, b, c, d
end
-- Decides `count` requests in a row that share flags, names and numbers (one RECORD), answering each
-- in turn: their state is looked up once and kept in locals, so each request costs arithmetic
-- and its answer. What a request spends of the quota, the credits and the usage (`cost`) is spent
-- whole or not at all; 0 spends nothing.
local function decide(count, flags, K, C, interval, tolerance, limit, ws, we, cost, refill, rs, re)
  local b, w = 'b', 'w'
  if floor(flags / 4) % 2 == 1 then b, w = 'sb', 'sw' end
  local has_throttle, has_quota = flags % 2 == 1, floor(flags / 2) % 2 == 1
  local has_credits = C > 0
  if (has_quota and (day < ws or day >= we)) or (has_credits and refill > 0 and (day < rs or day >= re)) then
    for _ = 1, count do answer(3, day, 0, 0, -1) end
    return
  end
  local folded = floor(flags / 8) % 2 == 1
  local q, c, spent = nil, nil, 0
  local tat, took = now, false
  if has_throttle then
    if folded then
      q = quota(K, ws, we)
      tat = q.tat or 0
    else
      tat = tats[KEYS[K + 3]] or tonumber(redis.call('GET', KEYS[K + 3]) or '0')
    end
    if tat < now then tat = now end
  end
  for _ = 1, count do
    -- One pass per request; `break` ends it once answered.
    repeat
      local tokens, ahead = -1, 0
      if has_throttle then
        local new_tat = tat + interval
        ahead = new_tat - now
        if ahead > tolerance then
          answer(1, ahead - tolerance, 0, 0, -1)
          break
        end
        tokens = floor((tolerance - ahead) / interval)
        -- Taken even if the quota refuses: hammering a spent quota is not free.
        tat, took = new_tat, true
      end
      local remaining = -1
      if has_quota then
        if not q then q = quota(K, ws, we) end
        if cost > 0 and q.used + cost > limit then
          answer(2, tokens, ahead, 0, -1)
          break
        end
        remaining = max(0, limit - q.used)
      end
      -- Credits, after the quota: a refill first (back up to its amount, once a period), then the
      -- cost.
      if has_credits then
        if not c then
          local ck = KEYS[C] .. b
          c = credits[ck]
          if not c then
            local h = redis.call('HMGET', KEYS[C], b, w, 'b', 'w')
            -- Shadow credits start from the balance.
            if not h[1] then h[1], h[2] = h[3], h[4] end
            c = {key = KEYS[C], b = max(tonumber(h[1]) or 0, 0), w = tonumber(h[2]) or 0, bf = b, wf = w}
            credits[ck] = c
          end
        end
        if refill > 0 and c.w ~= rs then
          c.b = max(c.b, refill)
          c.w = rs
          c.dirty = true
        end
        if c.b < cost then
          answer(4, tokens, ahead, remaining, c.b)
          break
        end
        if cost > 0 then
          c.b = c.b - cost
          c.dirty = true
        end
      end
      if has_quota and cost > 0 then
        q.used = q.used + cost
        q.dirty = true
        remaining = max(0, limit - q.used)
      end
      spent = spent + cost
      answer(0, tokens, remaining, ahead, c and c.b or -1)
    until true
  end
  if took then
    if folded then
      q.tat, q.dirty = tat, true
    else
      tats[KEYS[K + 3]] = tat
    end
  end
  if spent > 0 then usage[KEYS[K + 1]] = (usage[KEYS[K + 1]] or 0) + spent end
end
local records, at = ARGV[2], 1
while at < #records do
  local count, flags, K, C, interval, tolerance, limit, ws, we, cost, refill, rs, re
  count, flags, K, C, interval, tolerance, limit, ws, we, cost, refill, rs, re, at = struct.unpack(RECORD, records, at)
  decide(count, flags, K, C, interval, tolerance, limit, ws, we, cost, refill, rs, re)
end
for key, tat in pairs(tats) do
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
for key, q in pairs(quotas) do
  if q.dirty then
    if q.tat then
      redis.call('HSET', key, 's', q.ws, 'u', q.used, 't', string.format('%.0f', q.tat))
    else
      redis.call('HSET', key, 's', q.ws, 'u', q.used)
    end
    -- The count outlives its period by two days; set once per period, not per request.
    if q.fresh then redis.call('EXPIREAT', key, (q.we + 2) * 86400) end
  end
end
for _, c in pairs(credits) do
  if c.dirty then redis.call('HSET', c.key, c.bf, string.format('%.0f', c.b), c.wf, c.w) end
end
for key, n in pairs(usage) do
  if n > 0 then redis.call('HINCRBY', key, day, n) end
end
flush()
return table.concat(runs)
