-- The router reads the submission streams through this script: one entry at a time, and an entry over
-- ARGV[1] bytes (its ``m`` field, else the sum of its field names and values, as the router counts)
-- comes back as a stub: ``_oversized <size>`` plus its job_id (when short and valid) and reply_to
-- (when short), so no batch of big entries ever reaches the router's memory. It is the same
-- XREADGROUP/XAUTOCLAIM the router would send (same pending list, same delivery counter), over many
-- streams (KEYS) in one round trip: at most ARGV[6] entries from each stream while any other stream
-- still has some (fair), then more from those that have, up to ARGV[5] in all.
-- ARGV: limit, mode, group, consumer, count, per_stream, then read: id (">" or "0": own pending);
-- claim: min-idle. Returns {{key index, entry}, ...}.
local limit, mode, group, consumer = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local count, per_stream = tonumber(ARGV[5]), tonumber(ARGV[6])
local function get(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
end
local function bound(entry)
  local fields = entry[2]
  if not fields then return entry end
  local size = 0
  for i = 1, #fields, 2 do size = size + #fields[i] + #fields[i + 1] end
  local m = get(fields, 'm')
  if m then size = #m end
  if size <= limit then return entry end
  local job_id, reply_to = get(fields, 'job_id'), get(fields, 'reply_to')
  if m then
    local ok, body = pcall(cmsgpack.unpack, m)
    if ok and type(body) == 'table' then job_id, reply_to = body['job_id'], body['reply_to'] end
    body = nil
  end
  local stub = {'_oversized', tostring(size)}
  if type(job_id) == 'string' and #job_id <= 128 and string.match(job_id, '^[%w_%.:%-]+$') then
    table.insert(stub, 'job_id'); table.insert(stub, job_id)
  end
  if type(reply_to) == 'string' and #reply_to <= 200 then
    table.insert(stub, 'reply_to'); table.insert(stub, reply_to)
  end
  fields, m = nil, nil  -- let the collector have the big strings before the next read
  collectgarbage('step', 1024)
  return {entry[1], stub}
end
local out, taken, cursor = {}, {}, {}
local function one(k)  -- the next entry of stream k, or nil when it has none for us
  local entry
  if mode == 'claim' then
    local reply = redis.call('XAUTOCLAIM', KEYS[k], group, consumer, ARGV[7], cursor[k] or '0-0', 'COUNT', 1)
    cursor[k], entry = reply[1], reply[2][1]
    return entry
  end
  repeat
    local from = cursor[k] or ARGV[7]
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[k], from)
    entry = reply and reply[1][2][1]
    if entry and ARGV[7] ~= '>' then cursor[k] = entry[1] end  -- own pending: walk the list
    -- One of ours deleted since it was read (trimmed): nothing left to do for it.
    if entry and not entry[2] then redis.call('XACK', KEYS[k], group, entry[1]) end
  until not entry or entry[2]
  return entry
end
local active = {}
for k = 1, #KEYS do active[k] = k end
local function sweep(cap)  -- one entry per stream per round, round after round
  while #active > 0 and #out < count do
    local still = {}
    for _, k in ipairs(active) do
      if #out < count and (taken[k] or 0) < cap then
        local entry = one(k)
        if entry then
          table.insert(out, {k, bound(entry)})
          taken[k] = (taken[k] or 0) + 1
          table.insert(still, k)
        end
      elseif #out >= count or (taken[k] or 0) >= cap then
        table.insert(still, k)
      end
    end
    if #out >= count then break end
    local progressed = false
    for _, k in ipairs(still) do if (taken[k] or 0) < cap then progressed = true end end
    active = still
    if not progressed then break end
  end
end
sweep(per_stream)
sweep(count)
return out
