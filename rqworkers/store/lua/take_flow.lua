#!lua flags=allow-oom
-- TAKE_FLOW: TAKE for a queue with flow control (`max_running`, `rate_limit`, groups) or
-- paused: acks handled deliveries, then moves into the private list up to `limit`
-- messages, as many as the pause and the limits allow, in one round trip.
--
-- KEYS: queue, processing, landing, retry, lease, registry, owner, nudge, paused, permits,
--   starts, wake, ring, group_running, held
-- ARGV: limit, now, idbase, landed, worker_id, trim, segments, max_running, running, rate,
--   window, group_by, sorter, group_max, group_rate, group_window, group_prefix,
--   starts_prefix, mine, acks...
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
--   segments   '1': fresh messages may go in as a segment, as in TAKE
--   max_running  at most this many deliveries of the queue in a handler at once, across
--              every worker (the `permits` hash); 0: no such limit
--   running    this worker's deliveries that hold a permit beside what this call takes
--              (in a handler, or taken and about to start): its entry is set to that plus
--              what it takes, so a call sent twice counts nothing twice
--   rate       at most this many handler starts in any `window` ms (the `starts` log, by
--              Redis's clock); 0: no such limit
--   group_by   a dotted path into JSON payloads naming each message's group
--   sorter     who sorts messages into groups: 'redis' (this script, by `group_by`),
--              'worker' (its handler's `group()`, through SORT, before each take), or ''
--              when the queue has no groups. With groups, messages wait in one list per
--              group (`group_prefix` .. group, each element `<ms>|payload`, ms when sorted
--              in), and are taken round-robin between the groups of the `ring`
--   group_max, group_rate, group_window  the same limits as above, for each group (0: none)
--   starts_prefix  the rate log of a group is `starts_prefix` .. group
--   mine       JSON {hex of a group: n}: this worker's group permits beside what this call
--              takes, set like `running` (they are the `held` hash)
--   acks...    envelopes, as `trim` says
-- Nothing is taken while the queue is `paused`, and no more than the limits allow; what a
-- blocking fetch landed then goes back to the queue's tail, its place kept. A nudge (see
-- lua/envelope.lua) is no message: dropped wherever this script meets one.
-- Returns {-2} to a process that no longer owns the list, taking and acking nothing; else
-- {missing, next_due, attempts, held, groups, segment, payload1, payload2, ...} (decoded by
-- scripts.TakeReply):
--   missing    acks that found nothing, or -1: the acks sent as a trim were not where
--              claimed, and nothing was removed (the worker sends them one by one)
--   next_due   due time of the next retry, `now` if this call filled up with due ones
--              (more may be due); '' if none
--   attempts   the attempts of each new delivery joined by ','; '' when all are 0
--   held       why it took less than `limit`, if a limit did it: 'paused', 'full' (no
--              permit free) or 'rate:<ms>' (the next start is allowed in that many ms);
--              '' otherwise
--   groups     with groups, the group of each new delivery in hex, as a JSON list; else ''
--   segment    as in TAKE
--   payloads   of the new deliveries: the worker knows the ids it gave, so the envelopes
--              need not travel back
--
-- What it takes, in this order: the message a blocking fetch left in the landing list, then
-- due retries and returned messages (oldest first; with priorities, highest level first:
-- see lua/levels.lua), then the oldest of the shared list.

local now_ms  -- Redis's clock in ms, once a rate limit has read it

-- Groups (`group_by`) ---------------------------------------------------------------------
local grouped, sorts_here = sorter ~= '', sorter == 'redis'
local SORT_BATCH = 1000  -- messages sorted into their groups per call, at most
local GROUP_NAME_MAX = 200  -- bytes of a group's name kept: it is part of key names
local group_of_taken, mine_now = {}, {}
local soonest  -- ms until the first group held back by its rate may start again
local RETRY_SCAN = 1000  -- due retries a grouped take looks through, at most
local due_held = false  -- a due retry was left: its group's limits hold it back (take_due)

-- A number as its JSON spells it, every digit kept: `tostring` keeps 14, which made
-- tenants 123456789012341 and 123456789012342 one group. An integer (exact below 2^53) in
-- full, else the fewest digits that read back as the same number.
local function number_name(n)
  if n == math.floor(n) and math.abs(n) < 2^53 then return string.format('%.0f', n) end
  for digits = 14, 16 do
    local text = string.format('%.' .. digits .. 'g', n)
    if tonumber(text) == n then return text end
  end
  return string.format('%.17g', n)
end

-- The group of a payload: the string or number at `group_by` in its JSON; '' (the default
-- group) when it is not JSON or has nothing there.
local function group_of(payload)
  local ok, value = pcall(cjson.decode, bare(payload))
  if not ok then return '' end
  for part in string.gmatch(group_by, '[^.]+') do
    if type(value) ~= 'table' then return '' end
    value = value[part]
  end
  if type(value) == 'number' then value = number_name(value) end
  if type(value) ~= 'string' then return '' end
  return string.sub(value, 1, GROUP_NAME_MAX)
end

local function clock_ms()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end

-- The group of a retry: by `group_by`, or the `G<hex>.` its id got from SORT; nil (not
-- taken now) for one the worker has not sorted yet.
local function retry_group(id, payload)
  if sorts_here then return group_of(payload) end
  local hex = id and string.match(id, '^G(%x*)%.')
  return hex and unhex(hex)
end

-- Puts `payload` in its group's turn.
local function sort_one(payload, stamp)
  sort_into(group_prefix, ring, group_of(payload), payload, stamp)
end

-- Sorts up to SORT_BATCH of the oldest messages of the shared list into their groups.
local function sort_in()
  local batch = redis.call('LRANGE', queue, -SORT_BATCH, -1)
  if #batch == 0 then return end
  local stamp, messages = clock_ms(), without_nudges(batch)
  for i = #messages, 1, -1 do sort_one(messages[i], stamp) end
  redis.call('LTRIM', queue, 0, -#batch - 1)
end

-- This worker's group permits become what it says it holds (`mine`): set, not added to.
local function reconcile_groups()
  local before = redis.call('HGETALL', held)
  local released = false
  for i = 1, #before, 2 do
    add_running(group_running, before[i], -tonumber(before[i + 1]))
  end
  redis.call('DEL', held)
  for h, n in pairs(cjson.decode(mine)) do
    local g = unhex(h)
    if n > 0 then
      mine_now[g] = n
      add_running(group_running, g, n)
    end
  end
  for i = 1, #before, 2 do
    if (mine_now[before[i]] or 0) < tonumber(before[i + 1]) then released = true end
  end
  return released
end

-- How many of group `g` may start now (math.huge when it has no limit).
local function group_room(g)
  local free = math.huge
  if tonumber(group_max) > 0 then
    free = tonumber(group_max) - tonumber(redis.call('HGET', group_running, g) or '0')
  end
  if free > 0 and tonumber(group_rate) > 0 then
    local log, ms = starts_prefix .. g, now_ms or clock_ms()
    now_ms = ms
    redis.call('ZREMRANGEBYSCORE', log, '-inf', ms - tonumber(group_window))
    local left = tonumber(group_rate) - redis.call('ZCARD', log)
    if left <= 0 then
      local oldest = tonumber(redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')[2])
      local wait = math.max(1, oldest + tonumber(group_window) - ms)
      soonest = math.min(soonest or wait, wait)
    end
    free = math.min(free, left)
  end
  return free
end

-- Counts one start of group `g` against its limits.
local function count_group_start(g)
  group_of_taken[#fresh] = tohex(g)
  mine_now[g] = (mine_now[g] or 0) + 1
  -- Counted with or without a limit: the next take's reconcile takes it off again.
  add_running(group_running, g, 1)
  if tonumber(group_rate) > 0 then
    local log = starts_prefix .. g
    redis.call('ZADD', log, now_ms, idbase .. #fresh)
    redis.call('PEXPIRE', log, tonumber(group_window))
  end
end

-- Takes round-robin between the groups with messages waiting: one of each group whose
-- limits allow it, in turn, until `room` is used up or no group can give one.
local function take_grouped()
  local took = true
  while room > 0 and took do
    took = false
    for _ = 1, redis.call('LLEN', ring) do
      if room <= 0 then break end
      local g = redis.call('RPOPLPUSH', ring, ring)  -- the next in turn goes to the back
      if not g then break end
      local list = group_prefix .. g
      if group_room(g) > 0 then
        local element = redis.call('RPOP', list)
        if element then
          -- No stamp (pushed there by another: a queue may be named like a group's list):
          -- the payload whole, rather than fail every take of the queue.
          local bar = string.match(element, '^%d+|()') or 1
          add_to_batch(0, string.sub(element, bar))
          count_group_start(g)
          took = true
        end
      end
      if redis.call('LLEN', list) == 0 then redis.call('LREM', ring, 1, g) end
    end
  end
  if room > 0 and (due_held or redis.call('LLEN', ring) > 0) and taken[4] == '' then  -- held
    taken[4] = soonest and ('rate:' .. soonest) or 'full'
  end
end

-- Records this worker's group permits in `held`; a permit given back wakes a waiter.
local function record_groups(released)
  for g, n in pairs(mine_now) do redis.call('HSET', held, g, n) end
  -- (A due retry of the group may wait too: not in the ring, but in the retry set.)
  if released and (redis.call('LLEN', ring) > 0 or redis.call('EXISTS', retry) == 1) then
    wake_waiters(wake, 1)
  end
end

-- The message a blocking fetch left in the landing list, taken; false if none. When the
-- pause or a limit leaves no room for it, it goes back to the queue's tail, to be next.
local function take_landed()
  local message = landed == '1' and redis.call('LINDEX', landing, -1)
  if message and not without_nudges({message})[1] then  -- no message: dropped
    redis.call('RPOP', landing)
    return false
  end
  if message and grouped then  -- in its group's turn, like any other
    sort_one(message, clock_ms())
    redis.call('RPOP', landing)
    return false
  end
  if message and room <= 0 then
    redis.call('RPUSH', queue, message)
    redis.call('RPOP', landing)
    return false
  end
  if message then add_to_batch(0, message) end
  return message
end

-- The due members of the retry set, as many as there is room for, taken. `first` is the
-- set's first member and its score, if it has one. With groups, when its group's limits
-- hold one back, it looks further (up to RETRY_SCAN in all): a full group's retries must
-- not hold another group's back. Those it leaves set `due_held`: the worker is to wait for
-- a permit (or the group's rate), not be told that a retry is due and take again at once.
local function take_due(first)
  local chosen, looked, asked = {}, 0, room
  local due = due_members(first, asked)
  while true do
    for i = looked + 1, #due do
      if room <= 0 then break end
      local member = due[i]
      local id, attempts, payload = parse(member)
      if not id then attempts, payload = 0, member end  -- not ours: taken whole, fresh
      local g = grouped and retry_group(id, payload)
      -- Not grouped: taken. Grouped: in its group's turn (a retry keeps to its group's
      -- limits too), or left for the worker's next SORT when it has no group yet.
      if g == false or (g and group_room(g) > 0) then
        add_to_batch(attempts, payload)
        if g then count_group_start(g) end
        chosen[#chosen + 1] = member
      elseif g then
        due_held = true
      end
    end
    -- Looked at all there was, or as far as it may: done. Else once more, further (what
    -- it chose is still in the set, in its place: skipped as looked at).
    if room <= 0 or not due_held or #due < asked or asked >= RETRY_SCAN then break end
    looked, asked = #due, RETRY_SCAN
    due = due_members(first, asked)
  end
  return chosen
end

-- Flow control: lowers `room` to what the pause and the limits allow now, and says why in
-- the reply when they allow less than asked. Returns this worker's permits before the call.
local function limit_room()
  local had = 0
  if redis.call('EXISTS', paused) == 1 then
    room, taken[4] = 0, 'paused'
  end
  local most = tonumber(max_running)
  if most > 0 then
    had = tonumber(redis.call('HGET', permits, worker_id) or '0')
    local in_use, entries = 0, redis.call('HGETALL', permits)
    for i = 1, #entries, 2 do
      local until_ms = string.match(entries[i], '~(%d+)$')
      if until_ms and tonumber(until_ms) <= clock_ms() then
        redis.call('HDEL', permits, entries[i])  -- a replaced holder's, held long enough
      else
        in_use = in_use + tonumber(entries[i + 1])
      end
    end
    local free = most - (in_use - had) - tonumber(running)
    if free < room then room = math.max(free, 0); taken[4] = 'full' end
  end
  local starts_allowed = tonumber(rate)
  if starts_allowed > 0 and room > 0 then
    local ms = clock_ms()
    redis.call('ZREMRANGEBYSCORE', starts, '-inf', ms - tonumber(window))
    local free = starts_allowed - redis.call('ZCARD', starts)
    if free < room then
      room = math.max(free, 0)
      local oldest = redis.call('ZRANGE', starts, 0, 0, 'WITHSCORES')[2]
      taken[4] = 'rate:' .. math.max(1, tonumber(oldest) + tonumber(window) - ms)
    end
    now_ms = ms
  end
  return had
end

-- Records what was taken against the limits: this worker's permits, and a start in the
-- rate window for each delivery. Permits it gave back wake a waiting worker each.
local function count_taken(had)
  if tonumber(max_running) > 0 or had > 0 then
    local holds = tonumber(running) + #fresh
    if holds > 0 then
      redis.call('HSET', permits, worker_id, holds)
    else
      redis.call('HDEL', permits, worker_id)
    end
    local waiting = redis.call('LLEN', queue) > 0 or (grouped and redis.call('LLEN', ring) > 0)
    if holds < had and waiting then wake_waiters(wake, had - holds) end
  end
  if tonumber(rate) > 0 and #fresh > 0 then
    local log = {}
    for i = 1, #fresh do
      log[2 * i - 1], log[2 * i] = now_ms, idbase .. i
    end
    redis.call('ZADD', starts, unpack(log))
    redis.call('PEXPIRE', starts, tonumber(window))
  end
end

if not owns_list() then return {-2} end
taken[1] = remove_acks()
local had = limit_room()
local released = grouped and reconcile_groups()
if sorts_here then sort_in() end
if room <= 0 and landed ~= '1' then
  count_taken(had)
  if grouped then record_groups(released) end
  return taken
end
-- A worker whose lease lapsed (its node froze) was struck from the registry by a reclaim:
-- what it takes now must stay findable should its node die before the keeper renews.
if redis.call('EXISTS', lease) == 0 then redis.call('SADD', registry, worker_id) end
local landed_message = take_landed()
local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
local due = take_due(first)
if grouped then
  take_grouped()
  move(landed_message, due, {})
  record_groups(released)
  taken[5] = #fresh > 0 and cjson.encode(group_of_taken) or '[]'
else
  move(landed_message, due, take_shared())
end
count_taken(had)
hand_on(due)
return finish(first, #due > 0)
