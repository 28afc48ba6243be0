"""Every Redis operation on a queue's lists, in one place.

A message only ever moves atomically: shared list → private list (fetch), private list →
nowhere (ack), → retry set (retry later) or → dead list (dead-letter). It is never popped
anywhere else, so at every instant it sits in exactly one key and a crash cannot lose it.

Keys, all prefixed by the queue name so that a `{hash tag}` in it keeps them in one
Redis Cluster slot:

- `<queue>`: the shared list. Producers `LPUSH`; workers take from the right (FIFO).
- `<queue>:processing:<worker-id>`: one worker's private list of in-flight messages.
- `<queue>:deliveries`: hash, payload → deliveries so far (cleared on ack). Keyed by the
  payload itself so that scripts can count without hashing; it holds only in-flight and
  retrying messages, so its size is bounded by what is in flight.
- `<queue>:retry`: sorted set of failed messages waiting for their retry time.
- `<queue>:dead`: the dead-letter list, original payloads byte-for-byte.
- `<queue>:dead:reasons`: hash, SHA-1 of a payload → JSON with the last reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Errors after which the connection is suspect and the worker should back off and retry.
# ResponseError covers OOM/READONLY/NOPERM/LOADING replies: the command did nothing.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ResponseError,
)

_NONCE_BYTES = 8

# Moves due retries back to the tail of the shared list. A script, so that a message is in
# the retry set or in the list, never in both and never in neither.
_PROMOTE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('LPUSH', KEYS[2], string.sub(member, tonumber(ARGV[3]) + 1))
end
return #due
"""


def connect(url: str, block_timeout: float = 1.0) -> redis.Redis:
    """A client for `url` whose failures surface at once: the worker owns retrying.

    redis-py's own retry is off because a retried `BLMOVE` could move a second message
    while the first reply was lost; the worker instead backs off and replays its private
    list, which holds every message whatever happened to the reply.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=block_timeout + 10.0,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


def digest(message: bytes) -> str:
    """The key of a payload in `<queue>:dead:reasons`. Identical payloads share it."""
    return hashlib.sha1(message, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class Keys:
    queue: str
    processing: str
    deliveries: str
    retry: str
    dead: str
    dead_reasons: str

    @classmethod
    def of(cls, queue: str, worker_id: str) -> Keys:
        return cls(
            queue=queue,
            processing=f"{queue}:processing:{worker_id}",
            deliveries=f"{queue}:deliveries",
            retry=f"{queue}:retry",
            dead=f"{queue}:dead",
            dead_reasons=f"{queue}:dead:reasons",
        )


class ReliableQueue:
    """One worker's view of a queue: its shared list and its own private list."""

    def __init__(
        self, client: redis.Redis, queue: str, worker_id: str, use_blmove: bool | None = None
    ) -> None:
        self.client = client
        self.keys = Keys.of(queue, worker_id)
        self.worker_id = worker_id
        self._use_blmove = use_blmove
        self._promote = client.register_script(_PROMOTE_LUA)

    def fetch(self, timeout: float) -> bytes | None:
        """Block up to `timeout` seconds for the oldest message; move it to the private list."""
        if self._use_blmove is None:
            self._use_blmove = _server_version(self.client) >= (6, 2)
        k = self.keys
        if self._use_blmove:
            # redis-py types the timeout as int; Redis >= 6 takes fractional seconds.
            result = self.client.blmove(k.queue, k.processing, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
        else:  # BRPOPLPUSH takes whole seconds on servers older than 6.0
            result = self.client.brpoplpush(k.queue, k.processing, max(1, round(timeout)))
        return cast(bytes | None, result)

    def leftover(self) -> bytes | None:
        """The oldest message still in the private list, left by an earlier life, if any."""
        return cast(bytes | None, self.client.lindex(self.keys.processing, -1))

    def in_flight(self) -> list[bytes]:
        """The private list, oldest first."""
        return list(reversed(cast(list[bytes], self.client.lrange(self.keys.processing, 0, -1))))

    def count_delivery(self, message: bytes) -> int:
        """Record one more delivery of `message`, before its handler runs; return the total."""
        return int(self.client.hincrby(self.keys.deliveries, message, 1))

    def ack(self, message: bytes) -> bool:
        """Remove a handled message. False if it was no longer there (someone moved it)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.lrem(self.keys.processing, -1, message)  # type: ignore[arg-type]
        pipe.hdel(self.keys.deliveries, message)
        removed, _ = pipe.execute()
        return bool(removed)

    def retry_later(self, message: bytes, delay: float) -> None:
        """Park a failed message in the retry set for `delay` seconds; its count stays."""
        member = os.urandom(_NONCE_BYTES) + message  # identical payloads must not collapse
        pipe = self.client.pipeline(transaction=True)
        pipe.lrem(self.keys.processing, -1, message)  # type: ignore[arg-type]
        pipe.zadd(self.keys.retry, {member: time.time() + delay})
        pipe.execute()

    def dead_letter(self, message: bytes, reason: str, attempts: int) -> None:
        """Move a message that used up its deliveries to the dead list, keeping why."""
        info = {"reason": reason, "attempts": attempts, "at": time.time(), "worker": self.worker_id}
        key = digest(message)
        pipe = self.client.pipeline(transaction=True)
        pipe.lrem(self.keys.processing, -1, message)  # type: ignore[arg-type]
        pipe.lpush(self.keys.dead, message)
        pipe.hdel(self.keys.deliveries, message)
        pipe.hset(self.keys.dead_reasons, key, json.dumps(info))
        pipe.execute()

    def promote_due(self, limit: int = 100) -> int:
        """Move up to `limit` retries whose time has come back to the shared list."""
        args: list[Any] = [time.time(), limit, _NONCE_BYTES]
        return int(self._promote(keys=[self.keys.retry, self.keys.queue], args=args))

    def deliveries(self, message: bytes) -> int:
        value = self.client.hget(self.keys.deliveries, message)
        return int(cast(bytes, value)) if value is not None else 0

    def dead_reason(self, message: bytes) -> dict[str, Any] | None:
        value = self.client.hget(self.keys.dead_reasons, digest(message))
        info: dict[str, Any] | None = json.loads(cast(bytes, value)) if value else None
        return info


def _server_version(client: redis.Redis) -> tuple[int, ...]:
    info: dict[str, Any] = client.info("server")
    return tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])
