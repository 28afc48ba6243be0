#!lua flags=allow-oom
-- REPLAY: what an earlier life of this worker left in flight, oldest first, after charging
-- one attempt to each delivery whose handler had started.
--
-- KEYS: processing, landing, owner, queue, permits, wake, held, group_running, ring, nudge,
--   fast_owners
-- ARGV: charge, unstarted, idbase, mine, worker_id, hold, fast, spared
--   charge     '1': charge every delivery older than the one whose id is `unstarted`
--              (deliveries sit in the list in the order they start), or every one if none
--              has that id; '0' (this process's own list, after a Redis error): none
--   unstarted  the id of the oldest delivery that had not started ('' when every one had,
--              or nobody knows)
--   idbase     an id base of this process, for the envelopes this call writes
--   mine       the id prefix of this process: what it wrote itself is never charged
--   worker_id  the worker: the `max_running` permits an earlier life held are given back
--   hold       ms those permits stay counted (see lua/flow.lua): > 0 when this worker's
--              manager did not see the earlier life end (a new manager: it may be an orphan)
--   fast       '1': this process takes by the fast path: it is added to `fast_owners`,
--              where its successor, or a reclaim, finds its fast lists (see TAKE_OVER)
--   spared     id prefixes (`<process>.`, joined by ',') whose envelopes, like `mine`'s, are
--              never charged: earlier lives of this worker that died in their own replay,
--              after it had charged and renamed what had started, and before their
--              scoreboard said so (see `Scoreboard.replay_interrupted`); '' none
-- Returns {envelope1, ...}, the private list oldest first (decoded by scripts.REPLAY).
--
-- A charged envelope gets a new id of this process, so a replay sent again after a lost
-- reply charges nothing twice. Messages a blocking fetch left in the landing list never
-- reached a handler; they join the private list uncharged, except a nudge (see
-- lua/envelope.lua), which a worker that stopped while blocked left there: dropped. An
-- element that is not an envelope (written by hand, or by another program) is wrapped; a
-- segment (see lua/envelope.lua) gets its envelopes first. The replaying process becomes the
-- list's `owner`.

redis.call('SET', owner, mine)  -- from now on only this process takes into the list
materialize(processing)  -- a segment's members are read as envelopes, like any
if fast == '1' then redis.call('SADD', fast_owners, string.sub(mine, 1, -2)) end
-- A new process gives back the permits of the one before (its next take asks for what it
-- runs); this process's own replay, after a Redis error, keeps those its handlers hold.
if charge == '1' then
  release_permits(permits, wake, queue, worker_id, held, group_running, ring, hold)
end
local started = charge == '1'
local uncharged = charged_already(spared, mine)  -- and what it wrote itself
local elements = redis.call('LRANGE', processing, 0, -1)
local result = {}
for i = #elements, 1, -1 do
  local element = elements[i]
  local id, attempts, payload = parse(element)
  local changed = false
  if id == unstarted then started = false end
  if not id then
    id, changed = idbase .. 'W' .. i, true
  end
  if started and not uncharged(id) then
    attempts, changed, id = attempts + 1, true, idbase .. 'C' .. i
  end
  if changed then
    element = wrap(id, attempts, payload)
    redis.call('LSET', processing, i - 1, element)
  end
  result[#result + 1] = element
end
local n, token = 0, nudge_token(nudge)
while true do
  local landed = redis.call('LINDEX', landing, -1)
  if not landed then break end
  if landed ~= token then
    n = n + 1
    local element = wrap(idbase .. 'L' .. n, 0, landed)
    redis.call('LPUSH', processing, element)
    result[#result + 1] = element
  end
  redis.call('RPOP', landing)
end
return result
