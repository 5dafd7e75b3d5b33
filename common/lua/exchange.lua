-- The deadline rule's exchange (common/routing.exchange_for), atomically: a late job takes the place of a job
-- that still waits in the heavy queue, only if no heavy worker has been handed that job yet (its id is
-- after the group's last-delivered id) and it is still there. Then the waiting job is deleted from the
-- queue and answered with its light image, and the late job joins the queue; otherwise the late job is
-- answered with its light image. Either way exactly one answer per job, in the caller's transaction.
-- KEYS: heavy queue, completions. ARGV: group, id of the waiting job, its light answer, the late job
-- for the heavy queue, the late job's light answer. Returns 1 when exchanged, 0 when not.
local function after(a, b)  -- stream ids 'ms-seq': is a later than b?
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local delivered = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, last
    for i = 1, #group, 2 do
      if group[i] == 'name' then name = group[i + 1] end
      if group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    if name == ARGV[1] then delivered = last end
  end
end
if after(ARGV[2], delivered) and #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 1 then
  redis.call('XDEL', KEYS[1], ARGV[2])
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[3])
  redis.call('XADD', KEYS[1], '*', 'm', ARGV[4])
  return 1
end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[5])
return 0
