-- An event on a client's reply stream before its answer (Admitted, Progress): added only to a stream
-- (a key of another type under that name is left to the answer's delivery, which replaces it),
-- trimmed, and given the answer's TTL unless it has one.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'stream' then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
return 1
