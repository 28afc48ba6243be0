#!lua flags=allow-oom
-- RECLAIM: hands an orphaned worker's messages back, if its lease is still gone: its
-- deliveries to the retry set, due at once and oldest first (in their priority level's band,
-- see lua/levels.lua), each charged one attempt if
-- its handler had started; the messages its blocking fetch had landed, never delivered, to
-- the head of the shared list. Its `max_running` permits are given back. A nudge wakes a
-- blocked worker for the deliveries, which are due at once: without it they would wait for
-- the next idle worker's block to end.
--
-- KEYS: processing, landing, queue, retry, lease, registry, owner, permits, wake, held,
--   group_running, ring, nudge
-- ARGV: worker_id, unstarted, token, hold, spared
--   worker_id  the orphaned worker, struck from the registry once its messages are back
--   unstarted  the id of its oldest delivery that had not started: every one older is
--              charged (as in REPLAY), so every one for '' (a lost node: nobody knows
--              which ran). A slot of the reclaimer's own node has it from its scoreboard.
--   token      a fresh random token, kept as the queue's nudge token if it has none
--   hold       ms its `max_running` permits stay counted: its process may still run,
--              orphaned or frozen, until it sees its list taken over (see lua/flow.lua)
--   spared     id prefixes never charged, as in REPLAY: charged already by a replay of
--              the slot's that was killed before it said so ('' none; only a slot of the
--              reclaimer's own node can have any)
-- Returns how many moved, or -1 if the lease is alive (decoded by scripts.RECLAIM).

if redis.call('EXISTS', lease) == 1 then return -1 end
local tag = 'x' .. string.gsub(worker_id, '[^%w]', '-') .. '.'
local moved = 0
while true do
  local landed = redis.call('LINDEX', landing, -1)
  if not landed then break end
  redis.call('RPUSH', queue, landed)
  redis.call('RPOP', landing)
  moved = moved + 1
end
local landed_moved, started = moved, true
materialize(processing)  -- a segment's members, as envelopes (lua/envelope.lua)
local uncharged = charged_already(spared)
while true do
  local element = redis.call('LINDEX', processing, -1)
  if not element then break end
  local id, attempts, payload = parse(element)
  moved = moved + 1
  if id == unstarted then started = false end
  if started and not (id and uncharged(id)) then attempts = attempts + 1 end
  local member = wrap(tag .. moved, attempts, payload)
  redis.call('ZADD', retry, level_score(level_of(payload), moved), member)
  redis.call('RPOP', processing)
end
if moved > landed_moved then push_nudge(queue, nudge, token) end
redis.call('SREM', registry, worker_id)
release_permits(permits, wake, queue, worker_id, held, group_running, ring, hold)
redis.call('DEL', owner)  -- whoever takes into the list next owns it
return moved
