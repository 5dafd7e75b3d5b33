-- Atomic "deliver once": the done marker and the result are written together or not at all,
-- so a completion retried after a crash can never produce a second result. A tenant's job (ARGV[6] its
-- name, ARGV[7] its epoch) is answered only while that tenant is still registered under that epoch
-- (KEYS[4] the epochs, KEYS[5] the tenant set): a removed tenant's answers, or ones meant for an earlier
-- tenant of the same name, are not written (returns 3). ARGV[5] '0': the answer
-- to a job refused before admission. It is always delivered, and leaves a short-lived marker (which
-- the gateway reads as "out of flight") only when no job with this id is in flight (KEYS[3]); an
-- admitted retry under the same id deletes that marker in its admission transaction.
-- The target is checked before anything is written: a key of another type there (put by whoever can
-- write that name) would make the write fail after the marker was set, swallowing the answer. Such a
-- key holds no answer anyone is owed, and the reader waits on this name, so it is replaced (returns 2).
local want = ARGV[3] == 'stream' and 'stream' or 'list'
local kind = redis.call('TYPE', KEYS[2])['ok']
local admitted = ARGV[5] == '1'
if ARGV[6] ~= '' then
  local epoch = redis.call('HGET', KEYS[4], ARGV[6]) or '0'
  if redis.call('SISMEMBER', KEYS[5], ARGV[6]) == 0 or epoch ~= ARGV[7] then
    if admitted then redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) end
    return 3
  end
end
if admitted then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
elseif redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[1], '0', 'EX', ARGV[2])
end
local delivered = 1
if kind ~= 'none' and kind ~= want then
  redis.call('DEL', KEYS[2])
  delivered = 2
end
if ARGV[3] == 'stream' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'm', ARGV[1])
  -- A client's reply stream: a short-lived answer must not shorten the life of the others.
  redis.call('EXPIRE', KEYS[2], ARGV[2], 'NX')
  redis.call('EXPIRE', KEYS[2], ARGV[2], 'GT')
else
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return delivered
