#!lua flags=allow-oom
-- RELEASE: frees a deduplication key once its message is acked or dead-lettered, if the
-- key still belongs to that message (its value starts with the message's token): a key
-- that expired and was taken by a newer message is left alone.
--
-- KEYS: dedup
-- ARGV: token
-- Returns 1 if it freed the key, else 0 (decoded by scripts.RELEASE).

local current = redis.call('GET', dedup)
if current and string.sub(current, 1, #token + 1) == token .. ':' then
  redis.call('DEL', dedup)
  return 1
end
return 0
