-- PUSH_ONCE: pushes a message under a deduplication key, if no message holds the key: the
-- check and the push are one step, so of any number of concurrent pushes with one key,
-- exactly one is enqueued. The key expires (`hold_ms`), so a message lost with its key
-- held (or a crashed run) never blocks it for good. Not allow-oom: it adds a message.
--
-- KEYS: queue, retry, nudge, dedup
-- ARGV: mode, token, hold_ms, due, member, payload, fresh_token
--   mode         'hold': dropped while the key is held (a worker releases it once the
--                message is acked or dead-lettered; see lua/release.lua); 'throttle': the
--                same, but nothing releases it before `hold_ms`; 'debounce' (delayed only):
--                never dropped, the pending message holding the key is taken out of the
--                retry set and this one takes its place, due anew
--   token        128 random bits: the key's value starts with it (`<token>:<member>`)
--   hold_ms      how long the key lives, milliseconds
--   due          epoch seconds for a delayed message, its level's score (see
--                lua/levels.lua) for a prioritised one; '' to push at once
--   member       its envelope in the retry set, when delayed or prioritised; else ''
--   payload      what is pushed onto the shared list when not delayed
--   fresh_token  a fresh random token, kept as the queue's nudge token if it has none
-- Returns 1 if enqueued, 0 if dropped (decoded by scripts.PUSH_ONCE).

local current = redis.call('GET', dedup)
if mode == 'debounce' then
  local pending = current and string.match(current, '^[^:]*:(.*)$')
  if pending and pending ~= '' then redis.call('ZREM', retry, pending) end
elseif current then
  return 0
end
redis.call('SET', dedup, token .. ':' .. member, 'PX', hold_ms)
if due == '' then
  redis.call('LPUSH', queue, payload)
  return 1
end
local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')[2]
redis.call('ZADD', retry, due, member)
if earlier(due, first) then push_nudge(queue, nudge, fresh_token) end
return 1
