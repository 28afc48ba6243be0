#!lua flags=allow-oom
-- LEASE: takes or renews a worker's lease, and registers the worker for orphan recovery
-- when asked to or when the lease had lapsed (a reclaim struck the worker from the
-- registry). A lease is small and one per worker: it may be written on a Redis out of
-- memory, so that a live worker's messages are never reclaimed while it drains its queue.
--
-- KEYS: lease, registry
-- ARGV: value, ttl, worker_id, register
--   value      the lease's value: the worker's status
--   ttl        how long the lease lives, in milliseconds
--   worker_id  the worker, as the registry names it
--   register   '1': register the worker even if its lease is alive
-- Returns the lease's previous value, or false if it had none (decoded by scripts.LEASE).

local previous = redis.call('GET', lease)
redis.call('SET', lease, value, 'PX', ttl)
if register == '1' or not previous then redis.call('SADD', registry, worker_id) end
return previous
