-- Shared by both limiter scripts: a period's count rebuilt from the per-day usage and quota
-- adjustments hashes, for when the live count is for another period or missing, e.g. right after
-- `tollgate migrate`.
local function counted(usage, adjustments, ws, day)
  local n = 0
  for d = ws, day do
    n = n + (tonumber(redis.call('HGET', usage, d)) or 0) + (tonumber(redis.call('HGET', adjustments, d)) or 0)
  end
  return n
end
