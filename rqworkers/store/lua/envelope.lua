-- The envelope library, put before the body of every script that calls it (see scripts.py).
-- Elements of a private list and members of the retry set are envelopes,
-- `<PREFIX><id>:<attempts>:<payload>`: parsed and built here, and nowhere else in Lua.
--
-- Uses PREFIX, bound by the loader from scripts.PREFIX, which the Python side reads too.
-- The other element rqworkers writes where messages go, the nudge, is here too: a token,
-- stored once in the queue's `nudge` key, pushed onto the empty shared list to wake a
-- worker blocked there (a BLMOVE wakes only for an element) when a message comes due
-- sooner than the worker was told; a take drops it wherever it meets it.
--
-- Defines:
--   parse(element) -> id, attempts, payload; nil, 0, element for an element that is not
--     an envelope
--   wrap(id, attempts, payload) -> the envelope
--   push_nudge(queue, nudge, token) -> wakes a worker blocked on `queue`, if the list is
--     empty (else no worker blocks there); `token` becomes the queue's nudge token if it
--     has none yet
--   nudge_token(nudge) -> the queue's nudge token, false if it has none
--   charged_already(spared, also) -> a test of an envelope's id: true if the process that
--     wrote it is one of `spared` (id prefixes `<process>.` joined by ',') or `also`, whose
--     envelopes a charge passes over (see REPLAY's and RECLAIM's `spared`)
--   marked(id, last, payload) -> the envelope of a segment's oldest member (below)
--   segment_of(element) -> base, first, last, payload of a segment's oldest member; nil for
--     any other element
--   materialize(list) -> writes the envelope of each member of the segment at the bottom of
--     the private list `list`, if it has one
--   bare(payload) -> the payload a producer pushed under a deduplication key, without the
--     wrapper `<PREFIX>dedup:<32 hex digits>:<key in hex>:` (store/queue.py's
--     `unwrap_dedup` reads it alike), and without a priority level's `<PREFIX>prio:<1-9>:`
--     before it (see lua/levels.lua); any other payload as it is
--
-- A segment: a take of fresh messages into an empty private list (see `segments` in
-- lua/take.lua) pushes them as they came, without envelopes, oldest nearest the bottom,
-- but for the oldest, at the very bottom: it is in a *marked* envelope,
-- `<PREFIX><id>+<last>:0:<payload>`, whose `+<last>` says that the deliveries above it up
-- to the number `last` of its take are its segment. Each is the delivery `base` .. n of
-- that take (its id base and a count), attempts 0, n counting up from the marked one's.
-- The mark is in the id, which no other id holds a `+` in: a version before segments
-- (an old pod's keeper or worker, mid-rollout) reads the marked one as an envelope, its
-- payload intact, and each member as a payload (see docs/kubernetes.md, "Upgrades").
-- An envelope's whole cost to Redis is its making (a third of a busy take's), and a
-- delivery that ends well never needs one: a take's in-order ack trims the segment's
-- oldest and marks the new oldest. Any other reader of the list first makes the envelopes
-- (`materialize`), so that it finds what it always found. Only the marked envelope tells a
-- member from a payload of the same bytes: it is only ever at the bottom, and a segment is
-- only ever pushed onto an empty list, so everything of a segment sits right above it.
-- A script need not use them all:
-- luacheck: ignore 211

local function parse(element)
  if string.sub(element, 1, #PREFIX) ~= PREFIX then return nil, 0, element end
  local a = string.find(element, ':', #PREFIX + 1, true)
  local b = a and string.find(element, ':', a + 1, true)
  if not b then return nil, 0, element end
  local id, attempts = string.sub(element, #PREFIX + 1, a - 1), string.sub(element, a + 1, b - 1)
  -- Only what rqworkers wrote: its ids hold a dot, its attempts are digits. Anything else
  -- (written by hand, or by another program) is a payload that merely looks like an envelope.
  if not string.find(id, '.', 1, true) or not string.match(attempts, '^%d+$') then
    return nil, 0, element
  end
  return id, tonumber(attempts), string.sub(element, b + 1)
end

local function wrap(id, attempts, payload)
  return PREFIX .. id .. ':' .. attempts .. ':' .. payload
end

local function charged_already(spared, also)
  local prefixes = {}
  if also then prefixes[also] = true end
  for prefix in string.gmatch(spared, '[^,]+') do prefixes[prefix] = true end
  return function(id)
    return prefixes[string.match(id, '^[^.]*%.') or ''] == true
  end
end

local function nudge_token(nudge)
  return redis.call('GET', nudge) or false
end

local function push_nudge(queue, nudge, token)
  if redis.call('LLEN', queue) > 0 then return end
  redis.call('SET', nudge, token, 'NX')
  redis.call('LPUSH', queue, redis.call('GET', nudge))
end

local function bare(payload)
  local level = PREFIX .. 'prio:'
  if string.sub(payload, 1, #level) == level and string.find(payload, '^[1-9]:', #level + 1) then
    payload = string.sub(payload, #level + 3)
  end
  local head = PREFIX .. 'dedup:'
  if string.sub(payload, 1, #head) ~= head then return payload end
  local token, key, rest = string.match(string.sub(payload, #head + 1), '^(%x+):(%x+):(.*)$')
  if not token or #token ~= 32 or string.find(token .. key, '%u') or #key % 2 == 1 then
    return payload
  end
  return rest
end

local function marked(id, last, payload)
  return PREFIX .. id .. '+' .. last .. ':0:' .. payload
end

local function segment_of(element)
  if not element or string.sub(element, 1, #PREFIX) ~= PREFIX then return nil end
  local base, first, last, at = string.match(element, '^([^:]-%.)(%d+)%+(%d+):0:()', #PREFIX + 1)
  if not base then return nil end
  return base, tonumber(first), tonumber(last), string.sub(element, at)
end

local function materialize(list)
  local base, first, last, payload = segment_of(redis.call('LINDEX', list, -1))
  if not base then return end
  redis.call('LSET', list, -1, wrap(base .. first, 0, payload))
  local count = last - first + 1
  if count < 2 then return end
  -- Newest first: the i-th is the member last - i + 1, at -(count + 1 - i).
  local members = redis.call('LRANGE', list, -count, -2)
  for i, member in ipairs(members) do
    redis.call('LSET', list, -(count + 1 - i), wrap(base .. (last - i + 1), 0, member))
  end
end
