-- DEAD_LETTER: moves a delivery that used up its attempts to the dead list, as its original
-- payload (without the wrapper of a deduplication key: see `bare`), and files its record
-- in `dead_reasons` under the payload's digest.
--
-- KEYS: processing, dead, dead_reasons
-- ARGV: element, digest, record
--   element    the delivery's envelope in the private list
--   digest     the field of its payload in `dead_reasons` (queue.digest)
--   record     its record, a JSON object (reason, attempts, ...)
-- Returns 1 if it moved, else 0: it was no longer in the private list (decoded by
-- scripts.DEAD_LETTER).
--
-- Identical payloads share the field: its object is the newest copy's record, with `copies`
-- (how many copies of this payload the dead list holds) and `older`, the other copies'
-- records, newest first (up to KEPT_TWIN_RECORDS, bound by the loader from scripts.py).
-- The record is made before anything moves (a record that cannot be read is replaced,
-- never fatal half-way); the copies' own tracebacks are kept for the newest only, so a
-- field of many copies stays small.
-- No allow-oom flag: a record of any size is something new, and waits for memory.

-- A sealed fast list (see lua/take_over.lua) fails here, WRONGTYPE, before anything is
-- written: its superseded process must not add a copy of what was taken over.
redis.call('LLEN', processing)
-- The private list's segment, if any, as envelopes (lua/envelope.lua); never a fast list's
-- payload, which is no envelope.
if parse(element) then materialize(processing) end
local _, _, wrapped = parse(element)
local payload = bare(wrapped)
local ok, new = pcall(cjson.decode, record)
if not ok or type(new) ~= 'table' then new = {reason = 'unreadable record'} end
local previous = redis.call('HGET', dead_reasons, digest)
local readable, old = false, nil
if previous then readable, old = pcall(cjson.decode, previous) end
if readable and type(old) == 'table' then
  local older = type(old.older) == 'table' and old.older or {}
  new.copies = (tonumber(old.copies) or 1) + 1
  old.older, old.copies, old.traceback = nil, nil, nil
  table.insert(older, 1, old)
  while #older > KEPT_TWIN_RECORDS do table.remove(older) end
  new.older = older
else
  new.copies = 1  -- the first copy, or one whose unreadable predecessor is replaced
end
local value = cjson.encode(new)
redis.call('LPUSH', dead, payload)
if redis.call('LREM', processing, -1, element) == 0 then
  redis.call('LPOP', dead)
  return 0
end
redis.call('HSET', dead_reasons, digest, value)
return 1
