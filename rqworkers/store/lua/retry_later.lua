#!lua flags=allow-oom
-- RETRY_LATER: parks a failed delivery in the retry set until `due`, as an envelope
-- carrying its new attempts count, if it is still in the private list: a delivery someone
-- else moved must not be copied, and a resent retry must not be doubled.
--
-- KEYS: processing, retry
-- ARGV: element, due, member_id, attempts
--   element    the delivery's envelope in the private list
--   due        when it may be taken again, epoch seconds
--   member_id  its id in the retry set, unique per call
--   attempts   its attempts, this one counted
-- Returns 1 if it moved, else 0 (decoded by scripts.RETRY_LATER).

-- A sealed fast list (see lua/take_over.lua) fails here, WRONGTYPE, before anything is
-- written: its superseded process must not add a copy of what was taken over.
redis.call('LLEN', processing)
-- The private list's segment, if any, as envelopes (lua/envelope.lua); never a fast list's
-- payload, which is no envelope.
if parse(element) then materialize(processing) end
local _, _, payload = parse(element)
local member = wrap(member_id, attempts, payload)
redis.call('ZADD', retry, due, member)
if redis.call('LREM', processing, -1, element) == 0 then
  redis.call('ZREM', retry, member)
  return 0
end
return 1
