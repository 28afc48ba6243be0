"""Delayed messages: pushed into a queue's retry set, due at a time, and what an operator
does with them there.

A delayed message is a member of `<queue>:retry` like a retry: an envelope with attempts 0
and an id of its own, `p<128 random bits>.<n>` (one dot: never a worker's
`<process>.<call>.<n>`, nor a reclaim's `x<worker>.<n>`), scored by its due time. The take
that finds it due moves it into a private list in the same script that removes it from the
set, so it is delivered once, like any message, whatever the number of workers and managers,
and across a Redis restart with AOF (the set is an ordinary key). Its due time is the
producer's clock, compared with the worker's: their clocks must agree (NTP).

An idle worker blocks on the shared list until the next due time it was told; a delayed
message due sooner than everything the set held nudges one blocked worker awake (see
lua/envelope.lua), so it is taken when due, not up to a block later.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from rqworkers.store import dedup, levels, scripts
from rqworkers.store.connections import Client
from rqworkers.store.direct import script_caller
from rqworkers.store.keys import Keys
from rqworkers.store.queue import Bound, Delivery

MAX_PER_CALL = 1000  # payloads per DELAY call: a bounded script run
MAX_PER_PUSH = 10**8  # their ids count on 8 digits
DELAYED_ID = b"p"  # the first letter of a delayed message's id


@dataclass(frozen=True)
class Scheduled:
    """A member of the retry set: a delayed message or a retry, due at `due`, or a
    prioritised message waiting at its level (`delivery.level`), due at once."""

    delivery: Delivery
    due: float | None  # epoch seconds; None for a prioritised message that waits
    member: bytes  # its envelope, which `run_now` and `delete` name

    @property
    def delayed(self) -> bool:
        """Pushed with a delay, rather than a failed message waiting for its retry."""
        return self.delivery.id.startswith(DELAYED_ID) and self.delivery.attempts == 0

    @classmethod
    def of(cls, member: bytes, score: float) -> Scheduled:
        return cls(Delivery.parse(member), levels.due_of_score(score), member)


class DelayedPusher:
    """Pushes delayed and prioritised messages onto the retry sets of one client's queues,
    one script call per batch."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._runner = script_caller(client, False)
        self._bound: dict[str, Bound[int]] = {}

    def push(
        self, queue: str, payloads: Sequence[bytes | str], due: float | None, level: int = 0
    ) -> tuple[int, list[bytes]]:
        """Add `payloads` to `queue`'s retry set, due at `due` (epoch seconds; None: at
        once, for a priority `level` of 1 to 9), in order, in `level`'s band; the set's
        size after, and their envelopes (the members `Scheduled.member` names), which a
        caller may ZREM."""
        bound = self._bound.get(queue)
        if bound is None:
            bound = self._bound[queue] = Bound(self._runner, Keys(queue), scripts.DELAY)
        if len(payloads) > MAX_PER_PUSH:
            raise ValueError(f"at most {MAX_PER_PUSH} delayed messages per push")
        members: list[bytes] = []
        size = 0
        if due is None:  # waiting at its level, in the order pushed
            score: float = levels.waiting_score(level)
            idbase = levels.waiting_id_base(secrets.token_hex(8))
        else:
            score = levels.due_score(level, due)
            idbase = f"p{secrets.token_hex(16)}."
        for start in range(0, len(payloads), MAX_PER_CALL):
            chunk = payloads[start : start + MAX_PER_CALL]
            batch = [levels.wrap(level, p.encode() if isinstance(p, str) else p) for p in chunk]
            token = scripts.new_nudge_token()
            size = bound(due=repr(score), idbase=idbase, offset=start, token=token, payloads=batch)
            members += [
                Delivery(b"%s%08d" % (idbase.encode(), n), 0, payload).element
                for n, payload in enumerate(batch, start + 1)
            ]
        return size, members


class RetrySet:
    """One queue's retry set as an operator sees it: `rqworkers scheduled`."""

    def __init__(self, client: Client, queue: str) -> None:
        self.client = client
        self.keys = Keys(queue)
        self._run_now = Bound(script_caller(client, False), self.keys, scripts.RUN_NOW)

    def __len__(self) -> int:
        return int(self.client.zcard(self.keys.retry))

    def next_due(self) -> float | None:
        """When the soonest member is due (epoch seconds); None if the set is empty, or
        holds only prioritised messages waiting (due at once)."""
        first = cast(
            list[tuple[bytes, float]], self.client.zrange(self.keys.retry, 0, 0, withscores=True)
        )
        if first and first[0][1] < 0:  # prioritised messages: see `levels`
            return levels.read_bands(self.client, self.keys.retry).next_due
        return float(first[0][1]) if first else None  # fmt: skip

    def page(self, start: int = 0, limit: int = 20) -> list[Scheduled]:
        """Up to `limit` members from index `start`, in the order they will be taken:
        soonest first; with priorities, highest level first."""
        if limit <= 0:
            return []
        raw = self.client.zrange(self.keys.retry, start, start + limit - 1, withscores=True)
        found = []
        for member, score in cast(list[tuple[bytes, float]], raw):
            if member.startswith(scripts.PREFIX.encode()) and member.count(b":") >= 3:
                found.append(Scheduled.of(member, float(score)))
        return found

    def find(self, ids: Sequence[str]) -> list[Scheduled]:
        """The members whose delivery ids are `ids` (as `list` shows them), those still there."""
        wanted = {i.encode() for i in ids}
        found = []
        for member, score in self.client.zscan_iter(self.keys.retry, count=1000):
            member = cast(bytes, member)
            if member.startswith(scripts.PREFIX.encode()) and member.count(b":") >= 3:
                item = Scheduled.of(member, float(score))
                if item.delivery.id in wanted:
                    found.append(item)
        return found

    def run_now(self, members: Sequence[bytes]) -> int:
        """Make `members` due now, and wake a worker for them; how many were still there."""
        if not members:
            return 0
        token = scripts.new_nudge_token()
        return self._run_now(now=repr(time.time()), token=token, members=members)

    def delete(self, members: Sequence[bytes]) -> int:
        """Remove `members`; how many were still there (a worker may have taken some). The
        deduplication key a removed one held is freed, as its ack would: it is no longer
        waiting, scheduled or running, so a push with its key must be enqueued."""
        pipe = self.client.pipeline(transaction=False)  # one round trip, one answer each
        for member in members:
            pipe.zrem(self.keys.retry, member)
        removed = [m for m, gone in zip(members, pipe.execute(), strict=True) if gone]
        for member in removed:
            held = Delivery.parse(member).dedup
            if held is not None:
                dedup.release(self.client, self.keys.queue_name, *held)
        return len(removed)
