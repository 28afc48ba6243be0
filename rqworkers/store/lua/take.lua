#!lua flags=allow-oom
-- TAKE: acks handled deliveries, then moves up to `limit` messages into the private list,
-- in one round trip.
--
-- KEYS: queue, processing, landing, retry, lease, registry, owner, nudge, paused
-- ARGV: limit, now, idbase, landed, worker_id, trim, segments, look, acks...
--   limit      how many messages to take at most (0: only ack)
--   now        the time, epoch seconds: retries due by then may be taken
--   idbase     `<process>.<call>.`: the n-th new delivery gets the id idbase .. n, n
--              counting from 1
--   landed     '1' when a blocking fetch has left a message in the landing list, else '0':
--              the landing list is only looked at then, for an idle worker's take must
--              cost Redis little
--   worker_id  registered again if the worker's lease has lapsed
--   trim       0: `acks` are the envelopes to remove, one LREM each. n > 0: the n acks are
--              the oldest of the private list, and `acks` holds the oldest and the newest
--              of them (see remove_acks)
--   segments   '1': the worker acks in take order, so fresh messages taken from the shared
--              list into an empty private list, more than one allowed, go in as a segment
--              (see lua/envelope.lua), without envelopes
--   acks...    envelopes, as `trim` says
-- Returns {-2} to a process that no longer owns the list, taking and acking nothing; else
-- {missing, next_due, attempts, held, groups, segment, payload1, payload2, ...} (decoded by
-- scripts.TakeReply), `held` and `groups` always '' here (see take_flow.lua):
--   missing    acks that found nothing, or -1: the acks sent as a trim were not where
--              claimed, and nothing was removed (the worker sends them one by one)
--   next_due   due time of the next retry, `now` if this call filled up with due ones
--              (more may be due); '' if none
--   attempts   the attempts of each new delivery joined by ','; '' when all are 0
--   segment    '1' if the private list's bottom is a segment after this call, '0' if not,
--              '' if this call did not look (it acked nothing and pushed no segment)
--   payloads   of the new deliveries: the worker knows the ids it gave, so the envelopes
--              need not travel back
--
--   look       '1': look whether the queue is `paused` (the worker asks at most once a
--              second, and whenever a blocking fetch landed a message): if it is, take
--              nothing, put a landed message back at the queue's tail, and say 'paused'
--
-- A queue with flow control, or paused, is taken with TAKE_FLOW instead, which looks at
-- every call.
--
-- A nudge (see lua/envelope.lua) is no message: dropped from the landing or shared list
-- wherever this script meets one; a worker woken by it takes nothing and learns next_due.
--
-- What it takes, in this order: the message a blocking fetch left in the landing list, then
-- due retries and returned messages (oldest first; with priorities, highest level first:
-- see lua/levels.lua), then the oldest of the shared list.

-- The message a blocking fetch left in the landing list, taken; false if none.
local function take_landed()
  local message = landed == '1' and redis.call('LINDEX', landing, -1)
  if message and without_nudges({message})[1] then add_to_batch(0, message) end
  return message
end

-- The due members of the retry set, as many as there is room for, taken. `first` is the
-- set's first member and its score, if it has one.
local function take_due(first)
  local due = due_members(first)
  for _, member in ipairs(due) do
    local id, attempts, payload = parse(member)
    if not id then attempts, payload = 0, member end  -- not ours: taken whole, fresh
    add_to_batch(attempts, payload)
  end
  return due
end

if not owns_list() then return {-2} end
taken[1] = remove_acks()
-- The lease and, when looking, the pause in one call: EXISTS counts `paused` twice, so the
-- answer is 1 for the lease plus 2 for a pause (an idle worker's take costs no more).
local seen = look == '1' and redis.call('EXISTS', lease, paused, paused)
if seen and seen >= 2 then
  local message = landed == '1' and redis.call('RPOP', landing)
  if message then redis.call('RPUSH', queue, message) end
  taken[4] = 'paused'
  return taken
end
if room <= 0 then return taken end
-- A worker whose lease lapsed (its node froze) was struck from the registry by a reclaim:
-- what it takes now must stay findable should its node die before the keeper renews.
if (seen or redis.call('EXISTS', lease)) == 0 then redis.call('SADD', registry, worker_id) end
local landed_message = take_landed()
local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
local due = take_due(first)
move(landed_message, due, take_shared())
hand_on(due)
return finish(first, #due > 0)
