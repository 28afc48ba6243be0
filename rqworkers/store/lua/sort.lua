#!lua flags=allow-oom
-- SORT: for a queue whose handler names each message's group (`group(message)`), puts
-- the messages the worker has named the groups of in their groups' turns: the oldest of
-- the shared list (or the landing list) into their groups' lists, and due members of the
-- retry set tagged with their group, for TAKE to keep them to that group's limits.
--
-- KEYS: queue, landing, retry, ring, nudge
-- ARGV: group_prefix, source, items...
--   group_prefix  a group's list is `group_prefix` .. group
--   source     'queue' or 'landing': items are payloads from that list's tail, oldest
--              first, each followed by its group in hex; each is moved only while it is
--              still at the tail, so two workers sorting at once move nothing twice.
--              'retry': items are members of the retry set, each followed by its group in
--              hex; each still there gets a new id `G<hex>.<id>`, same score
-- Returns how many it sorted (decoded by scripts.SORT).

local sorted = 0
if source == 'retry' then
  for i = REST, #ARGV - 1, 2 do
    local member, hex = ARGV[i], ARGV[i + 1]
    local score = redis.call('ZSCORE', retry, member)
    if score then
      local id, attempts, payload = parse(member)
      redis.call('ZADD', retry, score, wrap('G' .. hex .. '.' .. (id or 'raw.'), attempts, payload))
      redis.call('ZREM', retry, member)
      sorted = sorted + 1
    end
  end
  return sorted
end
local list = source == 'landing' and landing or queue
local clock = redis.call('TIME')
local stamp = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local token = nudge_token(nudge)  -- a nudge is no message: dropped, never sorted
for i = REST, #ARGV - 1, 2 do
  if redis.call('LINDEX', list, -1) ~= ARGV[i] then break end
  if ARGV[i] ~= token then sort_into(group_prefix, ring, unhex(ARGV[i + 1]), ARGV[i], stamp) end
  redis.call('RPOP', list)
  sorted = sorted + 1
end
return sorted
