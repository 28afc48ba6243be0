-- FIRE: claims a schedule's fire times and pushes their messages in one step. The
-- schedule's watermark (the last fire time claimed) moves from `last` to `upto` only if it
-- is still `last`: of all the managers that compute the same fire times, one moves it and
-- pushes, the others find it moved and push nothing. Each fire time is thus enqueued once,
-- with no leader, whoever starts, stops or dies. Not allow-oom: it pushes new messages.
--
-- KEYS: queue, schedules
-- ARGV: name, last, upto, ahead, payloads...
--   name       the schedule's name, its field in the hash
--   last       the watermark the caller read; '' if it had none
--   upto       the new watermark: the newest fire time claimed (or, for a schedule seen
--              for the first time, the time from which its fires count)
--   ahead      seconds `upto` may be ahead of this server's clock: a caller whose clock
--              runs further ahead would push fires early and leave the watermark in the
--              future, where every manager with a right clock finds nothing due
--   payloads   the messages of the claimed fire times, oldest first (none may be sent:
--              missed fires that `catch_up` drops)
-- Returns 1 if this call claimed them, 0 if the watermark had moved, -1 if `upto` is too
-- far ahead of the server's clock, claiming nothing (decoded by scripts.FIRE).

local clock = redis.call('TIME')
if tonumber(upto) > tonumber(clock[1]) + tonumber(clock[2]) / 1e6 + tonumber(ahead) then
  return -1
end
if (redis.call('HGET', schedules, name) or '') ~= last then return 0 end
redis.call('HSET', schedules, name, upto)
for i = REST, #ARGV, 1000 do
  redis.call('LPUSH', queue, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
