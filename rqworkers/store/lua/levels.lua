-- The levels library, put before the body of every script that calls it (see scripts.py).
-- Priorities 1 to 9 live in the queue's retry set, each in a band of scores of its own
-- below 0, where level 0 (retries and delayed messages of plain pushes) keeps its epoch
-- seconds: band L is [-L * LEVEL_BAND, -(L - 1) * LEVEL_BAND). In its band, a member
-- scored `-L * LEVEL_BAND + ms` is due at epoch ms `ms` (a retry, a delayed message, or
-- one given back or reclaimed: due at once), and one at the band's top, `-(L - 1) *
-- LEVEL_BAND - 1`, is a waiting message, always due, in the order of its id. A take reads
-- the bands only when the set's first score is below 0: a queue with no prioritised
-- message pays nothing. A message of level L carries `<PREFIX>prio:<L>:` before its payload
-- (see store/levels.py), so its level survives retries, replays, reclaims and give-backs.
--
-- Uses LEVEL_BAND and PREFIX, bound by the loader from scripts.py.
--
-- Defines:
--   level_of(payload) -> the level a payload carries, 0 for none
--   level_score(level, ms) -> the score of a member of `level` due at epoch ms `ms`;
--     `ms` itself (due at once, or epoch seconds) for level 0
--   due_by_level(retry, first, now, limit) -> up to `limit` due members of the retry set,
--     highest level first, due ones of a level before its waiting ones, then level 0's;
--     `first` is the set's first score, below 0
--   earlier(score, first) -> whether a member scored `score` may be due before every
--     member the set held, whose first score was `first` (false if none): a nudge wakes a
--     blocked worker then. With bands it answers yes: the set is not in due order.
--   waiting(score) -> whether `score` is a level's top: a message waiting there, due at once
--   wake_for(queue, nudge, token, registry, n) -> wakes up to `n` workers blocked on the
--     empty shared list (no more than the queue has workers, 100 at most), a nudge each
--     (see push_nudge in lua/envelope.lua): for `n` messages due at once
-- A script need not use them all:
-- luacheck: ignore 211

local function level_of(payload)
  local head = PREFIX .. 'prio:'
  if string.sub(payload, 1, #head) ~= head then return 0 end
  local level = string.match(payload, '^([1-9]):', #head + 1)
  return tonumber(level) or 0
end

local function level_score(level, ms)
  if level == 0 then return ms end
  return -level * LEVEL_BAND + ms
end

-- A number as Redis reads a score: Lua would give 14 digits only.
local function exact(n)
  return string.format('%.17g', n)
end

local function due_by_level(retry, first, now, limit)
  local due, score = {}, tonumber(first)
  local now_ms = math.floor(tonumber(now) * 1000)
  local function add(members)
    for _, member in ipairs(members) do due[#due + 1] = member end
  end
  while score and score < 0 and #due < limit do
    local floor = -math.ceil(-score / LEVEL_BAND) * LEVEL_BAND
    if score < -9 * LEVEL_BAND then  -- below every band: not ours (written by hand), due
      floor = -10 * LEVEL_BAND
      add(redis.call('ZRANGEBYSCORE', retry, '-inf', '(' .. exact(floor + LEVEL_BAND),
        'LIMIT', 0, limit - #due))
    else
      local top, due_by = exact(floor + LEVEL_BAND - 1), math.min(floor + now_ms,
        floor + LEVEL_BAND - 2)
      if score <= due_by then  -- the band's first is a due retry or delayed message
        add(redis.call('ZRANGEBYSCORE', retry, exact(floor), exact(due_by),
          'LIMIT', 0, limit - #due))
      end
      if #due < limit then
        add(redis.call('ZRANGEBYSCORE', retry, top, top, 'LIMIT', 0, limit - #due))
      end
    end
    if #due >= limit then break end
    score = tonumber(redis.call('ZRANGEBYSCORE', retry, exact(floor + LEVEL_BAND), '+inf',
      'WITHSCORES', 'LIMIT', 0, 1)[2])
  end
  if score and #due < limit and score <= tonumber(now) then
    add(redis.call('ZRANGEBYSCORE', retry, 0, now, 'LIMIT', 0, limit - #due))
  end
  return due
end

local function waiting(score)
  local n = tonumber(score)
  return n < 0 and (n + 1) % LEVEL_BAND == 0
end

local function wake_for(queue, nudge, token, registry, n)
  if redis.call('LLEN', queue) > 0 then return end  -- no worker blocks there
  push_nudge(queue, nudge, token)
  local more = math.min(n, redis.call('SCARD', registry), 100) - 1
  if more <= 0 then return end
  local tokens, value = {}, redis.call('GET', nudge)
  for i = 1, more do tokens[i] = value end
  redis.call('LPUSH', queue, unpack(tokens))
end

local function earlier(score, first)
  return not first or tonumber(first) < 0 or tonumber(score) < tonumber(first)
end
