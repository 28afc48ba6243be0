-- REPLY: pushes a task's reply onto its reply list, which expires `ttl_ms` after the newest
-- reply. One script, so a reply list never outlives its TTL, in one command (cheaper than
-- a pipeline of two); one key, so it runs on a cluster too.
--
-- KEYS: key
-- ARGV: reply, ttl_ms
--   reply      the reply (tasks.success_reply or tasks.failure_reply)
--   ttl_ms     how long the list lives after it, in milliseconds
-- Returns nothing.

redis.call('LPUSH', key, reply)
redis.call('PEXPIRE', key, ttl_ms)
