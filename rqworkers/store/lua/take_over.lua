#!lua flags=allow-oom
-- TAKE_OVER: moves what one process's two fast lists hold (see store/fast.py: payloads,
-- not envelopes) into the private list, for a replay, or into the retry set, due at once,
-- for a reclaim; then seals them (a string in their place) if the process may still run,
-- so that it can move nothing more into them (else deletes them), and strikes the process
-- from `fast_owners`. A nudge there (a fast take moves it, then sends it back: the process
-- died, or its reply was lost, in between) is dropped, as REPLAY drops one landed.
--
-- KEYS: processing, retry, lease, queue, nudge, fast_0, fast_1, fast_owners
-- ARGV: process, to, charge, unstarted, idbase, token, seal
--   process    the process's id prefix, whose fast lists `fast_0` and `fast_1` are
--   to         'private' (a replay) or 'retry' (a reclaim: only while `lease` is gone)
--   charge     '1': charge each one attempt (its handler had started); '0': none (the
--              caller's own lists after a Redis error)
--   unstarted  '0' or '1': the side (`fast_0`, `fast_1`) of the take the scoreboard names
--              as the oldest not started (a fast take goes to the side of its number's
--              parity, never the side holding the delivery in hand): not charged. '' none
--   idbase     an id base of the caller, for the envelopes this call writes
--   token      a fresh nudge token (see lua/envelope.lua), for a reclaim's due messages
--   seal       '1': seal the lists; '0' (the caller's own, or a process whose end its
--              manager saw): delete them
-- Returns {n, envelope1, ...}: how many moved, and for a replay their envelopes, oldest
-- first; {-1} if a reclaim found the lease alive (decoded by scripts.TAKE_OVER).

if to == 'retry' and redis.call('EXISTS', lease) == 1 then return {-1} end
local result = {0}
local dropped = nudge_token(nudge)
for side, fast in ipairs({fast_0, fast_1}) do
  local attempts = (charge == '1' and unstarted ~= tostring(side - 1)) and 1 or 0
  if redis.call('TYPE', fast).ok == 'list' then
    local payloads = redis.call('LRANGE', fast, 0, -1)
    for i = #payloads, 1, -1 do
      if payloads[i] ~= dropped then
        local element = wrap(idbase .. 'F' .. side .. '.' .. i, attempts, payloads[i])
        if to == 'retry' then
          redis.call('ZADD', retry, 0, element)
        else
          redis.call('LPUSH', processing, element)
          result[#result + 1] = element
        end
        result[1] = result[1] + 1
      end
    end
  end
  if seal == '1' then
    redis.call('SET', fast, 'superseded', 'EX', 86400)
  elseif redis.call('TYPE', fast).ok == 'list' then
    redis.call('DEL', fast)
  end
end
if to == 'retry' and result[1] > 0 then push_nudge(queue, nudge, token) end
redis.call('SREM', fast_owners, process)
return result
