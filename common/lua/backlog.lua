-- Entries of the stream KEYS[1] that the group ARGV[1] has not done: pending (delivered, not acked) plus
-- undelivered. Redis's count of the undelivered (XINFO GROUPS lag) stays right only while nothing has been
-- XDELed from the stream: 7.0 goes on counting an entry deleted ahead of the group's cursor as still to be
-- read. After an XDEL (the exchange, common/lua/exchange.lua) the undelivered entries are counted instead,
-- at most ARGV[2] of them. Returns 0 when the stream or the group does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local deleted = '0-0'
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
end
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local field = {}
  for i = 1, #group, 2 do field[group[i]] = group[i + 1] end
  if field['name'] == ARGV[1] then
    local lag = field['lag']
    if deleted ~= '0-0' or type(lag) ~= 'number' then
      local ahead = redis.call('XRANGE', KEYS[1], '(' .. field['last-delivered-id'], '+', 'COUNT', ARGV[2])
      lag = #ahead
    end
    return lag + field['pending']
  end
end
return 0
