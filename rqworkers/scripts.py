"""The Lua scripts behind the queue operations.

A script runs atomically in Redis, so every move below is all-or-nothing, and each costs
one round trip. Every script touches only keys of one queue: with a `{hash tag}` in the
queue name they all live in one Redis Cluster slot. Only plain list, hash and sorted-set
commands are used, which every Redis since 2.6 (and fakeredis) runs.

Private lists hold the newest message on the left and the oldest on the right, like the
shared list they come from.

The scripts a worker settles messages with record an operation id in `<queue>:op:<worker-id>`
in the same atomic step. When a reply is lost to a Redis failure, the worker reads it back
to learn whether its last operation happened, and so neither repeats nor forgets it.
"""

_RECORD_OP = "if {arg} ~= '' then redis.call('SET', {key}, {arg}, 'EX', 86400) end"

# Acks handled messages and takes up to `limit` new ones, counting each new delivery, in one
# round trip: with prefetch 1 the ack of a message travels with the fetch of the next.
# KEYS: queue, processing, deliveries, op. ARGV: op id, limit, then the messages to ack.
# Returns {acks that found nothing, message1, count1, message2, count2, ...}.
TAKE = (
    _RECORD_OP.format(arg="ARGV[1]", key="KEYS[4]")
    + """
local missing = 0
for i = 3, #ARGV do
  if redis.call('LREM', KEYS[2], -1, ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[3], ARGV[i])
  else
    missing = missing + 1
  end
end
local result = {missing}
for _ = 1, tonumber(ARGV[2]) do
  local message = redis.call('RPOP', KEYS[1])
  if not message then break end
  redis.call('LPUSH', KEYS[2], message)
  result[#result + 1] = message
  result[#result + 1] = redis.call('HINCRBY', KEYS[3], message, 1)
end
return result
"""
)

# Counts the delivery of a message a blocking fetch just moved into the private list (at its
# head), unless it is no longer there: if the worker stalled between the two steps long
# enough for its list to be reclaimed, the message is someone else's now, and counting or
# handling it here would leave a stale count and run it twice.
# KEYS: processing, deliveries. ARGV: message. Returns the count, or -1.
COUNT_FETCHED = """
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return -1 end
return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
"""

# What an earlier life of this worker left in its private list, oldest first, with delivery
# counts. The `started` oldest ones had reached the handler: replaying them is a new delivery
# and is counted. The others were counted when fetched but never started, so that count
# stands for this delivery; a message never counted at all (its fetch reply was lost in an
# outage) is counted now. `started` = -1 means unknown (a new manager after a node crash):
# every message is counted, so a poison message that takes its node down still ends dead.
# KEYS: processing, deliveries. ARGV: started. Returns {message1, count1, ...}.
REPLAY = """
local messages = redis.call('LRANGE', KEYS[1], 0, -1)
local started = tonumber(ARGV[1])
local result = {}
local position = 0
for i = #messages, 1, -1 do
  local message = messages[i]
  position = position + 1
  local count = tonumber(redis.call('HGET', KEYS[2], message) or '0')
  if started < 0 or position <= started or count == 0 then
    count = redis.call('HINCRBY', KEYS[2], message, 1)
  end
  result[#result + 1] = message
  result[#result + 1] = count
end
return result
"""

# Gives prefetched messages that never reached the handler back to the head of the shared
# queue, oldest nearest the head, and takes back their uncounted delivery.
# KEYS: queue, processing, deliveries. ARGV: messages, newest first. Returns how many moved.
GIVE_BACK = """
local moved = 0
for i = 1, #ARGV do
  if redis.call('LREM', KEYS[2], 1, ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i])
    if redis.call('HINCRBY', KEYS[3], ARGV[i], -1) <= 0 then
      redis.call('HDEL', KEYS[3], ARGV[i])
    end
    moved = moved + 1
  end
end
return moved
"""

# Parks a failed message in the retry set; its delivery count stays. Only if it was still in
# the private list: a message someone else moved must not be copied.
# KEYS: processing, retry, op. ARGV: message, due time, member (nonce + message), op id.
# Returns 0/1.
RETRY_LATER = (
    _RECORD_OP.format(arg="ARGV[4]", key="KEYS[3]")
    + """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
)

# Moves a message that used up its deliveries to the dead list, keeping why.
# KEYS: processing, dead, deliveries, dead reasons, op. ARGV: message, digest, reason JSON,
# op id. Returns 0/1.
DEAD_LETTER = (
    _RECORD_OP.format(arg="ARGV[4]", key="KEYS[5]")
    + """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
return 1
"""
)

# Moves due retries back to the tail of the shared list, like new messages.
# KEYS: retry, queue. ARGV: now, limit, nonce length. Returns how many moved.
PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('LPUSH', KEYS[2], string.sub(member, tonumber(ARGV[3]) + 1))
end
return #due
"""

# Hands an orphaned private list back to the head of the shared list, oldest message nearest
# the head. Not counted here: each was counted when the dead worker took it, and the next
# take counts the new delivery. The lease is checked inside the script: a worker that took
# its lease back a moment ago keeps its messages.
# KEYS: processing, queue, lease, registry. ARGV: worker id.
# Returns how many moved, or -1 if the lease is alive.
RECLAIM = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local moved = 0
while true do
  local message = redis.call('LPOP', KEYS[1])
  if not message then break end
  redis.call('RPUSH', KEYS[2], message)
  moved = moved + 1
end
redis.call('SREM', KEYS[4], ARGV[1])
return moved
"""

# Takes chosen messages out of the dead list: back to the head of the shared queue with a
# fresh delivery count (requeue), or gone (purge). Each message is found by value, so
# dead letters added meanwhile, which shift every index, cannot make it take the wrong one.
# KEYS: dead, queue, deliveries, dead reasons. ARGV: 'requeue' or 'purge', then message and
# digest pairs, newest first. Returns how many were taken out.
DEAD_TAKE = """
local requeue = ARGV[1] == 'requeue'
local taken = 0
for i = 2, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    if requeue then
      redis.call('RPUSH', KEYS[2], ARGV[i])
      redis.call('HDEL', KEYS[3], ARGV[i])
    end
    redis.call('HDEL', KEYS[4], ARGV[i + 1])
    taken = taken + 1
  end
end
return taken
"""
