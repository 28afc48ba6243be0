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
--   bare(payload) -> the payload a producer pushed under a deduplication key, without the
--     wrapper `<PREFIX>dedup:<32 hex digits>:<key in hex>:` (store/queue.py's
--     `unwrap_dedup` reads it alike), and without a priority level's `<PREFIX>prio:<1-9>:`
--     before it (see lua/levels.lua); any other payload as it is
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
