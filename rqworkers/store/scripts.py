"""The Lua scripts behind the queue operations, with their keys and arguments bound by name.

A script runs atomically in Redis, so every move below is all-or-nothing, and each costs
one round trip. Every script touches only keys of one queue: with a `{hash tag}` in the
queue name they all live in one Redis Cluster slot.

Each `Script` declares the names of its keys (attributes of `queue.Keys`) and arguments.
The Lua header that binds them to `local`s is generated from those same names, and
`queue.ReliableQueue` builds the key list from them too, so the order is written once.

The elements of a private list are *envelopes*, `rqw1:<id>:<attempts>:<payload>` (see
`queue.py` for the invariant): `id` makes every delivery unique, even of identical
payloads, so a settling operation sent twice (after a lost reply) can never remove a twin;
`attempts` counts this message's deliveries that ended without a result. Shared and dead
lists hold payloads as producers sent them.

Writes are ordered so that a script refused by an out-of-memory Redis stops before it has
lost anything: a message is pushed to its destination before it is removed from its
source, and acks (which free memory) go first.

Out of memory: a Redis over `maxmemory` with `noeviction` refuses every write that may
grow memory, so the workers could not drain the very queue that fills it. A script that
only moves messages (each costs at most its envelope's few dozen bytes more where it lands,
and its ack frees the whole message) declares `allow-oom` (Redis 7.0+, `#!lua flags=...`),
and runs all the same. One that writes something new of any size, such as a dead letter's
record with its traceback, does not: it waits for memory like any outage. Redis before 7.0
reads no flags; there every script waits (see `queue.bind_script`).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "rqw1:"
# Runs on a Redis over `maxmemory`: for scripts that only move messages (see above).
ALLOW_OOM = ("allow-oom",)


@dataclass(frozen=True)
class Script:
    """A Lua script whose KEYS and ARGV are bound to named locals at its top."""

    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    flags: tuple[str, ...] = ()  # Redis 7 script flags, such as ALLOW_OOM

    @property
    def source(self) -> str:
        """The script, with its flags declared in a shebang line if it has any."""
        if not self.flags:
            return self.legacy_source
        return f"#!lua flags={','.join(self.flags)}\n{self.legacy_source}"

    @property
    def legacy_source(self) -> str:
        """The script without a shebang line, for a Redis before 7.0 (which reads none)."""
        rest = f"local REST = {len(self.args) + 1}  -- where variadic ARGV start"
        lines = [_bind(self.keys, "KEYS"), _bind(self.args, "ARGV"), rest, _LIBRARY, self.body]
        return "\n".join(line for line in lines if line)


def _bind(names: tuple[str, ...], table: str) -> str:
    if not names:
        return ""
    values = ", ".join(f"{table}[{i}]" for i in range(1, len(names) + 1))
    return f"local {', '.join(names)} = {values}"


# Envelopes, parsed and built in one place.
_LIBRARY = f"""
local PREFIX = '{PREFIX}'
local function parse(element)
  if string.sub(element, 1, #PREFIX) ~= PREFIX then return nil, 0, element end
  local a = string.find(element, ':', #PREFIX + 1, true)
  local b = a and string.find(element, ':', a + 1, true)
  if not b then return nil, 0, element end
  local id, attempts = string.sub(element, #PREFIX + 1, a - 1), string.sub(element, a + 1, b - 1)
  -- Only what rqworkers wrote: its ids hold a dot, its attempts are digits. Anything else is
  -- a payload left by an older release that merely looks like an envelope.
  if not string.find(id, '.', 1, true) or not string.match(attempts, '^%d+$') then
    return nil, 0, element
  end
  return id, tonumber(attempts), string.sub(element, b + 1)
end
local function wrap(id, attempts, payload)
  return PREFIX .. id .. ':' .. attempts .. ':' .. payload
end
"""

# Acks handled deliveries, then moves up to `limit` messages into the private list in one
# round trip: first the one a blocking fetch left in the landing list (looked at only when
# `landed` is '1': an idle worker's take must cost Redis little), then due retries and
# returned messages (oldest first), then the oldest of the shared list. Each new delivery
# gets the id `idbase .. n`, n counting from 1.
# Acks come in one of two forms. `trim` 0: ARGV's rest are the envelopes to remove, one
# LREM each. `trim` n > 0: the n acks are the oldest of the private list, and ARGV's rest
# are the oldest and the newest of them: both are checked where they must be, and one
# LTRIM removes the n. The worker only claims that when its acks follow the private list's
# order; every envelope is unique and the list holds only its owner's deliveries, in take
# order, so if the two ends are in place, the n between them are the acks. If they are not,
# nothing is removed and the reply's first element is -1: the worker sends them one by one.
# Returns {-2} to a process that no longer owns the list, taking and acking nothing; else
# {acks that found nothing (or -1), due time of the next retry ('' if none, or if
# this call took all it could), attempts of each new delivery joined by ',' ('' when all
# are 0), payload1, payload2, ...}: the worker knows the ids it gave, so the envelopes
# need not travel back.
TAKE = Script(
    flags=ALLOW_OOM,
    keys=("queue", "processing", "landing", "retry", "lease", "registry", "owner"),
    args=("limit", "now", "idbase", "landed", "worker_id", "trim"),
    body="""
-- Only the process that last replayed the list (or, if none did, took first) takes into it
-- and trims it (see `owner` in queue.py): the list holds one process's deliveries, in order.
local me, owned_by = string.match(idbase, '^[^.]*%.'), redis.call('GET', owner)
if not owned_by then
  redis.call('SET', owner, me)
elseif owned_by ~= me then
  return {-2}
end
local missing = 0
local acks = tonumber(trim)
if acks > 0 then
  local in_place = redis.call('LINDEX', processing, -1) == ARGV[REST]
  if in_place and acks > 1 then
    in_place = redis.call('LINDEX', processing, -acks) == ARGV[REST + 1]
  end
  if in_place then
    redis.call('LTRIM', processing, 0, -acks - 1)
  else
    missing = -1
  end
else
  for i = REST, #ARGV do
    if redis.call('LREM', processing, -1, ARGV[i]) == 0 then missing = missing + 1 end
  end
end
local taken = {missing, '', ''}
local room = tonumber(limit)
if room <= 0 then return taken end
-- A worker whose lease lapsed (its node froze) was struck from the registry by a reclaim:
-- what it takes now must stay findable should its node die before the keeper renews.
if redis.call('EXISTS', lease) == 0 then redis.call('SADD', registry, worker_id) end
local fresh, attempts_of, tried = {}, {}, false
local function deliver(attempts, payload)
  local n = #fresh + 1
  fresh[n] = wrap(idbase .. n, attempts, payload)
  attempts_of[n] = attempts
  taken[n + 3] = payload
  if attempts ~= 0 then tried = true end
  room = room - 1
end
local landed_message = landed == '1' and redis.call('LINDEX', landing, -1)
if landed_message then deliver(0, landed_message) end
local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
local due = {}
if room > 0 and first[2] and tonumber(first[2]) <= tonumber(now) then
  due = redis.call('ZRANGEBYSCORE', retry, '-inf', now, 'LIMIT', 0, room)
  for _, member in ipairs(due) do
    local id, attempts, payload = parse(member)
    if not id then  -- written by a release before envelopes: 8 random bytes + payload
      attempts, payload = 1, string.sub(member, 9)
    end
    deliver(attempts, payload)
  end
end
local oldest_last = {}
if room > 0 then  -- the bulk of every busy take: `deliver` inlined, attempts 0
  oldest_last = redis.call('LRANGE', queue, -room, -1)
  local n, head = #fresh, PREFIX .. idbase
  for i = #oldest_last, 1, -1 do
    n = n + 1
    fresh[n] = head .. n .. ':0:' .. oldest_last[i]
    taken[n + 3] = oldest_last[i]
  end
end
-- Pushed before they leave where they were: Redis out of memory refuses the push, and then
-- nothing has moved.
for i = 1, #fresh, 1000 do
  redis.call('LPUSH', processing, unpack(fresh, i, math.min(i + 999, #fresh)))
end
if landed_message then redis.call('RPOP', landing) end
for i = 1, #due, 1000 do
  redis.call('ZREM', retry, unpack(due, i, math.min(i + 999, #due)))
end
if #oldest_last > 0 then redis.call('LTRIM', queue, 0, -#oldest_last - 1) end
if tried then
  for i = #attempts_of + 1, #fresh do attempts_of[i] = 0 end
  taken[3] = table.concat(attempts_of, ',')
end
if room > 0 and first[2] then
  taken[2] = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')[2] or ''
end
return taken
""",
)

# What an earlier life of this worker left in flight, oldest first, after charging one
# attempt to each delivery whose handler had started: with `charge` '1', every one older
# than the delivery whose id is `unstarted` (deliveries sit in the list in the order they
# start), or every one if none has that id ('' when every one started, or nobody knows),
# except what this process wrote itself (ids starting with `mine`). A charged envelope gets
# a new id of this process, so a replay sent again after a lost reply charges nothing twice.
# With `charge` '0' (this process's own list, after a Redis error) nothing is charged.
# Messages a blocking fetch left in the landing list never reached a handler; they join the
# private list uncharged. An element that is not an envelope (written by an older release)
# is wrapped. The replaying process becomes the list's `owner`. Returns {envelope1, ...},
# oldest first.
REPLAY = Script(
    flags=ALLOW_OOM,
    keys=("processing", "landing", "owner"),
    args=("charge", "unstarted", "idbase", "mine"),
    body="""
redis.call('SET', owner, mine)  -- from now on only this process takes into the list
local started = charge == '1'
local elements = redis.call('LRANGE', processing, 0, -1)
local result = {}
for i = #elements, 1, -1 do
  local element = elements[i]
  local id, attempts, payload = parse(element)
  local changed = false
  if id == unstarted then started = false end
  if not id then
    id, changed = idbase .. 'W' .. i, true
  end
  if started and string.sub(id, 1, #mine) ~= mine then
    attempts, changed, id = attempts + 1, true, idbase .. 'C' .. i
  end
  if changed then
    element = wrap(id, attempts, payload)
    redis.call('LSET', processing, i - 1, element)
  end
  result[#result + 1] = element
end
local n = 0
while true do
  local landed = redis.call('LINDEX', landing, -1)
  if not landed then break end
  n = n + 1
  local element = wrap(idbase .. 'L' .. n, 0, landed)
  redis.call('LPUSH', processing, element)
  redis.call('RPOP', landing)
  result[#result + 1] = element
end
return result
""",
)

# Gives deliveries that never reached the handler back, oldest nearest the head: untried
# ones to the head of the shared list as they came, ones with attempts behind them to the
# retry set, due at once and in order, so that their count survives.
# ARGV: an id base, then envelopes, newest first. Returns how many moved.
GIVE_BACK = Script(
    flags=ALLOW_OOM,
    keys=("queue", "processing", "retry"),
    args=("idbase",),
    body="""
local moved = 0
for i = REST, #ARGV do
  local _, attempts, payload = parse(ARGV[i])
  -- A new id each call: were it the delivery's, a give-back sent again after a lost reply
  -- would find its own earlier copy in the retry set and remove it (ZREM below).
  local member = wrap(idbase .. (i - REST + 1), attempts, payload)
  if attempts == 0 then
    redis.call('RPUSH', queue, payload)
  else
    redis.call('ZADD', retry, #ARGV - i, member)
  end
  if redis.call('LREM', processing, -1, ARGV[i]) == 1 then
    moved = moved + 1
  elseif attempts == 0 then
    redis.call('RPOP', queue)
  else
    redis.call('ZREM', retry, member)
  end
end
return moved
""",
)

# Parks a failed delivery in the retry set until `due`, as an envelope carrying its new
# attempts count, unique by `member_id`. Only if it was still in the private list: a
# delivery someone else moved must not be copied, and a resent retry must not be doubled.
# Returns 0/1.
RETRY_LATER = Script(
    flags=ALLOW_OOM,
    keys=("processing", "retry"),
    args=("element", "due", "member_id", "attempts"),
    body="""
local _, _, payload = parse(element)
local member = wrap(member_id, attempts, payload)
redis.call('ZADD', retry, due, member)
if redis.call('LREM', processing, -1, element) == 0 then
  redis.call('ZREM', retry, member)
  return 0
end
return 1
""",
)

# Takes or renews a worker's lease for `ttl` milliseconds, its value the worker's status,
# and registers the worker for orphan recovery when `register` is '1' or the lease had
# lapsed (a reclaim struck the worker from the registry). Returns the previous value, or
# false. A lease is small and one per worker: it may be written on a Redis out of memory,
# so that a live worker's messages are never reclaimed while it drains its queue.
LEASE = Script(
    flags=ALLOW_OOM,
    keys=("lease", "registry"),
    args=("value", "ttl", "worker_id", "register"),
    body="""
local previous = redis.call('GET', lease)
redis.call('SET', lease, value, 'PX', ttl)
if register == '1' or not previous then redis.call('SADD', registry, worker_id) end
return previous
""",
)

# Moves a delivery that used up its attempts to the dead list, as its original payload, and
# files its record in `dead_reasons` under the payload's digest. Identical payloads share
# the field: its object is the newest copy's record, with `copies` (how many copies of this
# payload the dead list holds) and `older`, the other copies' records, newest first (up to
# `KEPT_TWIN_RECORDS`). Returns 0/1.
# The record is made before anything moves (a record that cannot be read is replaced, never
# fatal half-way); the copies' own tracebacks are kept for the newest only, so a field of
# many copies stays small.
KEPT_TWIN_RECORDS = 100
DEAD_LETTER = Script(
    keys=("processing", "dead", "dead_reasons"),
    args=("element", "digest", "record"),
    body=f"""
local _, _, payload = parse(element)
local ok, new = pcall(cjson.decode, record)
if not ok or type(new) ~= 'table' then new = {{reason = 'unreadable record'}} end
local previous = redis.call('HGET', dead_reasons, digest)
local readable, old = false, nil
if previous then readable, old = pcall(cjson.decode, previous) end
if readable and type(old) == 'table' then
  local older = type(old.older) == 'table' and old.older or {{}}
  new.copies = (tonumber(old.copies) or 1) + 1
  old.older, old.copies, old.traceback = nil, nil, nil
  table.insert(older, 1, old)
  while #older > {KEPT_TWIN_RECORDS} do table.remove(older) end
  new.older = older
else
  new.copies = 1  -- the first copy, or one whose unreadable predecessor is replaced
end
local value = cjson.encode(new)
redis.call('LPUSH', dead, payload)
if redis.call('LREM', processing, -1, element) == 0 then
  redis.call('LPOP', dead)
  return 0
end
redis.call('HSET', dead_reasons, digest, value)
return 1
""",
)

# Hands an orphaned worker's messages back, if its lease is still gone: its deliveries to
# the retry set, due at once and oldest first, each charged one attempt if its handler had
# started: every one older than the delivery whose id is `unstarted` (as in REPLAY), so
# every one for a lost node ('': nobody knows which ran), or a slot of this reclaimer's own
# node, whose scoreboard it reads; the messages its blocking fetch had landed, never
# delivered, to the head of the shared list.
# Returns how many moved, or -1 if the lease is alive.
RECLAIM = Script(
    flags=ALLOW_OOM,
    keys=("processing", "landing", "queue", "retry", "lease", "registry", "owner"),
    args=("worker_id", "unstarted"),
    body="""
if redis.call('EXISTS', lease) == 1 then return -1 end
local tag = 'x' .. string.gsub(worker_id, '[^%w]', '-') .. '.'
local moved = 0
while true do
  local landed = redis.call('LINDEX', landing, -1)
  if not landed then break end
  redis.call('RPUSH', queue, landed)
  redis.call('RPOP', landing)
  moved = moved + 1
end
local started = true
while true do
  local element = redis.call('LINDEX', processing, -1)
  if not element then break end
  local id, attempts, payload = parse(element)
  moved = moved + 1
  if id == unstarted then started = false end
  if started then attempts = attempts + 1 end
  redis.call('ZADD', retry, moved, wrap(tag .. moved, attempts, payload))
  redis.call('RPOP', processing)
end
redis.call('SREM', registry, worker_id)
redis.call('DEL', owner)  -- whoever takes into the list next owns it
return moved
""",
)

# Takes chosen letters out of the dead list: back to the head of the shared queue with no
# attempts behind them (requeue), or gone (purge). Each is found by payload, and its record
# by id (or, when records were not kept, the oldest record of that payload), so dead letters
# added meanwhile, which shift every index, cannot make it take the wrong one.
# ARGV: 'requeue' or 'purge', then (payload, digest, record id) triples. Returns how many.
DEAD_TAKE = Script(
    flags=ALLOW_OOM,
    keys=("dead", "queue", "dead_reasons"),
    args=("mode",),
    body="""
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
""",
)
