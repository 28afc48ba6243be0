-- The flow library, put before the body of every script that calls it (see scripts.py).
-- Workers that find no permit free, or their queue paused, block on the queue's `wake`
-- list (`BLPOP`, at most a few seconds) rather than poll; whoever frees permits, or
-- resumes the queue, pushes a token for each worker that may now start something.
--
-- Defines:
--   wake_waiters(wake, n) -> pushes n tokens (at most 100) onto the list `wake`, which
--     expires 2 s after the last push: a token nobody took soon is stale
--   release_permits(permits, wake, queue, worker_id, held, group_running, ring, hold) ->
--     drops the worker's entry from `permits` and its group permits (`held`, counted in
--     `group_running`): it died, or was replaced, and waiters are woken if work waits. With
--     `hold` > 0 (ms) its process may still be running, orphaned or frozen, until it sees
--     its list taken over (worker/freeze.py): its `max_running` permits then stay counted
--     that long, as the entry `<worker-id>~<until, ms>`, which TAKE_FLOW drops once past
--   add_running(group_running, g, n) -> adds n (below 0: takes) to group `g`'s count of
--     messages in a handler; a count that reaches 0 leaves the hash, which then holds only
--     the groups running now, not every group ever seen
--   tohex(bytes), unhex(hex) -> group names travel to and from the worker in hex: any
--     bytes, where JSON needs UTF-8
--   sort_into(group_prefix, ring, g, payload, stamp) -> puts `payload` at the back of group
--     `g`'s list (`<stamp>|<payload>`), and `g` in the ring if it had nothing waiting
-- A script need not use them all:
-- luacheck: ignore 211

local function wake_waiters(wake, n)
  local tokens = {}
  for i = 1, math.min(n, 100) do tokens[i] = '1' end
  redis.call('LPUSH', wake, unpack(tokens))
  redis.call('LTRIM', wake, 0, 99)
  redis.call('PEXPIRE', wake, 2000)
end

local function add_running(group_running, g, n)
  if redis.call('HINCRBY', group_running, g, n) <= 0 then redis.call('HDEL', group_running, g) end
end

local function release_permits(permits, wake, queue, worker_id, held, group_running, ring, hold)
  local had = tonumber(redis.call('HGET', permits, worker_id) or '0')
  redis.call('HDEL', permits, worker_id)
  if had > 0 and tonumber(hold) > 0 then
    local clock = redis.call('TIME')
    local ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
    redis.call('HSET', permits, worker_id .. '~' .. (ms + tonumber(hold)), had)
    had = 0  -- not free yet: nobody to wake
  end
  local groups = redis.call('HGETALL', held)
  for i = 1, #groups, 2 do
    add_running(group_running, groups[i], -tonumber(groups[i + 1]))
    had = had + tonumber(groups[i + 1])
  end
  redis.call('DEL', held)
  if had > 0 and (redis.call('LLEN', queue) > 0 or redis.call('LLEN', ring) > 0) then
    wake_waiters(wake, had)
  end
end

local function tohex(g)
  return (string.gsub(g, '.', function(c) return string.format('%02x', string.byte(c)) end))
end

local function unhex(h)
  return (string.gsub(h, '%x%x', function(cc) return string.char(tonumber(cc, 16)) end))
end

local function sort_into(group_prefix, ring, g, payload, stamp)
  if redis.call('LPUSH', group_prefix .. g, stamp .. '|' .. payload) == 1 then
    redis.call('RPUSH', ring, g)
  end
end
