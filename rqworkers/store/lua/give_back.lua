#!lua flags=allow-oom
-- GIVE_BACK: gives deliveries that never reached the handler back, oldest nearest the
-- head: untried ones to the head of the shared list as they came, ones with attempts
-- behind them to the retry set, due at once and in order, so that their count survives.
-- Prioritised ones (see lua/levels.lua) go to their level's band, due at once, tried or not.
--
-- KEYS: queue, processing, retry
-- ARGV: idbase, envelopes...
--   idbase     an id base of this process, for the retry set's new members
--   envelopes  the deliveries to give back, newest first
-- Returns how many moved (decoded by scripts.GIVE_BACK).

-- A sealed fast list (see lua/take_over.lua) fails here, WRONGTYPE, before anything is
-- written: its superseded process must not add a copy of what was taken over.
redis.call('LLEN', processing)
-- The private list's segment, if any, as envelopes (lua/envelope.lua); never a fast list's
-- payload, which is no envelope.
if ARGV[REST] and parse(ARGV[REST]) then materialize(processing) end
local moved = 0
for i = REST, #ARGV do
  local _, attempts, payload = parse(ARGV[i])
  local level = level_of(payload)
  local listed = attempts == 0 and level == 0
  -- A new id each call: were it the delivery's, a give-back sent again after a lost reply
  -- would find its own earlier copy in the retry set and remove it (ZREM below).
  local member = wrap(idbase .. (i - REST + 1), attempts, payload)
  if listed then
    redis.call('RPUSH', queue, payload)
  else
    redis.call('ZADD', retry, level_score(level, #ARGV - i), member)
  end
  if redis.call('LREM', processing, -1, ARGV[i]) == 1 then
    moved = moved + 1
  elseif listed then
    redis.call('RPOP', queue)
  else
    redis.call('ZREM', retry, member)
  end
end
return moved
