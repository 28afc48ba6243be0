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
- `<queue>:workers`: set of worker ids that have had a private list (the reclaim registry).
- `<queue>:lease:<worker-id>`: string with a TTL, alive while the worker's node is.
- `<queue>:reclaim:<worker-id>`: short fence so that only one manager reclaims a list.
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

from rqworkers import scripts

# Errors after which the connection is suspect and the worker should back off and retry.
# ResponseError covers OOM/READONLY/NOPERM/LOADING replies: the command did nothing.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ResponseError,
)

_NONCE_BYTES = 8


@dataclass(frozen=True)
class Taken:
    """What `take` did: acks that found nothing, and the new messages with their counts."""

    missing_acks: int
    messages: list[tuple[bytes, int]]


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
    registry: str
    lease: str
    fence: str

    @classmethod
    def of(cls, queue: str, worker_id: str) -> Keys:
        return cls(
            queue=queue,
            processing=f"{queue}:processing:{worker_id}",
            deliveries=f"{queue}:deliveries",
            retry=f"{queue}:retry",
            dead=f"{queue}:dead",
            dead_reasons=f"{queue}:dead:reasons",
            registry=f"{queue}:workers",
            lease=f"{queue}:lease:{worker_id}",
            fence=f"{queue}:reclaim:{worker_id}",
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
        self._take = client.register_script(scripts.TAKE)
        self._replay = client.register_script(scripts.REPLAY)
        self._give_back = client.register_script(scripts.GIVE_BACK)
        self._retry_later = client.register_script(scripts.RETRY_LATER)
        self._dead_letter = client.register_script(scripts.DEAD_LETTER)
        self._promote = client.register_script(scripts.PROMOTE)
        self._reclaim = client.register_script(scripts.RECLAIM)

    # -- the hot path -----------------------------------------------------------------------

    def take(self, acks: list[bytes], limit: int) -> Taken:
        """Ack `acks` and move up to `limit` messages to the private list, counted; one trip."""
        k = self.keys
        reply = self._take(keys=[k.queue, k.processing, k.deliveries], args=[limit, *acks])
        return Taken(int(reply[0]), _pairs(reply[1:]))

    def fetch(self, timeout: float) -> bytes | None:
        """Block up to `timeout` seconds for the oldest message; move it to the private list.

        Not counted: call `count_delivery`. Used only when `take` found the queue empty.
        """
        k = self.keys
        if self._use_blmove is not False:
            try:
                # redis-py types the timeout as int; Redis >= 6 takes fractional seconds.
                result = self.client.blmove(k.queue, k.processing, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
                self._use_blmove = True
                return cast(bytes | None, result)
            except redis.ResponseError as exc:
                # Servers before 6.2 know no BLMOVE. Found out by asking, not by INFO, which
                # an ACL may forbid; the error is not an outage, so it is handled here.
                if self._use_blmove or "unknown command" not in str(exc).lower():
                    raise
                self._use_blmove = False
        # BRPOPLPUSH takes whole seconds on servers older than 6.0
        result = self.client.brpoplpush(k.queue, k.processing, max(1, round(timeout)))
        return cast(bytes | None, result)

    def count_delivery(self, message: bytes) -> int:
        """Record one more delivery of `message`, before its handler runs; return the total."""
        return int(self.client.hincrby(self.keys.deliveries, message, 1))

    def ack(self, message: bytes) -> bool:
        """Remove a handled message. False if it was no longer there (someone moved it)."""
        return self.take([message], 0).missing_acks == 0

    # -- leftovers, failures, stopping -------------------------------------------------------

    def replay(self, started: int) -> list[tuple[bytes, int]]:
        """The private list, oldest first, counted as described in `scripts.REPLAY`."""
        k = self.keys
        return _pairs(self._replay(keys=[k.processing, k.deliveries], args=[started]))

    def give_back(self, unstarted: list[bytes]) -> int:
        """Return prefetched messages, oldest first in `unstarted`, to the head of the queue."""
        k = self.keys
        newest_first = list(reversed(unstarted))
        return int(self._give_back(keys=[k.queue, k.processing, k.deliveries], args=newest_first))

    def retry_later(self, message: bytes, delay: float) -> bool:
        """Park a failed message in the retry set for `delay` seconds; its count stays."""
        member = os.urandom(_NONCE_BYTES) + message  # identical payloads must not collapse
        k = self.keys
        args: list[bytes | float] = [message, time.time() + delay, member]
        return bool(self._retry_later(keys=[k.processing, k.retry], args=args))

    def dead_letter(self, message: bytes, reason: str, attempts: int) -> bool:
        """Move a message that used up its deliveries to the dead list, keeping why."""
        info = {"reason": reason, "attempts": attempts, "at": time.time(), "worker": self.worker_id}
        k = self.keys
        keys = [k.processing, k.dead, k.deliveries, k.dead_reasons]
        return bool(self._dead_letter(keys=keys, args=[message, digest(message), json.dumps(info)]))

    def promote_due(self, limit: int = 100) -> int:
        """Move up to `limit` retries whose time has come back to the shared list."""
        args: list[Any] = [time.time(), limit, _NONCE_BYTES]
        return int(self._promote(keys=[self.keys.retry, self.keys.queue], args=args))

    # -- leases and orphans -----------------------------------------------------------------

    def take_lease(self, owner: str, ttl: float) -> None:
        """Claim this worker's lease and register its private list for orphan recovery.

        Taken before the worker replays anything, so that no reclaimer can move its
        leftovers while it is handling them.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.lease, owner, px=int(ttl * 1000))
        pipe.sadd(self.keys.registry, self.worker_id)
        pipe.execute()

    def reclaim(self, fence_ttl: float = 60.0) -> int | None:
        """Move this (dead) worker's messages back to the shared list.

        Returns how many moved, or None if the lease is alive or another manager holds the
        fence. Safe to call from any node at any time.
        """
        k = self.keys
        if not self.client.set(k.fence, "1", nx=True, px=int(fence_ttl * 1000)):
            return None
        try:
            keys = [k.processing, k.queue, k.deliveries, k.lease, k.registry]
            moved = int(self._reclaim(keys=keys, args=[self.worker_id]))
        finally:
            self.client.delete(k.fence)
        return None if moved < 0 else moved

    # -- reading ----------------------------------------------------------------------------

    def in_flight(self) -> list[bytes]:
        """The private list, oldest first."""
        return list(reversed(cast(list[bytes], self.client.lrange(self.keys.processing, 0, -1))))

    def deliveries(self, message: bytes) -> int:
        value = self.client.hget(self.keys.deliveries, message)
        return int(cast(bytes, value)) if value is not None else 0

    def dead_reason(self, message: bytes) -> dict[str, Any] | None:
        value = self.client.hget(self.keys.dead_reasons, digest(message))
        info: dict[str, Any] | None = json.loads(cast(bytes, value)) if value else None
        return info


def _pairs(flat: list[Any]) -> list[tuple[bytes, int]]:
    return [(bytes(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def renew_leases(client: redis.Redis, leases: list[str], owner: str, ttl: float) -> None:
    """Extend the given lease keys in one round trip (no transaction: keys may span slots)."""
    pipe = client.pipeline(transaction=False)
    for key in leases:
        pipe.set(key, owner, px=int(ttl * 1000))
    pipe.execute()


def registered_workers(client: redis.Redis, queue: str) -> list[str]:
    """Worker ids that have had a private list for `queue`, read with SSCAN."""
    ids = client.sscan_iter(Keys.of(queue, "").registry, count=100)
    return sorted(i.decode() if isinstance(i, bytes) else str(i) for i in ids)


def lease_alive(client: redis.Redis, queue: str, worker_id: str) -> bool:
    return bool(client.exists(Keys.of(queue, worker_id).lease))
