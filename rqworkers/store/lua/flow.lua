-- The flow library, put before the body of every script that calls it (see scripts.py).
-- Workers that find no permit free, or their queue paused, block on the queue's `wake`
-- list (`BLPOP`, at most a few seconds) rather than poll; whoever frees permits, or
-- resumes the queue, pushes a token for each worker that may now start something.
--
-- Defines:
--   wake_waiters(wake, n) -> pushes n tokens (at most 100) onto the list `wake`, which
--     expires 2 s after the last push: a token nobody took soon is stale
--   release_permits(permits, wake, queue, worker_id, held, group_running, ring) -> drops
--     the worker's entry from `permits` and its group permits (`held`, counted in
--     `group_running`): it died, or was replaced. Waiters are woken if work waits.
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

local function release_permits(permits, wake, queue, worker_id, held, group_running, ring)
  local had = tonumber(redis.call('HGET', permits, worker_id) or '0')
  redis.call('HDEL', permits, worker_id)
  local groups = redis.call('HGETALL', held)
  for i = 1, #groups, 2 do
    redis.call('HINCRBY', group_running, groups[i], -tonumber(groups[i + 1]))
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
