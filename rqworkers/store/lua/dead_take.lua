#!lua flags=allow-oom
-- DEAD_TAKE: takes chosen letters out of the dead list: back to the head of the shared
-- queue with no attempts behind them (requeue), or gone (purge).
--
-- KEYS: dead, queue, dead_reasons
-- ARGV: mode, letters...
--   mode       'requeue' or 'purge'
--   letters    (payload, digest, record id) triples
-- Returns how many were taken out (decoded by scripts.DEAD_TAKE).
--
-- Each letter is found by payload, and its record by id (or, when records were not kept,
-- the oldest record of that payload), so dead letters added meanwhile, which shift every
-- index, cannot make it take the wrong one.

-- The record of a payload's copies without the copy whose record id is `id`; nil when no
-- copy is left.
local function without(record, id)
  local copies = {record}
  for _, r in ipairs(record.older or {}) do copies[#copies + 1] = r end
  local total = tonumber(record.copies) or 1
  local at = nil
  for i, r in ipairs(copies) do
    if r.id == id then at = i break end
  end
  if at == nil and total <= #copies then at = #copies end  -- else: a copy past the kept
  if at ~= nil then table.remove(copies, at) end           -- records, which has none
  if total <= 1 or #copies == 0 then return nil end
  local head = table.remove(copies, 1)
  head.copies = total - 1
  head.older = copies
  return head
end

local taken = 0
for i = REST, #ARGV, 3 do
  local payload, digest, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if mode == 'requeue' then redis.call('RPUSH', queue, payload) end
  if redis.call('LREM', dead, -1, payload) == 0 then
    if mode == 'requeue' then redis.call('RPOP', queue) end
  else
    -- A record that is not ours to read (written by hand, say) is dropped, not fatal.
    local raw = redis.call('HGET', dead_reasons, digest)
    local readable, record = false, nil
    if raw then readable, record = pcall(cjson.decode, raw) end
    local rest = readable and type(record) == 'table' and without(record, id)
    if rest then
      redis.call('HSET', dead_reasons, digest, cjson.encode(rest))
    else
      redis.call('HDEL', dead_reasons, digest)
    end
    taken = taken + 1
  end
end
return taken
