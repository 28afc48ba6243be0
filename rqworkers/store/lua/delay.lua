-- DELAY: adds delayed (or prioritised) messages to the retry set, at the score `due`: each
-- a new envelope with attempts 0 and an id of its own, so that identical payloads stay
-- separate messages. If they may be due before everything the set held, a nudge wakes a
-- blocked worker, which then blocks only until they are due; messages waiting at a
-- priority level, due at once, wake as many blocked workers as they are (up to the
-- workers in the queue's `registry`). Not allow-oom: it adds new
-- messages, as a push does.
--
-- KEYS: queue, retry, nudge, registry
-- ARGV: due, idbase, offset, token, payloads...
--   due        epoch seconds; for a priority level, its band's score (see lua/levels.lua)
--   idbase     `p<128 random bits hex>.` (or for messages waiting at a priority level,
--              `q<epoch µs, 16 digits><64 random bits hex>.`, which orders them by push
--              time), one per push: the n-th payload's id is idbase ..
--              (offset + n) on 8 digits, so that one push's messages, sent in several calls,
--              are taken in order when due together (the set orders equal scores by
--              member); never a worker's id form `<process>.<call>.<n>`
--   offset     how many payloads of this push earlier calls sent
--   token      a fresh random token, kept as the queue's nudge token if it has none
--   payloads   the messages, oldest first
-- Returns the number of messages in the retry set after (decoded by scripts.DELAY).

local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')[2]
local members = {}
for i = REST, #ARGV do
  local n = #members
  members[n + 1] = due
  members[n + 2] = wrap(string.format('%s%08d', idbase, offset + i - REST + 1), 0, ARGV[i])
end
for i = 1, #members, 1000 do
  redis.call('ZADD', retry, unpack(members, i, math.min(i + 999, #members)))
end
if waiting(due) then
  wake_for(queue, nudge, token, registry, #ARGV - REST + 1)
elseif earlier(due, first) then
  push_nudge(queue, nudge, token)
end
return redis.call('ZCARD', retry)
