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
- `<queue>:op:<worker-id>`: the id of the worker's last settling operation (see `scripts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from rqworkers import scripts

# Connecting lives in `connections`; these two are imported from here too.
from rqworkers.connections import TRANSIENT_ERRORS as TRANSIENT_ERRORS
from rqworkers.connections import Client
from rqworkers.connections import connect as connect

_NONCE_BYTES = 8


@dataclass(frozen=True)
class Taken:
    """What `take` did: acks that found nothing, and the new messages with their counts."""

    missing_acks: int
    messages: list[tuple[bytes, int]]


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
    op: str

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
            op=f"{queue}:op:{worker_id}",
        )


class ReliableQueue:
    """One worker's view of a queue: its shared list and its own private list."""

    def __init__(
        self, client: Client, queue: str, worker_id: str, use_blmove: bool | None = None
    ) -> None:
        self.client = client
        self.keys = Keys.of(queue, worker_id)
        self.worker_id = worker_id
        self._use_blmove = use_blmove
        self._take = client.register_script(scripts.TAKE)
        self._replay = client.register_script(scripts.REPLAY)
        self._count_fetched = client.register_script(scripts.COUNT_FETCHED)
        self._give_back = client.register_script(scripts.GIVE_BACK)
        self._retry_later = client.register_script(scripts.RETRY_LATER)
        self._dead_letter = client.register_script(scripts.DEAD_LETTER)
        self._promote = client.register_script(scripts.PROMOTE)
        self._reclaim = client.register_script(scripts.RECLAIM)

    # -- the hot path -----------------------------------------------------------------------

    def take(self, acks: list[bytes], limit: int, op: str = "") -> Taken:
        """Ack `acks` and move up to `limit` messages to the private list, counted; one trip.

        `op`, if given, is recorded in the same step (see `last_op`).
        """
        k = self.keys
        keys = [k.queue, k.processing, k.deliveries, k.op]
        reply = self._take(keys=keys, args=[op, limit, *acks])
        return Taken(int(reply[0]), _pairs(reply[1:]))

    def last_op(self) -> str:
        """The id of the last settling operation that reached Redis for this worker."""
        value = self.client.get(self.keys.op)
        return value.decode() if isinstance(value, bytes) else str(value or "")

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

    def count_fetched(self, message: bytes) -> int | None:
        """`count_delivery` for what `fetch` just returned; None if it was reclaimed meanwhile."""
        k = self.keys
        count = int(self._count_fetched(keys=[k.processing, k.deliveries], args=[message]))
        return None if count < 0 else count

    def ack(self, message: bytes) -> bool:
        """Remove a handled message. False if it was no longer there (someone moved it)."""
        return self.take([message], 0).missing_acks == 0

    # -- leftovers, failures, stopping -------------------------------------------------------

    def replay(self, started: int | None) -> list[tuple[bytes, int]]:
        """The private list, oldest first, counted as described in `scripts.REPLAY`.

        `started` None: unknown, so every message counts as a new delivery.
        """
        k = self.keys
        args = [-1 if started is None else started]
        return _pairs(self._replay(keys=[k.processing, k.deliveries], args=args))

    def give_back(self, unstarted: list[bytes]) -> int:
        """Return prefetched messages, oldest first in `unstarted`, to the head of the queue."""
        k = self.keys
        newest_first = list(reversed(unstarted))
        return int(self._give_back(keys=[k.queue, k.processing, k.deliveries], args=newest_first))

    def retry_later(self, message: bytes, delay: float, op: str = "") -> bool:
        """Park a failed message in the retry set for `delay` seconds; its count stays."""
        member = os.urandom(_NONCE_BYTES) + message  # identical payloads must not collapse
        k = self.keys
        args: list[bytes | float | str] = [message, time.time() + delay, member, op]
        return bool(self._retry_later(keys=[k.processing, k.retry, k.op], args=args))

    def dead_letter(self, message: bytes, reason: str, attempts: int, op: str = "") -> bool:
        """Move a message that used up its deliveries to the dead list, keeping why."""
        info = {"reason": reason, "attempts": attempts, "at": time.time(), "worker": self.worker_id}
        k = self.keys
        keys = [k.processing, k.dead, k.deliveries, k.dead_reasons, k.op]
        args: list[bytes | str] = [message, digest(message), json.dumps(info), op]
        return bool(self._dead_letter(keys=keys, args=args))

    def promote_due(self, limit: int = 100) -> int:
        """Move up to `limit` retries whose time has come back to the shared list."""
        args: list[Any] = [time.time(), limit, _NONCE_BYTES]
        return int(self._promote(keys=[self.keys.retry, self.keys.queue], args=args))

    # -- leases and orphans -----------------------------------------------------------------

    def take_lease(self, ttl: float) -> None:
        """Claim this worker's lease and register its private list for orphan recovery.

        Taken before the worker replays anything, so that no reclaimer can move its
        leftovers while it is handling them. The keeper soon replaces the placeholder
        value with the worker's status.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.lease, json.dumps({"state": "starting"}), px=int(ttl * 1000))
        pipe.sadd(self.keys.registry, self.worker_id)
        pipe.execute()

    def reclaim(self, fence_ttl: float = 5.0) -> int | None:
        """Move this (dead) worker's messages back to the shared list.

        Returns how many moved, or None if the lease is alive or another manager holds the
        fence. Safe to call from any node at any time: the script checks the lease itself,
        so the fence only spares managers duplicate work, and its short TTL bounds the delay
        when a manager dies holding it.
        """
        k = self.keys
        if not self.client.set(k.fence, "1", nx=True, px=int(fence_ttl * 1000)):
            return None
        try:
            keys = [k.processing, k.queue, k.lease, k.registry]
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


def renew_leases(client: Client, leases: dict[tuple[str, str], str], ttl: float) -> None:
    """Renew the leases of (queue, worker id) pairs with their status values, in one trip.

    Each worker is registered again too: a node frozen past its TTL has had its workers
    reclaimed and struck from the registry, and once it resumes, its private lists must be
    findable again should it die for good later. No transaction: the keys may belong to
    several queues, hence several Cluster slots.
    """
    pipe = client.pipeline(transaction=False)
    for (queue, worker_id), value in leases.items():
        keys = Keys.of(queue, worker_id)
        pipe.set(keys.lease, value, px=int(ttl * 1000))
        pipe.sadd(keys.registry, worker_id)
    pipe.execute()


@dataclass(frozen=True)
class Snapshot:
    """A queue as `rqworkers status` shows it. Workers are the values of live leases."""

    waiting: int
    in_flight: int
    retrying: int
    dead: int
    workers: list[dict[str, Any]]


def snapshot(client: Client, queue: str) -> Snapshot:
    """Read a queue's lengths and its workers' published status in two round trips."""
    keys = Keys.of(queue, "")
    ids = registered_workers(client, queue)
    pipe = client.pipeline(transaction=False)
    pipe.llen(keys.queue)
    pipe.zcard(keys.retry)
    pipe.llen(keys.dead)
    for worker_id in ids:
        pipe.llen(Keys.of(queue, worker_id).processing)
        pipe.get(Keys.of(queue, worker_id).lease)
    waiting, retrying, dead, *rest = pipe.execute()
    in_flight = sum(int(n) for n in rest[0::2])
    workers = []
    for worker_id, raw in zip(ids, rest[1::2], strict=True):
        if raw is None:
            continue
        try:
            info = json.loads(raw)
        except ValueError:  # a lease written by something else: show what we can
            info = {"name": worker_id}
        if isinstance(info, dict):
            workers.append({"worker_id": worker_id, **info})
    return Snapshot(int(waiting), in_flight, int(retrying), int(dead), workers)


def registered_workers(client: Client, queue: str) -> list[str]:
    """Worker ids that have had a private list for `queue`, read with SSCAN."""
    ids = client.sscan_iter(Keys.of(queue, "").registry, count=100)
    return sorted(i.decode() if isinstance(i, bytes) else str(i) for i in ids)


def lease_alive(client: Client, queue: str, worker_id: str) -> bool:
    return bool(client.exists(Keys.of(queue, worker_id).lease))


@dataclass(frozen=True)
class DeadLetter:
    index: int  # 0 is the newest
    payload: bytes
    info: dict[str, Any] | None  # reason, attempts, at, worker


class DeadLetters:
    """The dead-letter list of one queue, as operators handle it."""

    def __init__(self, client: Client, queue: str) -> None:
        self.client = client
        self.keys = Keys.of(queue, "")
        self._take = client.register_script(scripts.DEAD_TAKE)

    def __len__(self) -> int:
        return int(self.client.llen(self.keys.dead))

    def page(self, start: int = 0, limit: int = 20) -> list[DeadLetter]:
        """Up to `limit` dead letters from index `start` (0 is the newest)."""
        payloads = cast(list[bytes], self.client.lrange(self.keys.dead, start, start + limit - 1))
        return self._with_info(start, payloads)

    def oldest(self, limit: int) -> list[DeadLetter]:
        """The `limit` oldest dead letters, newest of them first."""
        total = len(self)
        start = max(0, total - limit)
        return self.page(start, total - start)

    def get(self, index: int) -> DeadLetter | None:
        payload = cast(bytes | None, self.client.lindex(self.keys.dead, index))
        return None if payload is None else self._with_info(index, [payload])[0]

    def requeue(self, letters: list[DeadLetter]) -> int:
        """Move `letters` (newest first) to the head of the queue, oldest first in line."""
        return self._take_out("requeue", letters)

    def purge(self, letters: list[DeadLetter]) -> int:
        return self._take_out("purge", letters)

    def _take_out(self, mode: str, letters: list[DeadLetter]) -> int:
        if not letters:
            return 0
        k = self.keys
        args: list[bytes | str] = [mode]
        for letter in letters:
            args += [letter.payload, digest(letter.payload)]
        keys = [k.dead, k.queue, k.deliveries, k.dead_reasons]
        return int(self._take(keys=keys, args=args))

    def _with_info(self, start: int, payloads: list[bytes]) -> list[DeadLetter]:
        if not payloads:
            return []
        raw = self.client.hmget(self.keys.dead_reasons, [digest(p) for p in payloads])
        letters = []
        for offset, (payload, info) in enumerate(zip(payloads, cast(list[Any], raw), strict=True)):
            parsed = json.loads(info) if info else None
            letters.append(DeadLetter(start + offset, payload, parsed))
        return letters
