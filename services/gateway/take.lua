-- One request against a bucket alone (reads): ARGV interval, burst, now.  Returns ms to wait (0: admitted).
local now = tonumber(ARGV[3])
local wait, tat = bucket(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
if wait > 0 then return math.ceil(wait) end
spend(KEYS[1], tat, now)
return 0
