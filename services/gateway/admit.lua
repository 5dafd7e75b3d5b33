-- One atomic admission for a request of n jobs, shared by every gateway replica: the key's rate
-- (KEYS[2]) and its jobs in flight (KEYS[1]: a zset of job ids scored by when the entry expires, so
-- a crashed gateway cannot leak slots; a job is out of flight once the router's done marker for it
-- exists).  ARGV: interval, burst, cap, now, expire_at, done prefix, job ids.  Returns {0, 0}
-- admitted, {1, retry_ms} over the rate, {2, retry_ms} too many in flight.
local interval, burst, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, expire_at = tonumber(ARGV[4]), tonumber(ARGV[5])
local wait, tat = bucket(KEYS[2], interval, burst, now)
if wait > 0 then return {1, math.ceil(wait)} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[6] .. id) == 1 then redis.call('ZREM', KEYS[1], id) end
end
if cap > 0 and redis.call('ZCARD', KEYS[1]) + #ARGV - 6 > cap then return {2, 1000} end
spend(KEYS[2], tat, now)
for i = 7, #ARGV do redis.call('ZADD', KEYS[1], expire_at, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(expire_at - now))
return {0, 0}
