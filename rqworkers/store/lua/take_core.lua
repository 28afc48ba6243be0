-- The take library: what TAKE and TAKE_FLOW share, put before the body of each (see
-- scripts.py): the reply being built, the owner check, the acks, adding to the batch,
-- the shared list's oldest, the move into the private list, and the reply's last fields.
-- It reads the KEYS and ARGV both scripts name alike (queue, processing, landing, retry,
-- registry, owner, nudge; limit, idbase, trim, segments, acks...).
--
-- Defines:
--   taken, fresh, attempts_of, tried, room: the reply, the new envelopes (or, for a
--     segment, payloads) and their attempts, whether any has attempts, and how many more
--     this call may take
--   owns_list(), remove_acks(), without_nudges(elements), due_members(first),
--   add_to_batch(attempts, payload),
--   take_shared(),
--   move(landed_message, due, oldest_last), hand_on(due), finish(first, took_due) -> the reply
-- luacheck: ignore 211

-- The reply, and the new envelopes with their attempts, built up by the functions below.
local taken = {0, '', '', '', '', ''}
local fresh, attempts_of, tried = {}, {}, false
local room = tonumber(limit)
-- Whether `fresh` is a segment (lua/envelope.lua), pushed by this call.
local in_segment = false

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

-- A trim of the `acks` oldest when the bottom is a segment's marked envelope: its members
-- are named by their ids, which the acks' envelopes carry, and their places by the mark, so
-- the oldest ack must be the marked member, and the newest the member or the envelope just
-- as far up. The segment's new oldest, if any is left, is marked.
local function trim_segment(acks, base, first, last)
  local left = last - first + 1
  local newest = ARGV[REST + 1] or ARGV[REST]
  local in_place = parse(ARGV[REST]) == base .. first
  if in_place and acks <= left then
    in_place = parse(newest) == base .. (first + acks - 1)
  elseif in_place then
    in_place = redis.call('LINDEX', processing, -acks) == newest
  end
  if not in_place then return -1 end
  redis.call('LTRIM', processing, 0, -acks - 1)
  taken[6] = acks < left and '1' or '0'
  if acks < left then
    local oldest = redis.call('LINDEX', processing, -1)
    redis.call('LSET', processing, -1, marked(base .. (first + acks), last, oldest))
  end
  return 0
end

-- Removes the acked deliveries; returns how many were not found, or -1. The worker sends
-- its acks as a trim only when they follow the private list's order; every envelope is
-- unique and the list holds only its owner's deliveries, in take order, so if the two ends
-- are in place, the n between them are the acks. If they are not, nothing is removed.
-- Acks one by one are envelopes: a segment gets its envelopes first.
local function remove_acks()
  local acks = tonumber(trim)
  if acks > 0 then
    local bottom = redis.call('LINDEX', processing, -1)
    local base, first, last = segment_of(bottom)
    if base then return trim_segment(acks, base, first, last) end
    taken[6] = '0'
    local in_place = bottom == ARGV[REST]
    if in_place and acks > 1 then
      in_place = redis.call('LINDEX', processing, -acks) == ARGV[REST + 1]
    end
    if not in_place then return -1 end
    redis.call('LTRIM', processing, 0, -acks - 1)
    return 0
  end
  if REST <= #ARGV then
    materialize(processing)
    taken[6] = '0'
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

-- The due members of the retry set, `count` of them at most (as many as there is room
-- for if not given): highest level first, in their bands (lua/levels.lua), then level 0's,
-- soonest first. `first` is the set's first member and its score, if it has one. A `now`
-- below 0 is level 0's turn (a worker's `level0_every`, see queue.py): level 0's members
-- due by -now only, the bands left waiting, so that a level-0 retry or delayed message is
-- served in it too.
local function due_members(first, count)
  count = count or room
  if count <= 0 or not first[2] then return {} end
  if string.sub(now, 1, 1) == '-' then  -- its digits as sent: Lua would keep 14 of them
    return redis.call('ZRANGEBYSCORE', retry, 0, string.sub(now, 2), 'LIMIT', 0, count)
  end
  if tonumber(first[2]) > tonumber(now) then return {} end
  return tonumber(first[2]) < 0 and due_by_level(retry, first[2], now, count)
    or redis.call('ZRANGEBYSCORE', retry, '-inf', now, 'LIMIT', 0, count)
end

-- Adds one message to what this call takes.
local function add_to_batch(attempts, payload)
  local n = #fresh + 1
  fresh[n] = wrap(idbase .. n, attempts, payload)
  attempts_of[n] = attempts
  taken[n + 6] = payload
  if attempts ~= 0 then tried = true end
  room = room - 1
end

-- The oldest messages of the shared list, as many as there is room for, taken, oldest last.
-- The bulk of every busy take: add_to_batch inlined, attempts 0. Into an empty private list,
-- when the worker acks in order (`segments`), they go as a segment (see lua/envelope.lua),
-- as they came; else each in its envelope, whose tail is one of the loader's constants
-- (`n .. ':0:'` formats a number per message).
local function take_shared()
  if room <= 0 then return {} end
  local oldest_last = redis.call('LRANGE', queue, -room, -1)
  local messages = without_nudges(oldest_last)
  local n = #fresh
  in_segment = n == 0 and #messages > 1 and segments == '1'
    and redis.call('LLEN', processing) == 0
  if in_segment then
    for i = #messages, 1, -1 do
      n = n + 1
      fresh[n], taken[n + 6] = messages[i], messages[i]
    end
    fresh[1] = marked(idbase .. 1, n, fresh[1])
    return oldest_last
  end
  local head = PREFIX .. idbase
  local tails = #messages > 8 and FRESH_TAILS() or {}  -- a table of 100 costs some 8 numbers
  for i = #messages, 1, -1 do
    n = n + 1
    fresh[n] = head .. (tails[n] or n .. ':0:') .. messages[i]
    taken[n + 6] = messages[i]
  end
  return oldest_last
end

-- Moves what was taken into the private list. Pushed before they leave where they were:
-- Redis out of memory refuses the push, and then nothing has moved.
local function move(landed_message, due, oldest_last)
  if in_segment then taken[6] = '1' end
  for i = 1, #fresh, 1000 do
    redis.call('LPUSH', processing, unpack(fresh, i, math.min(i + 999, #fresh)))
  end
  if landed_message then redis.call('RPOP', landing) end
  for i = 1, #due, 1000 do
    redis.call('ZREM', retry, unpack(due, i, math.min(i + 999, #due)))
  end
  if #oldest_last > 0 then redis.call('LTRIM', queue, 0, -#oldest_last - 1) end
end

-- After a take of `due` members of the retry set, what is left there may be due before any
-- idle worker wakes: each blocks until the due time it last learned, and a push due later
-- than the set's first nudged nobody. This worker is busy now, so it hands the watch on: a
-- nudge (onto an empty shared list only, see push_nudge) wakes one blocked worker, which
-- takes what is due or learns when the next is. Only with the queue's nudge token set (a
-- delayed, prioritised or reclaimed message set it) and another worker registered (a nudge
-- nobody takes counts as a waiting message until a take drops it), and not for messages
-- that waited at a priority level (ids `q...`): their push woke a worker for each
-- (wake_for, lua/levels.lua).
local function hand_on(due)
  local waiting_head = PREFIX .. 'q'
  for _, member in ipairs(due) do
    if string.sub(member, 1, #waiting_head) ~= waiting_head then
      local token = redis.call('GET', nudge)
      if token and redis.call('EXISTS', retry) == 1 and redis.call('SCARD', registry) > 1 then
        push_nudge(queue, nudge, token)
      end
      return
    end
  end
end

-- The reply's attempts and when the next retry is due: if this call did not fill up, read
-- anew; else the retry set's first before the call if it took none of the set (still the
-- first), or `now` if it did (more may be due: the worker's fast path, see queue.py, then
-- leaves the next take to this script).
local function finish(first, took_due)
  if tried then
    for i = #attempts_of + 1, #fresh do attempts_of[i] = 0 end
    taken[3] = table.concat(attempts_of, ',')
  end
  if room > 0 and first[2] then
    taken[2] = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')[2] or ''
  elseif first[2] then
    taken[2] = took_due and now or first[2]
  end
  return taken
end
