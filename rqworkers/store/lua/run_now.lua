#!lua flags=allow-oom
-- RUN_NOW: makes members of the retry set due at `now` (in their level's band: see
-- lua/levels.lua), those still there (a worker may
-- have taken one meanwhile: it is not added again), and nudges a blocked worker to take them.
--
-- KEYS: queue, retry, nudge
-- ARGV: now, token, members...
--   now        epoch seconds
--   token      a fresh random token, kept as the queue's nudge token if it has none
--   members    envelopes of the retry set, as `rqworkers scheduled list` read them
-- Returns how many were still there (decoded by scripts.RUN_NOW).

local found = 0
for i = REST, #ARGV do
  if redis.call('ZSCORE', retry, ARGV[i]) then
    local level = level_of(select(3, parse(ARGV[i])))
    local score = level == 0 and now or level_score(level, math.floor(tonumber(now) * 1000))
    redis.call('ZADD', retry, string.format('%.17g', score), ARGV[i])
    found = found + 1
  end
end
if found > 0 then push_nudge(queue, nudge, token) end
return found
