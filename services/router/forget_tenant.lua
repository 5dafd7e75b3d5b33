-- A removed tenant's stream, deleted once its loop has stopped (that loop's last read may have recreated
-- it), unless the tenant was added again meanwhile.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return redis.call('DEL', KEYS[2]) end
return 0
