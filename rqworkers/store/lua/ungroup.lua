#!lua flags=allow-oom
-- UNGROUP: for a queue that no longer has groups (its `group_by`, or its handler's
-- `group()`, removed and the workers restarted): puts the messages waiting in its groups'
-- lists back at the tail of the shared list, where the plain TAKE takes them. TAKE never
-- looks at the groups' lists: without this they would wait there for ever.
--
-- KEYS: queue, ring
-- ARGV: group_prefix, most
--   group_prefix  a group's list is `group_prefix` .. group (each element `<ms>|payload`)
--   most       messages moved in one call, at most (a later call moves the rest)
-- Each call moves the newest of what is left, so that the next call's, older, go nearer
-- the tail: each group's order is kept; between groups, they go by the time they were
-- sorted in. A group's list left empty leaves the ring.
-- Returns how many messages it moved plus groups it dropped from the ring (decoded by
-- scripts.UNGROUP): 0 once the ring is empty.

local room, moving, dropped = tonumber(most), {}, 0
for _, g in ipairs(redis.call('LRANGE', ring, 0, room - 1)) do
  if room <= 0 then break end
  local list = group_prefix .. g
  local elements = redis.call('LRANGE', list, 0, room - 1)  -- its newest first
  for i, element in ipairs(elements) do
    local stamp, at = string.match(element, '^(%d+)|()')  -- none: pushed there by another
    moving[#moving + 1] = {tonumber(stamp) or 0, i, string.sub(element, at or 1)}
  end
  redis.call('LTRIM', list, #elements, -1)
  if redis.call('LLEN', list) == 0 then dropped = dropped + redis.call('LREM', ring, 0, g) end
  room = room - #elements
end
-- Newest first, so that the oldest is pushed last, nearest the tail (taken first).
table.sort(moving, function(a, b)
  if a[1] ~= b[1] then return a[1] > b[1] end
  return a[2] < b[2]
end)
for _, m in ipairs(moving) do redis.call('RPUSH', queue, m[3]) end
return #moving + dropped
