-- GCRA on KEYS[bucket]: ARGV interval (ms per request), burst, now (ms).  Sets `wait` (ms until the
-- request would fit, 0 when it fits) and `tat` (the bucket's new value, to store when admitted).
local function bucket(key, interval, burst, now)
  if interval <= 0 then return 0, nil end
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  local wait = tat + interval - now - burst * interval
  if wait > 0 then return wait, nil end
  return 0, tat + interval
end
local function spend(key, tat, now)
  if tat then redis.call('SET', key, tostring(tat), 'PX', math.max(1, math.ceil(tat - now))) end
end
