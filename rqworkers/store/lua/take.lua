#!lua flags=allow-oom
-- TAKE: acks handled deliveries, then moves up to `limit` messages into the private list,
-- in one round trip.
--
-- KEYS: queue, processing, landing, retry, lease, registry, owner, nudge
-- ARGV: limit, now, idbase, landed, worker_id, trim, acks...
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
--   acks...    envelopes, as `trim` says
-- Returns {-2} to a process that no longer owns the list, taking and acking nothing; else
-- {missing, next_due, attempts, payload1, payload2, ...} (decoded by scripts.TakeReply):
--   missing    acks that found nothing, or -1: the acks sent as a trim were not where
--              claimed, and nothing was removed (the worker sends them one by one)
--   next_due   due time of the next retry; '' if none, or if this call took all it could
--   attempts   the attempts of each new delivery joined by ','; '' when all are 0
--   payloads   of the new deliveries: the worker knows the ids it gave, so the envelopes
--              need not travel back
--
-- A nudge (see lua/envelope.lua) is no message: dropped from the landing or shared list
-- wherever this script meets one; a worker woken by it takes nothing and learns next_due.
--
-- What it takes, in this order: the message a blocking fetch left in the landing list, then
-- due retries and returned messages (oldest first), then the oldest of the shared list.

-- The reply, and the new envelopes with their attempts, built up by the functions below.
local taken = {0, '', ''}
local fresh, attempts_of, tried = {}, {}, false
local room = tonumber(limit)

-- Only the process that last replayed the list (or, if none did, took first) takes into it
-- and trims it (see `owner` in queue.py): the list holds one process's deliveries, in order.
local function owns_list()
  local me, owned_by = string.match(idbase, '^[^.]*%.'), redis.call('GET', owner)
  if not owned_by then
    redis.call('SET', owner, me)
  elseif owned_by ~= me then
    return false
  end
  return true
end

-- Removes the acked deliveries; returns how many were not found, or -1. The worker sends
-- its acks as a trim only when they follow the private list's order; every envelope is
-- unique and the list holds only its owner's deliveries, in take order, so if the two ends
-- are in place, the n between them are the acks. If they are not, nothing is removed.
local function remove_acks()
  local acks = tonumber(trim)
  if acks > 0 then
    local in_place = redis.call('LINDEX', processing, -1) == ARGV[REST]
    if in_place and acks > 1 then
      in_place = redis.call('LINDEX', processing, -acks) == ARGV[REST + 1]
    end
    if not in_place then return -1 end
    redis.call('LTRIM', processing, 0, -acks - 1)
    return 0
  end
  local missing = 0
  for i = REST, #ARGV do
    if redis.call('LREM', processing, -1, ARGV[i]) == 0 then missing = missing + 1 end
  end
  return missing
end

-- `elements` without the queue's nudges. A nudge is only ever pushed onto an empty shared
-- list, but a give-back or requeue may RPUSH behind it, so any element may be one.
local function without_nudges(elements)
  if #elements == 0 then return elements end  -- an idle worker's take reads nothing more
  local token = nudge_token(nudge)
  local found = false
  for _, element in ipairs(token and elements or {}) do
    if element == token then found = true end
  end
  if not found then return elements end  -- nearly always: nothing copied
  local kept = {}
  for _, element in ipairs(elements) do
    if element ~= token then kept[#kept + 1] = element end
  end
  return kept
end

-- Adds one message to what this call takes.
local function add_to_batch(attempts, payload)
  local n = #fresh + 1
  fresh[n] = wrap(idbase .. n, attempts, payload)
  attempts_of[n] = attempts
  taken[n + 3] = payload
  if attempts ~= 0 then tried = true end
  room = room - 1
end

-- The message a blocking fetch left in the landing list, taken; false if none.
local function take_landed()
  local message = landed == '1' and redis.call('LINDEX', landing, -1)
  if message and without_nudges({message})[1] then add_to_batch(0, message) end
  return message
end

-- The due members of the retry set, as many as there is room for, taken. `first` is the
-- set's first member and its score, if it has one.
local function take_due(first)
  if room <= 0 or not first[2] or tonumber(first[2]) > tonumber(now) then return {} end
  local due = redis.call('ZRANGEBYSCORE', retry, '-inf', now, 'LIMIT', 0, room)
  for _, member in ipairs(due) do
    local id, attempts, payload = parse(member)
    if not id then  -- the format before envelopes: 8 random bytes, then the payload
      attempts, payload = 1, string.sub(member, 9)
    end
    add_to_batch(attempts, payload)
  end
  return due
end

-- The oldest messages of the shared list, as many as there is room for, taken, oldest last.
-- The bulk of every busy take: add_to_batch inlined, attempts 0.
local function take_shared()
  if room <= 0 then return {} end
  local oldest_last = redis.call('LRANGE', queue, -room, -1)
  local messages = without_nudges(oldest_last)
  local n, head = #fresh, PREFIX .. idbase
  for i = #messages, 1, -1 do
    n = n + 1
    fresh[n] = head .. n .. ':0:' .. messages[i]
    taken[n + 3] = messages[i]
  end
  return oldest_last
end

-- Moves what was taken into the private list. Pushed before they leave where they were:
-- Redis out of memory refuses the push, and then nothing has moved.
local function move(landed_message, due, oldest_last)
  for i = 1, #fresh, 1000 do
    redis.call('LPUSH', processing, unpack(fresh, i, math.min(i + 999, #fresh)))
  end
  if landed_message then redis.call('RPOP', landing) end
  for i = 1, #due, 1000 do
    redis.call('ZREM', retry, unpack(due, i, math.min(i + 999, #due)))
  end
  if #oldest_last > 0 then redis.call('LTRIM', queue, 0, -#oldest_last - 1) end
end

if not owns_list() then return {-2} end
taken[1] = remove_acks()
if room <= 0 then return taken end
-- A worker whose lease lapsed (its node froze) was struck from the registry by a reclaim:
-- what it takes now must stay findable should its node die before the keeper renews.
if redis.call('EXISTS', lease) == 0 then redis.call('SADD', registry, worker_id) end
local landed_message = take_landed()
local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
local due = take_due(first)
move(landed_message, due, take_shared())
if tried then
  for i = #attempts_of + 1, #fresh do attempts_of[i] = 0 end
  taken[3] = table.concat(attempts_of, ',')
end
if room > 0 and first[2] then
  taken[2] = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')[2] or ''
end
return taken
