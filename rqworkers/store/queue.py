"""Every Redis operation on a queue's lists, in one place.

The invariant everything else rests on:

    Every message is, at every instant, in exactly one key: the shared list, one landing
    list, one private list, the retry set or the dead list. Inside a worker's keys it is an
    envelope `rqw1:<id>:<attempts>:<payload>`, unique per delivery, whose `attempts` counts
    the deliveries of this one message that ended without a result, or a member of a
    segment at the bottom of a private list, whose id and attempts (0) its place gives
    (see lua/envelope.lua). Identical payloads are therefore independent messages: nothing
    is keyed by a payload's bytes except dead-letter records, which keep one record per copy.

A message only ever moves atomically, in one Lua script (`scripts`): shared list → private
list (take), private list → nowhere (ack), → retry set (retry later) or → dead list. The
count is not written when a message is taken: the hot path is the move and the ack, no more.
A delivery that ends without a result is charged where it is found afterwards, by whoever
meets it: the next worker of the slot charges what the scoreboard says had reached the
handler when its predecessor died (finished but unsettled deliveries included, whatever the
exit); a keeper reclaiming a lost node's list charges everything in it, because nobody
knows what ran there.

The keys, their types and what each holds are declared once, in `keys` (and shown in
docs/redis-keys.md): all start with the queue name, so that a `{hash tag}` in it keeps
them in one Redis Cluster slot. `<queue>:owner:<worker-id>` names the process (its id
prefix) that last replayed the private list. Only it may take into the list: a second
process on the same worker id (two managers sharing a node name) is refused, rather than
having its messages mixed into the list of another, which acks by trimming the list's
oldest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import operator
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import redis

from rqworkers.errors import Superseded
from rqworkers.store import levels, scripts

# Connecting lives in `connections`; these two are imported from here too.
from rqworkers.store.connections import Client
from rqworkers.store.connections import connect as connect
from rqworkers.store.direct import Call, runner_for, script_caller
from rqworkers.store.fast import FastAck, FastPath, fast_lists
from rqworkers.store.flow import (
    NO_LIMITS,
    PERMIT_HOLD,
    FlowState,
    Groups,
    Limits,
    flow_reader,
    flow_state,
    group_states,
)

# The keys are declared in `keys`; imported from here too.
from rqworkers.store.keys import Keys as Keys
from rqworkers.store.scripts import Held

_PREFIX = scripts.PREFIX.encode()
DEDUP_HEAD = _PREFIX + b"dedup:"  # a payload pushed with a deduplication key (`dedup`)
_wrapped = operator.methodcaller("startswith", _PREFIX)  # what `Delivery` unwraps
R = TypeVar("R")
_DEDUP_TOKEN = re.compile(rb"[0-9a-f]{32}")
_HEX = re.compile(rb"(?:[0-9a-f]{2})+")


def wrap_dedup(token: str, key: str, payload: bytes) -> bytes:
    """`payload` as pushed under a deduplication key: `rqw1:dedup:<token>:<key hex>:<payload>`."""
    return b"%s%s:%s:%s" % (DEDUP_HEAD, token.encode(), key.encode().hex().encode(), payload)


def unwrap_dedup(payload: bytes) -> tuple[bytes, str, str] | None:
    """(payload, token, key) of a payload `wrap_dedup` made; None for any other bytes, a
    producer's payload that merely starts like one included."""
    parts = payload[len(DEDUP_HEAD) :].split(b":", 2)
    # As lua/envelope.lua's `bare` reads it: 32 hex digits, then an even number of them.
    if len(parts) != 3 or not _DEDUP_TOKEN.fullmatch(parts[0]) or not _HEX.fullmatch(parts[1]):
        return None
    key = bytes.fromhex(parts[1].decode()).decode("utf-8", "replace")
    return parts[2], parts[0].decode(), key


class Delivery:
    """One delivery of a message: its id, unique per delivery, its count of earlier
    deliveries that ended without a result, and what it carries.

    `seq` orders one process's deliveries as they sit in its private list (take order),
    which lets in-order acks travel as one LTRIM. A plain class with slots, not a named
    tuple: a worker makes one per message, and its envelope is only built when needed.
    """

    __slots__ = (
        "_element", "attempts", "dedup", "fast", "group", "id", "level", "payload", "seq"
    )  # fmt: skip

    def __init__(
        self,
        id: bytes,
        attempts: int,
        payload: bytes,
        seq: int = 0,
        element: bytes = b"",
        fast: str = "",
    ) -> None:
        self.id = id
        self.attempts = attempts
        self.payload = payload
        self.seq = seq
        self._element = element
        # Taken by the fast path (see fast.py): the fast list it sits in, as the payload
        # it came as (its `element`), with no attempts behind it; '' for any other.
        self.fast = fast
        self.group: str | None = None  # with groups: its group, as TAKE names it (hex)
        # (token, key) of a message pushed with a deduplication key, which its handler
        # sees unwrapped, and whose key is freed once it is settled; else None.
        self.dedup: tuple[str, str] | None = None
        self.level = 0  # its priority level, which its payload carried (see `levels`)
        if payload.startswith(_PREFIX):  # a plain message pays this one comparison
            self._unwrap()

    def _unwrap(self) -> None:
        element = self.element  # the envelope holds what was pushed
        level, payload = levels.unwrap(self.payload)
        found = unwrap_dedup(payload) if payload.startswith(DEDUP_HEAD) else None
        if found is not None:
            payload, token, key = found
            self.dedup = (token, key)
        if level or found is not None:
            self._element, self.payload, self.level = element, payload, level

    @property
    def element(self) -> bytes:
        """The envelope in the private list, `rqw1:<id>:<attempts>:<payload>` (in the fast
        list, the payload as it came): what acks and moves name."""
        if not self._element and not self.fast:
            self._element = b"%s%s:%d:%s" % (_PREFIX, self.id, self.attempts, self.payload)
        return self._element

    @classmethod
    def parse(cls, element: bytes, seq: int = 0) -> Delivery:
        _, ident, attempts, payload = element.split(b":", 3)
        return cls(ident, int(attempts), payload, seq, element)

    def _key(self) -> tuple[bytes, int, bytes]:
        return self.id, self.attempts, self.payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Delivery) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Delivery(id={self.id!r}, attempts={self.attempts}, payload={self.payload!r})"


class Lot:
    """A lot: the deliveries of one take as TAKE replied them, before any `Delivery` is
    made. The n-th (from 1) has the id `prefix` + n and the seq `before` + n.

    A worker that runs a take's messages in order (`Worker.run_lot`) hands each payload to
    its handler as it sits here, and acks a run of them as one trim that names only the
    first and the last. At a prefetch of 100, making, holding and freeing a `Delivery` per
    message, and queueing each one's ack, were a quarter of a worker's own CPU. A
    `Delivery` is made for the ones something happens to (a failure, a retry's attempts, a
    wrapped payload), and whenever a reader asks for them all (`Batch` holds the unstarted
    rest of a lot; `Taken.deliveries`).
    """

    __slots__ = ("attempts", "before", "fast", "groups", "payloads", "plain", "prefix")

    def __init__(
        self,
        payloads: list[bytes],
        attempts: list[int],
        groups: list[str],
        prefix: bytes,
        before: int,
        fast: str = "",
    ) -> None:
        self.payloads = payloads
        self.attempts = attempts
        self.groups = groups
        self.prefix = prefix
        self.before = before
        # Taken by the fast path: the fast list its one delivery sits in, as it came (see
        # `Delivery.fast`); '' for a script's take.
        self.fast = fast
        # None has attempts, a group, or a payload `Delivery` would unwrap: each is its
        # payload, and nothing else (the checks run in C, once per take).
        self.plain = not (any(attempts) or groups or any(map(_wrapped, payloads)))

    def __len__(self) -> int:
        return len(self.payloads)

    def delivery(self, index: int) -> Delivery:
        """The delivery at `index` (from 0)."""
        payload = self.payloads[index]
        delivery = Delivery(
            self.prefix + b"%d" % (index + 1),
            self.attempts[index],
            payload,
            self.before + index + 1,
            payload if self.fast else b"",
            self.fast,
        )
        if index < len(self.groups):
            delivery.group = self.groups[index]
        return delivery

    def deliveries(self, start: int = 0, stop: int | None = None) -> list[Delivery]:
        """The deliveries from `start` to `stop` (indexes from 0, `stop` not included)."""
        stop = len(self.payloads) if stop is None else stop
        if stop <= start:
            return []
        if self.fast:
            return [self.delivery(index) for index in range(start, stop)]
        ids = [self.prefix + n for n in _counts(stop)[start:]]
        deliveries = list(
            map(
                Delivery,
                ids,
                self.attempts[start:stop],
                self.payloads[start:stop],
                range(self.before + start + 1, self.before + stop + 1),
            )
        )
        for delivery, group in zip(deliveries, self.groups[start:stop], strict=False):
            delivery.group = group
        return deliveries

    def element(self, index: int) -> bytes:
        """The envelope of the delivery at `index`, as an ack names it (`Delivery.element`)."""
        return self.delivery(index).element


class Taken:
    """What `take` did: acks that found nothing, the new deliveries, and when the next
    retry is due (epoch seconds; None if none is waiting, or the take was full).

    A script's take keeps its deliveries as `lot`, made into `Delivery` objects only
    when `deliveries` is first read (see `Lot`)."""

    __slots__ = ("_deliveries", "held", "lot", "missing_acks", "next_due")

    def __init__(
        self,
        missing_acks: int,  # -1: acks sent as a trim were not where claimed, nor removed
        deliveries: list[Delivery] | Lot,
        next_due: float | None,
        held: Held | None = None,  # what held the take back: the pause or a flow limit
    ) -> None:
        self.missing_acks = missing_acks
        self.next_due = next_due
        self.held = held
        self.lot: Lot | None = None
        self._deliveries: list[Delivery] | None = None
        if isinstance(deliveries, Lot):
            self.lot = deliveries
        else:
            self._deliveries = deliveries

    @property
    def deliveries(self) -> list[Delivery]:
        if self._deliveries is None:
            self._deliveries = cast(Lot, self.lot).deliveries()
        return self._deliveries

    @property
    def count(self) -> int:
        """How many deliveries it took."""
        lot = self.lot
        return len(lot.payloads) if lot is not None else len(self.deliveries)

    def missing(self, more: int) -> Taken:
        """The same take, with `more` acks that found nothing (unless its own were not
        removed at all: -1)."""
        if not more or self.missing_acks < 0:
            return self
        kept = self.lot if self.lot is not None else self.deliveries
        return Taken(self.missing_acks + more, kept, self.next_due, self.held)


def _unstarted_side(unstarted: bytes, process: str) -> str:
    """The fast list ('0' or '1') of `process` that the scoreboard's mark `unstarted`
    names as holding a take whose delivery never started ('' if it names none): the
    side of its take's number (`ReliableQueue._next_take_number`)."""
    head, _, rest = unstarted.partition(b".")
    number = rest.split(b".", 1)[0]
    if head.decode(errors="replace") != process or not number.isdigit():
        return ""
    return str(int(number) % 2)


# A segment's oldest member, in its marked envelope (see lua/envelope.lua).
_MARKED = re.compile(re.escape(_PREFIX) + rb"([^:]*?\.)(\d+)\+(\d+):0:(.*)", re.DOTALL)


def read_private_list(elements: list[bytes]) -> list[Delivery]:
    """The deliveries of a private list read whole (LRANGE 0 -1, newest first), oldest
    first: a segment's members as the envelopes a script would make them (`materialize` in
    lua/envelope.lua), elements that are not envelopes left out."""
    oldest_first = elements[::-1]
    listed: list[Delivery] = []
    found = _MARKED.fullmatch(oldest_first[0]) if oldest_first else None
    if found:
        base, first, last = found[1], int(found[2]), int(found[3])
        members = [found[4], *oldest_first[1 : last - first + 1]]
        listed = [Delivery(b"%s%d" % (base, first + i), 0, m) for i, m in enumerate(members)]
        oldest_first = oldest_first[last - first + 1 :]
    return listed + [Delivery.parse(e) for e in oldest_first if e.startswith(_PREFIX)]


# The counts a take's ids end in, 1 to 1,000, made once: joining two bytes costs less than
# formatting a number, and a busy take makes one id per message.
_COUNTS = tuple(b"%d" % n for n in range(1, 1001))


def _counts(count: int) -> Sequence[bytes]:
    """b"1" to b"<count>"."""
    return _COUNTS[:count] if count <= len(_COUNTS) else [b"%d" % n for n in range(1, count + 1)]


def digest(message: bytes) -> str:
    """The key of a payload in `<queue>:dead:reasons`. Identical payloads share it."""
    return hashlib.sha1(message, usedforsecurity=False).hexdigest()


class ReliableQueue:
    """One worker's view of a queue: its shared list and its own private list."""

    def __init__(
        self,
        client: Client,
        queue: str,
        worker_id: str,
        use_blmove: bool | None = None,
        keep_connection: bool = False,  # a worker's own queue: see `direct`
        limits: Limits = NO_LIMITS,
        level0_every: int = 0,
        fast_path: bool = False,  # take one at a time by native commands: see fast.py
    ) -> None:
        self.client = client
        self.limits = limits
        # Every `level0_every`-th take serves level 0 (its due retries, then the shared list)
        # first, so that a steady stream of prioritised messages cannot starve it; 0: strict
        # priorities.
        self.level0_every = level0_every
        self._takes = 0
        self.keys = Keys.of(queue, worker_id)
        self.worker_id = worker_id
        self._use_blmove = use_blmove
        # Delivery ids: unique per process (random) and per take (counted).
        self._id_prefix = os.urandom(6).hex()
        self._ids = 0
        self._seq = 0  # of the last delivery this process was handed (take order)
        self._runner = runner_for(client, keep_connection)
        runner = self._runner.bind
        self._lease = Bound(runner, self.keys, scripts.LEASE)
        self._take = Bound(runner, self.keys, scripts.TAKE)
        self._take_flow = Bound(runner, self.keys, scripts.TAKE_FLOW)
        self._pause_looked_up = -PAUSE_LOOKUP  # monotonic time of the last look
        self._was_paused = False
        self._give_back = Bound(runner, self.keys, scripts.GIVE_BACK)
        self._retry_later = Bound(runner, self.keys, scripts.RETRY_LATER)
        self._dead_letter = Bound(runner, self.keys, scripts.DEAD_LETTER)
        self._sort = Bound(runner, self.keys, scripts.SORT)
        self._ungroup = Bound(runner, self.keys, scripts.UNGROUP)
        # The fast path (prefetch 1), and the settling scripts for what it took, which sits
        # in the fast list: to them it is the private list.
        self.fast = FastPath(self.keys, self._id_prefix, self._runner.send_all)
        self._from_fast: dict[tuple[str, str], Bound[Any]] = {}  # see `_settling`
        self.fast_path = fast_path
        # Its replay put this process in `fast_owners`, where a successor or a reclaim
        # finds its fast lists: only then does it take into them.
        self._fast_found = False
        # The worker acks in take order: its acks are the oldest of the private list, sent
        # as one LTRIM (see `scripts.TAKE`), and a take of fresh messages into the empty list
        # may push them as a segment, without envelopes (see lua/envelope.lua). A worker that
        # settles out of order turns this off.
        self.acks_in_order = True
        # The private list's bottom may be a segment, as the last take that looked said:
        # its members are acked by the script's trim only, not by the fast path's LREMs.
        self._segment = False
        self._replay = Bound(runner, self.keys, scripts.REPLAY)
        self._reclaim = Bound(runner, self.keys, scripts.RECLAIM)

    def _id_base(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}.{self._ids}."

    def _next_take_number(self) -> int:
        """The number of the next take: a fast take goes into the fast list of its parity
        (`FastPath.take`), so a number of the parity of the list holding the delivery in
        hand is passed over. The scoreboard's mark then tells a replay which fast list
        holds a take that never started, and which a delivery that did (`_take_over`)."""
        n = self._ids + 1
        return n + 1 if self.fast.held_side == n % 2 else n

    # -- the hot path -----------------------------------------------------------------------

    def take(
        self,
        acks: list[bytes],
        limit: int,
        landed: bool = False,
        trim: int = 0,
        running: int = 0,
        mine: dict[str, int] | None = None,
        fast_acks: Sequence[FastAck] = (),
    ) -> Taken:
        """Ack the deliveries `acks` and `fast_acks` (of the private and the fast list) and
        take up to `limit` new ones, in one round trip; `landed`: a blocking fetch just
        landed one, to be taken first.

        `trim` > 0 says that the acks are the `trim` oldest of the private list, and `acks`
        holds only the oldest and the newest of them (see `scripts.TAKE`). `running`: this
        worker's deliveries that hold a `max_running` permit beside what this call takes
        (those in a handler and those taken, about to start); `mine`, the same by group
        (`Delivery.group`), for a queue with groups.

        One message at a time, with no limit, nothing to look for and nothing known to be
        due, is taken by the fast path (see fast.py); the rest by a script. With
        `level0_every`, every so many takes (that take anything) serve level 0 first: its
        due retries and delayed messages, then the shared list's oldest, before the levels;
        what it leaves room for is taken as usual by a second call."""
        if self.level0_every and limit > 0:
            self._takes += 1
            if self._takes % self.level0_every == 0:
                missing = self.fast.ack(fast_acks) if fast_acks else 0
                taken = self._take_level0_first(acks, limit, landed, trim, running, mine)
                return taken.missing(missing)
        return self._take_once(acks, limit, landed, trim, running, mine, time.time(), fast_acks)

    def _take_level0_first(
        self,
        acks: list[bytes],
        limit: int,
        landed: bool,
        trim: int,
        running: int,
        mine: dict[str, int] | None,
    ) -> Taken:
        """`take`, level 0 first: a take that counts only level 0's members of the retry
        set as due (a `now` below 0: see lua/take_core.lua's due_members), its due retries
        and delayed messages, then the shared list's oldest; then one for the room it left."""
        first = self._take_once(acks, limit, landed, trim, running, mine, -time.time())
        if len(first.deliveries) >= limit or first.held is not None:
            return first
        if not first.deliveries:  # its ids went unused: the second's first delivery gets
            self._ids -= 1  # `next_take_id`, which the scoreboard was told of
        held = dict(mine or {})
        for delivery in first.deliveries:
            if delivery.group is not None:
                held[delivery.group] = held.get(delivery.group, 0) + 1
        more = self._take_once(
            [], limit - len(first.deliveries), False, 0, running + len(first.deliveries),
            held if mine is not None else None, time.time(),
        )  # fmt: skip
        return Taken(
            first.missing_acks, first.deliveries + more.deliveries, more.next_due, more.held
        )

    def _take_once(
        self,
        acks: list[bytes],
        limit: int,
        landed: bool,
        trim: int,
        running: int,
        mine: dict[str, int] | None,
        now: float,
        fast_acks: Sequence[FastAck] = (),
    ) -> Taken:
        """`take`, counting as due what is due by `now` (epoch seconds)."""
        limits = self.limits
        if limits.grouper is not None and not limits.group_by:
            landed = self._sort_by_handler(limits.grouper, landed)
        self._ids = self._next_take_number() - 1
        base = self._id_base()
        plain = not (limits.any or limits.sorter or self._was_paused)
        look = plain and self._look_for_pause(landed)
        fast, missing = self.fast, 0
        # Not for a take that serves level 0 first (see `take`); the acks of what the
        # script took last go along, one LREM each (the one, at prefetch 1: a trim of 1).
        listed = acks[:1] if trim == 1 else acks
        ready = self._fast_found and limit == 1 and trim <= 1
        ready = ready and not (landed or look or self._segment)
        if plain and ready and now >= 0 and fast.ready(fast_acks):
            got = fast.take(fast_acks, listed, self._ids % 2)
            if not got.to_script:
                deliveries = self._fast_deliveries(base, got.payload)
                return Taken(got.missing_acks, deliveries, got.next_due)
            missing = got.missing_acks  # something is due: the script takes it
            acks, trim = [], 0  # sent
        elif fast_acks:
            missing = fast.ack(fast_acks)
        common = {
            "limit": limit,
            "now": now,
            "idbase": base,
            "landed": "1" if landed else "0",
            "worker_id": self.worker_id,
            "trim": trim,
            "segments": "1" if self.acks_in_order else "0",
            "acks": acks,
        }
        if not plain:
            reply = self._take_flow(**common, **self._flow_args(running, mine))
            self._was_paused = reply.held is not None and reply.held.reason == "paused"
            self._pause_looked_up = time.monotonic()  # TAKE_FLOW looks every time
        else:  # no limit, and a look for a pause at most once a second
            reply = self._take(**common, look="1" if look else "0")
            self._was_paused = reply.held is not None
        if reply.superseded:
            raise Superseded(f"{self.keys.processing} was taken over by another process")
        fast.note(reply.next_due)
        if reply.segment is not None:
            self._segment = reply.segment
        seq, count = self._seq, len(reply.payloads)
        self._seq += count
        if len(reply.attempts) != count:
            raise ValueError(f"TAKE replied {count} payloads and {len(reply.attempts)} attempts")
        lot = Lot(reply.payloads, reply.attempts, reply.groups, base.encode(), seq)
        next_due = reply.next_due
        if next_due is not None and next_due < 0:  # a level's band: not in due order
            next_due = levels.read_bands(self.client, self.keys.retry).next_due
        # A trim refused (-1) removed none of `acks`; the fast acks went all the same.
        missed = reply.missing_acks if reply.missing_acks < 0 else reply.missing_acks + missing
        return Taken(missed, lot, next_due, reply.held)

    def _fast_deliveries(self, base: str, payload: bytes | None) -> Lot | list[Delivery]:
        """The delivery of a fast take, with the id a script's first would have had (the
        one `next_take_id` names to the scoreboard), as a lot of one; none if it took
        nothing."""
        if payload is None:
            return []
        self._seq += 1
        held = cast(str, self.fast.held)
        return Lot([payload], [0], [], base.encode(), self._seq - 1, fast=held)

    def _look_for_pause(self, landed: bool) -> bool:
        """Whether this take should look for a pause: at most once a second, and whenever a
        blocking fetch landed a message. A queue without limits takes through the plain
        TAKE, so that its hot path pays for pausing only then; once paused, its takes go
        through TAKE_FLOW, which looks every time, until one finds it resumed."""
        now = time.monotonic()
        if landed or now >= self._pause_looked_up + PAUSE_LOOKUP:
            self._pause_looked_up = now
            return True
        return False

    def paused_now(self) -> bool:
        """Whether the queue is paused, for a worker between two messages of a batch it
        took before the pause: as the last take found it, or, when none has looked for a
        second (PAUSE_LOOKUP), as one EXISTS finds it now. A pause must
        stop every start within about a second, prefetched messages' too."""
        now = time.monotonic()
        if now >= self._pause_looked_up + PAUSE_LOOKUP:
            self._pause_looked_up = now
            self._was_paused = bool(self.client.exists(self.keys.paused))
        return self._was_paused

    def _flow_args(self, running: int, mine: dict[str, int] | None) -> dict[str, Any]:
        """TAKE_FLOW's arguments beyond TAKE's: the limits, and what this worker holds."""
        limits = self.limits
        return {
            "max_running": limits.max_running,
            "running": running,
            "rate": limits.rate.starts if limits.rate else 0,
            "window": limits.window_ms,
            "group_by": limits.group_by,
            "sorter": limits.sorter,
            "group_max": limits.group_max_running,
            "group_rate": limits.group_rate.starts if limits.group_rate else 0,
            "group_window": limits.group_window_ms,
            "group_prefix": self.keys.group_list,
            "starts_prefix": self.keys.group_starts,
            "mine": json.dumps(mine or {}),
        }

    def fetch(self, timeout: float) -> bool:
        """Block up to `timeout` seconds for a message; True once one has landed.

        The blocking move lands it in this worker's landing list, not the private list: only
        a script can wrap it in an envelope, and the next `take` does.
        """
        k = self.keys
        if self._use_blmove is not False:
            try:
                # redis-py types the timeout as int; Redis >= 6 takes fractional seconds.
                result = self.client.blmove(k.queue, k.landing, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
                self._use_blmove = True
                return result is not None
            except redis.ResponseError as exc:
                # Servers before 6.2 know no BLMOVE. Found out by asking, not by INFO, which
                # an ACL may forbid; the error is not an outage, so it is handled here.
                if self._use_blmove or "unknown command" not in str(exc).lower():
                    raise
                self._use_blmove = False
        # BRPOPLPUSH takes whole seconds on servers older than 6.0
        result = self.client.brpoplpush(k.queue, k.landing, max(1, round(timeout)))
        return result is not None

    def ungroup(self) -> None:
        """For a queue without groups: put what waits in the groups' lists, sorted there
        while it had groups (before a reload that removed them), back at the tail of the
        shared list, where the plain take finds it."""
        while self._ungroup(group_prefix=self.keys.group_list, most=UNGROUP_BATCH):
            pass

    def _sort_by_handler(self, group: Callable[[bytes], str], landed: bool) -> bool:
        """Put messages in their groups' turns by the handler's `group()` (SORT): the
        oldest of the shared list, what a blocking fetch landed, and due retries not yet
        sorted. Returns whether a landed message is still for TAKE to see (SORT found it
        moved, say): TAKE then puts it in the default group's turn."""
        k = self.keys
        if landed:
            element = cast(bytes | None, self.client.lindex(k.landing, -1))
            if element is not None:
                landed = not self._sort(group_prefix=k.group_list, source="landing",
                                        items=_tagged([element], group))  # fmt: skip
        oldest_last = cast(list[bytes], self.client.lrange(k.queue, -SORT_BATCH, -1))
        if oldest_last:
            items = _tagged(oldest_last[::-1], group)
            self._sort(group_prefix=k.group_list, source="queue", items=items)
        due = cast(list[bytes], self.client.zrangebyscore(k.retry, "-inf", time.time(), 0, 100))
        untagged = [(m, p) for m in due for tagged, p in [_retry_payload(m)] if not tagged]
        if untagged:
            items = [x for m, p in untagged for x in (m, _hex_group(group, p))]
            self._sort(group_prefix=k.group_list, source="retry", items=items)
        return landed

    def wait_for_wake(self, timeout: float) -> bool:
        """Block up to `timeout` seconds for a permit given back or a resume (the `wake`
        list); True if woken before then."""
        return self.client.blpop([self.keys.wake], timeout) is not None

    def ack(self, delivery: Delivery) -> bool:
        """Remove a handled delivery. False if it was no longer there (someone moved it)."""
        if delivery.fast:
            return self.fast.ack([(delivery.fast, delivery.element)]) == 0
        return self.take([delivery.element], 0).missing_acks == 0

    # -- leftovers, failures, stopping -------------------------------------------------------

    def replay(
        self,
        charge_before: bytes | None,
        hold_permits: float = 0.0,
        may_run: bool = True,
        spared: Sequence[bytes] = (),
    ) -> list[Delivery]:
        """The private list, oldest first, after charging the deliveries that had started.

        `charge_before`: the id of the oldest delivery an earlier life of this worker left
        unstarted (its scoreboard's `first_unstarted`): each delivery older than it is
        charged one attempt, every one when no delivery has that id (b"": all had started,
        or nobody knows). None: this process's own list, after a Redis error: nothing is
        charged. `hold_permits`: seconds the earlier life's `max_running` permits stay
        counted, when its end was not seen (it may run on, orphaned: see `PERMIT_HOLD`).
        `may_run`: an earlier process may still run (its end was not seen), so its fast
        lists are sealed, not deleted (see fast.py): a seal is a key that lasts a day.
        `spared`: the `owner_name`s of earlier lives that died in their own replay (see
        `Scoreboard.replay_interrupted`): what carries their ids was charged already.
        """
        # First what fast lists hold, into the private list: an earlier process's (charged
        # if started), or after a Redis error this process's own (see fast.py: what is
        # still there is in hand, uncharged).
        for process in self._fast_owners():
            own = process == self._id_prefix
            charge = charge_before is not None and not own
            unstarted = _unstarted_side(charge_before or b"", process)
            self._take_over(process, "private", charge, unstarted, seal=may_run and not own)
        self.fast.forget()
        reply = self._replay(
            charge="0" if charge_before is None else "1",
            unstarted=charge_before or b"",
            idbase=self._id_base(),
            mine=f"{self._id_prefix}.",
            worker_id=self.worker_id,
            hold=int(hold_permits * 1000),
            fast="1" if self.fast_path else "0",
            spared=b",".join(spared),
        )
        self._fast_found = self.fast_path
        self._segment = False  # the replay made its members envelopes
        seq = self._seq
        self._seq += len(reply)
        return [Delivery.parse(element, seq + n) for n, element in enumerate(reply, 1)]

    def _fast_owners(self) -> list[str]:
        """The processes of this worker whose fast lists may hold deliveries."""
        # On the worker's kept connection, as its scripts: no other need be opened.
        [members] = self._runner.send_all([("SMEMBERS", self.keys.fast_owners)])
        if isinstance(members, Exception):
            raise members
        return sorted(m.decode(errors="replace") for m in members)

    def _take_over(
        self, process: str, to: str, charge: bool, unstarted: str, seal: bool
    ) -> scripts.TakenOver:
        """Move what `process`'s fast lists hold `to` the private list or the retry set."""
        keys = Keys(self.keys.queue_name, self.worker_id, process)
        return Bound(self._runner.bind, keys, scripts.TAKE_OVER)(
            process=process,
            to=to,
            charge="1" if charge else "0",
            unstarted=unstarted,
            idbase=self._id_base(),
            token=scripts.new_nudge_token(),
            seal="1" if seal else "0",
        )

    def _settling(self, script: scripts.Script[R], fast_list: str) -> Bound[R]:
        """`script` bound to this queue's keys, with `fast_list` (if any) as the private
        list: what settles a delivery the fast path took works on the fast list it is in."""
        if not fast_list:
            return Bound(self._runner.bind, self.keys, script)
        bound = self._from_fast.get((script.name, fast_list))
        if bound is None:
            keys = self.keys.but(processing=fast_list)
            bound = self._from_fast[script.name, fast_list] = Bound(self._runner.bind, keys, script)
        return bound

    @property
    def owner_name(self) -> bytes:
        """What `<queue>:owner:<worker-id>` holds while this process owns the private list."""
        return f"{self._id_prefix}.".encode()

    @property
    def next_take_id(self) -> bytes:
        """The id the next `take` gives its first delivery, should it take one."""
        return f"{self._id_prefix}.{self._next_take_number()}.1".encode()

    def give_back(self, unstarted: list[Delivery]) -> int:
        """Return deliveries that never reached the handler, oldest first in `unstarted`,
        to the head of the queue; those with attempts behind them keep their count."""
        moved = 0
        for fast_list in dict.fromkeys(d.fast for d in unstarted):
            elements = [d.element for d in reversed(unstarted) if d.fast == fast_list]
            give_back = self._settling(scripts.GIVE_BACK, fast_list) if fast_list else None
            moved += self.fast.settling(
                give_back or self._give_back, idbase=f"g{self._id_base()}", envelopes=elements
            )
            self.fast.settled(fast_list)
        return moved

    def retry_later(self, delivery: Delivery, delay: float) -> bool:
        """Park a failed delivery for `delay` seconds with one more attempt counted, in
        its priority level's band."""
        retry_later = self._retry_later
        if delivery.fast:
            self.fast.settled(delivery.fast)  # once sent; resent, should the reply be lost
            retry_later = self._settling(scripts.RETRY_LATER, delivery.fast)
        return self.fast.settling(
            retry_later,
            element=delivery.element,
            due=repr(levels.due_score(delivery.level, time.time() + delay)),
            member_id=self._id_base(),
            attempts=delivery.attempts + 1,
        )

    def dead_letter(self, delivery: Delivery, record: dict[str, Any]) -> bool:
        """Move a delivery that used up its attempts to the dead list, with its record
        (reason, attempts, ...); this worker, the time and the delivery id are added."""
        info = {**record, "id": delivery.id.decode(), "at": time.time(), "worker": self.worker_id}
        if delivery.level:
            info["priority"] = delivery.level
        # Raw UTF-8, not \u escapes: Lua's cjson refuses an escaped lone surrogate, which an
        # exception about undecodable bytes may hold; each becomes "?" here.
        text = json.dumps(info, ensure_ascii=False).encode("utf-8", "replace")
        dead_letter = self._dead_letter
        if delivery.fast:
            self.fast.settled(delivery.fast)
            dead_letter = self._settling(scripts.DEAD_LETTER, delivery.fast)
        return self.fast.settling(
            dead_letter, element=delivery.element, digest=digest(delivery.payload), record=text
        )

    # -- leases and orphans -----------------------------------------------------------------

    def hold_lease(self, ttl: float) -> None:
        """Claim this worker's lease and register its private list for orphan recovery.

        Taken before the worker replays anything, so that no reclaimer can move its
        leftovers while it is handling them. The keeper soon replaces the placeholder
        value with the worker's status.
        """
        self._lease(
            value=json.dumps({"state": "starting"}),
            ttl=int(ttl * 1000),
            worker_id=self.worker_id,
            register="1",
        )

    def reclaim(
        self, unstarted: bytes = b"", fence_ttl: float = 5.0, spared: Sequence[bytes] = ()
    ) -> int | None:
        """Give this (dead) worker's messages back to its queue, charging one attempt to
        each that had started: each older than the delivery whose id is `unstarted` (its
        scoreboard's `first_unstarted`), so every one for b"" (a lost node, whose
        scoreboard nobody can read), but none that carries a `spared` id (see `replay`).

        Returns how many moved, or None if the lease is alive or another manager holds the
        fence. Safe to call from any node at any time: the script checks the lease itself,
        so the fence only spares managers duplicate work, and its short TTL bounds the delay
        when a manager dies holding it.
        """
        k = self.keys
        if not self.client.set(k.fence, "1", nx=True, px=int(fence_ttl * 1000)):
            return None
        try:
            moved = 0
            for process in self._fast_owners():  # see fast.py, and `replay`
                side = _unstarted_side(unstarted, process)
                fast = self._take_over(process, "retry", True, side, seal=True).moved
                if fast is None:
                    return None  # the lease is alive
                moved += fast
            back = self._reclaim(
                worker_id=self.worker_id,
                unstarted=unstarted,
                token=scripts.new_nudge_token(),
                hold=int(PERMIT_HOLD * 1000),  # its process may live on, orphaned or frozen
                spared=b",".join(spared),
            )
            return None if back is None else moved + back
        finally:
            self.client.delete(k.fence)

    # -- reading ----------------------------------------------------------------------------

    def in_flight(self) -> list[Delivery]:
        """The private list, oldest first, then what fast lists hold (see fast.py)."""
        elements = cast(list[bytes], self.client.lrange(self.keys.processing, 0, -1))
        listed = read_private_list(elements)
        for process in self._fast_owners():
            for name in fast_lists(self.keys, process):
                if self.client.type(name) in (b"list", "list"):
                    payloads = cast(list[bytes], self.client.lrange(name, 0, -1))
                    listed += [Delivery(b"", 0, p, 0, p, fast=name) for p in reversed(payloads)]
        return listed

    def retrying(self) -> list[tuple[Delivery, float]]:
        """The retry set, soonest first, with due times (epoch seconds)."""
        members = self.client.zrange(self.keys.retry, 0, -1, withscores=True)
        return [(Delivery.parse(m), float(s)) for m, s in cast(list[tuple[bytes, float]], members)]

    def dead_reason(self, message: bytes) -> dict[str, Any] | None:
        """The newest dead copy's record of `message`, with `copies` and `older`."""
        value = self.client.hget(self.keys.dead_reasons, digest(message))
        info: dict[str, Any] | None = json.loads(cast(bytes, value)) if value else None
        return info


PAUSE_LOOKUP = 1.0  # seconds between two looks for a pause, on a queue without limits
SORT_BATCH = 1000  # messages of the shared list a worker sorts by its handler per take (as TAKE)
UNGROUP_BATCH = 10_000  # messages UNGROUP moves in one call: Redis runs nothing else meanwhile
GROUP_NAME_MAX = 200  # bytes of a group's name kept (as lua/take.lua keeps them)


def _hex_group(group: Callable[[bytes], str], payload: bytes) -> bytes:
    """The name of `payload`'s group, as SORT takes it: UTF-8, cut, in hex."""
    return group(payload).encode()[:GROUP_NAME_MAX].hex().encode()


def _tagged(payloads: list[bytes], group: Callable[[bytes], str]) -> list[bytes]:
    """SORT's items: each payload, then its group's name in hex."""
    return [x for p in payloads for x in (p, _hex_group(group, p))]


def _retry_payload(member: bytes) -> tuple[bool, bytes]:
    """Whether a retry set member is tagged with its group (`G<hex>.` id), and its payload."""
    if not member.startswith(_PREFIX) or member.count(b":") < 3:
        return False, member
    _, ident, attempts, payload = member.split(b":", 3)
    if b"." not in ident or not attempts.isdigit():  # as lua/envelope.lua's parse
        return False, member
    return ident.startswith(b"G"), Delivery(ident, 0, payload).payload  # as its handler sees it


def renew_leases(client: Client, leases: dict[tuple[str, str], str], ttl: float) -> int:
    """Renew the leases of (queue, worker id) pairs with their status values, in one trip;
    return how many had lapsed.

    A worker whose lease had lapsed is registered again: a node frozen past its TTL has had
    its workers reclaimed and struck from the registry, and once it resumes, its private
    lists must be findable again should it die for good later. Asking for the old value
    (`SET ... GET`) tells which ones lapsed, so a live lease costs one command, not two.
    No transaction: the keys may belong to several queues, hence several Cluster slots.
    A Redis out of memory refuses the SET: then one script call per lease, which it runs
    (see `scripts.LEASE`), so that no live worker's messages are reclaimed meanwhile.
    """
    pipe = client.pipeline(transaction=False)
    for (queue, worker_id), value in leases.items():
        pipe.set(Keys.of(queue, worker_id).lease, value, px=int(ttl * 1000), get=True)
    try:
        previous = pipe.execute()
    except redis.exceptions.OutOfMemoryError:
        return _renew_by_script(client, leases, ttl)
    except redis.ResponseError:  # before Redis 6.2 SET has no GET: register every one
        pipe = client.pipeline(transaction=False)
        for (queue, worker_id), value in leases.items():
            pipe.set(Keys.of(queue, worker_id).lease, value, px=int(ttl * 1000))
        pipe.execute()
        previous = [None] * len(leases)
    lapsed = [key for key, old in zip(leases, previous, strict=True) if old is None]
    if lapsed:
        pipe = client.pipeline(transaction=False)
        for queue, worker_id in lapsed:
            pipe.sadd(Keys.of(queue, worker_id).registry, worker_id)
        pipe.execute()
    return len(lapsed)


def _renew_by_script(client: Client, leases: dict[tuple[str, str], str], ttl: float) -> int:
    """`renew_leases` on a Redis out of memory: one `scripts.LEASE` call per lease."""
    lease = _lease_script(client)
    lapsed = 0
    for (queue, worker_id), value in leases.items():
        keys = Keys.of(queue, worker_id).of_script(scripts.LEASE)
        args = scripts.LEASE.argv(
            value=value, ttl=int(ttl * 1000), worker_id=worker_id, register="0"
        )
        if scripts.LEASE.decode(lease(keys=keys, args=args)) is None:
            lapsed += 1
    return lapsed


@functools.lru_cache(maxsize=16)
def _lease_script(client: Client) -> Call:
    """The lease script on `client`, bound once per client (a keeper's few)."""
    return bind_script(client.register_script, scripts.LEASE)


class Bound(Generic[R]):
    """A script bound to a queue's keys: called with its ARGV by name (`Script.argv`), it
    returns its decoded reply."""

    __slots__ = ("_call", "_script")

    def __init__(
        self,
        runner: Callable[[str, Sequence[str]], Call],
        keys: Keys,
        script: scripts.Script[R],
    ) -> None:
        key_list = keys.of_script(script)
        self._call = bind_script(lambda source: runner(source, key_list), script)
        self._script = script

    def __call__(self, **args: Any) -> R:
        return self._script.decode(self._call(*self._script.argv(**args)))


def bind_script(make: Callable[[str], Call], script: scripts.Script[Any]) -> Call:
    """`make(source)`, a callable running `script`; if the server refuses the shebang line
    that declares its flags (Redis before 7.0 reads none: a syntax error), its source
    without them from then on (`Script.legacy_source`)."""
    flagged = make(script.source)
    if not script.flags:
        return flagged
    chosen = [flagged]

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return chosen[0](*args, **kwargs)
        except redis.ResponseError as exc:
            if chosen[0] is not flagged or "near '#'" not in str(exc):
                raise
            chosen[0] = make(script.legacy_source)
            return chosen[0](*args, **kwargs)

    return run


def publish_status(client: Client, values: dict[tuple[str, str], str]) -> None:
    """Write the status of slots that have no live worker (in restart backoff, or stopped)
    into their leases without renewing them.

    A slot stuck in backoff must let its lease lapse, so that its messages are reclaimed,
    but `status` should tell why it does not consume until then. Only a lease that still
    exists is written (XX), its TTL kept (KEEPTTL, Redis 6.0+; an older server, or one out
    of memory, keeps the last value: this is news, not a duty).
    """
    pipe = client.pipeline(transaction=False)
    for (queue, worker_id), value in values.items():
        pipe.set(Keys.of(queue, worker_id).lease, value, xx=True, keepttl=True)
    with contextlib.suppress(redis.ResponseError):
        pipe.execute()


# A status older than this many publishing periods (plus a second) comes from a keeper that
# stopped publishing: its manager is gone or cut off from Redis.
STALE_AFTER = 2


@dataclass(frozen=True)
class Snapshot:
    """A queue as `rqworkers status` shows it. Workers are the values of live leases."""

    waiting: int
    in_flight: int
    retrying: int  # the retry set: retries waiting for their time and delayed messages
    # (`waiting` counts the prioritised messages it holds, due at once: see `levels`)
    dead: int
    workers: list[dict[str, Any]]
    flow: FlowState = field(default_factory=FlowState)

    @property
    def held_back(self) -> int:
        """Messages waiting because the pause or a limit lets none start now."""
        return self.waiting if self.flow.binding else 0

    next_due: float | None = None  # when the retry set's soonest is due, epoch seconds


def snapshot(client: Client, queue: str, limits: Limits = NO_LIMITS) -> Snapshot:
    """Read a queue's lengths, its flow state under `limits`, and its workers' published
    status, in three round trips."""
    keys = Keys.of(queue, "")
    ids = registered_workers(client, queue)
    pipe = client.pipeline(transaction=False)
    pipe.llen(keys.queue)
    pipe.zcard(keys.retry)
    pipe.llen(keys.dead)
    pipe.zrange(keys.retry, 0, 0, withscores=True)
    read_flow = flow_reader(pipe, queue, limits)
    for worker_id in ids:
        worker_keys = Keys.of(queue, worker_id)
        pipe.llen(worker_keys.processing)
        pipe.llen(worker_keys.landing)
        pipe.get(worker_keys.lease)
        pipe.smembers(worker_keys.fast_owners)
    waiting, retrying, dead, first, *rest = pipe.execute()
    flow, rest = read_flow(rest)
    # Read whatever sorted them (`group_by` or a handler's `group()`, which only the
    # worker knows of): a queue with no group waiting costs one LRANGE.
    groups = group_states(client, queue, limits.group_max_running, group_rate=limits.group_rate)
    if groups.busiest:
        flow = _with_groups(flow, groups)
    in_flight = sum(int(n) for n in rest[0::4]) + sum(int(n) for n in rest[1::4])
    in_flight += _fast_in_flight(client, queue, dict(zip(ids, rest[3::4], strict=True)))
    workers = []
    for worker_id, raw in zip(ids, rest[2::4], strict=True):
        if raw is None:
            continue
        try:
            info = json.loads(raw)
        except ValueError:  # a lease written by something else: show what we can
            info = {"name": worker_id}
        if isinstance(info, dict):
            workers.append(_freshness({"worker_id": worker_id, **info}, time.time()))
    waiting = int(waiting) + flow.grouped_waiting  # sorted into groups, still waiting
    next_due = float(first[0][1]) if first else None
    retrying = int(retrying)
    if next_due is not None and next_due < 0:  # prioritised messages wait in the retry set
        bands = levels.read_bands(client, keys.retry)
        waiting, retrying, next_due = (
            waiting + bands.waiting,
            retrying - bands.waiting,
            bands.next_due,
        )
    return Snapshot(waiting, in_flight, retrying, int(dead), workers, flow, next_due)


def _fast_in_flight(client: Client, queue: str, owners: dict[str, set[bytes]]) -> int:
    """How many deliveries the workers' fast lists hold (a sealed list holds none);
    `owners`: worker id → its `fast_owners`."""
    pipe = client.pipeline(transaction=False)
    for worker_id, processes in owners.items():
        for process in processes:
            for name in fast_lists(Keys.of(queue, worker_id), process.decode(errors="replace")):
                pipe.llen(name)
    if not len(pipe):
        return 0
    lengths = pipe.execute(raise_on_error=False)  # WRONGTYPE: a sealed list, holding none
    return sum(n for n in lengths if isinstance(n, int))


def shared_lengths(
    client: Client, queue: str, seconds: float, limits: Limits = NO_LIMITS
) -> Snapshot:
    """A queue's lengths (no workers) as some node read them less than `seconds` ago, or as
    read now and published for `seconds` if none did; its flow state under `limits`, read
    now (a few commands, whatever the fleet's size).

    The lengths are the queue's, the same for every node, but reading them costs O(workers)
    commands (every private list), every renewal period: every node reading them itself
    would cost Redis O(nodes²) for a fleet whose every node serves `/metrics`.
    """
    key = Keys.of(queue, "").lengths
    raw = client.get(key)
    try:
        shared = json.loads(raw) if raw else None
        if isinstance(shared, dict):
            waiting, in_flight, retrying, dead = (int(shared[name]) for name in _LENGTHS)
            due = shared.get("next_due")
            next_due = float(due) if isinstance(due, int | float) else None
            flow = current_flow(client, queue, limits)
            return Snapshot(waiting, in_flight, retrying, dead, [], flow, next_due)
    except (ValueError, KeyError, TypeError):
        pass  # not ours, or from another version: read anew
    read = snapshot(client, queue, limits)
    value = json.dumps(
        {**{name: getattr(read, name) for name in _LENGTHS}, "next_due": read.next_due}
    )
    # Shared for the others' sake: a Redis out of memory refuses it, not the reading.
    with contextlib.suppress(redis.exceptions.OutOfMemoryError):
        client.set(key, value, px=max(1, int(seconds * 1000)))
    return read


_LENGTHS = ("waiting", "in_flight", "retrying", "dead")  # `Snapshot`'s counts, in order


def current_flow(client: Client, queue: str, limits: Limits) -> FlowState:
    """A queue's pause, limits and groups as they stand: `snapshot`'s flow state alone."""
    flow = flow_state(client, queue, limits)
    groups = group_states(client, queue, limits.group_max_running, group_rate=limits.group_rate)
    return _with_groups(flow, groups) if groups.busiest else flow


def _with_groups(flow: FlowState, groups: Groups) -> FlowState:
    """`flow` with what `group_states` read of its groups."""
    return dataclasses.replace(
        flow,
        groups=groups.busiest,
        grouped_waiting=groups.waiting,
        groups_full=groups.full,
        groups_held_by=groups.held_by,
    )


def _freshness(info: dict[str, Any], now: float) -> dict[str, Any]:
    """A published status whose keeper has not renewed it for `STALE_AFTER` periods says
    `stale` and since when, rather than the state its node was last seen in."""
    try:
        age = now - float(info["at"])
        every = float(info.get("every", 5.0))
    except (KeyError, TypeError, ValueError):
        return info
    if age > STALE_AFTER * every + 1.0 and info.get("state") != "stopped":
        return {**info, "state": "stale", "stale_for": round(age, 1)}
    return info


def registered_workers(client: Client, queue: str) -> list[str]:
    """Worker ids that have had a private list for `queue`, read with SSCAN."""
    ids = client.sscan_iter(Keys.of(queue, "").registry, count=100)
    return sorted(i.decode() if isinstance(i, bytes) else str(i) for i in ids)


def take_reclaim_turn(client: Client, queue: str, node: str, seconds: float) -> bool:
    """Whether it is `node`'s turn to walk `queue`'s registry for orphans; if so, the turn
    is held for `seconds` (the keeper's `turn`), and the next pass of any node after that
    takes the next turn.

    Every lease must be looked at once a `reclaim_interval`, but by one node, not by all:
    every node walking the whole registry at every pass costs Redis O(nodes) commands per
    node, O(nodes²) for the fleet (bench/fleet.py measured it). With turns, a pass of a
    node costs one command, and the fleet's walks one `EXISTS` per worker per turn.
    """
    turn = Keys.of(queue, "").reclaim_turn
    try:
        return bool(client.set(turn, node, nx=True, px=max(1, int(seconds * 1000))))
    except redis.exceptions.OutOfMemoryError:
        # Redis out of memory refuses the turn, not the reads of a walk: every node walks,
        # as before turns, rather than none while the queue drains.
        return True


def expired_workers(client: Client, queue: str, worker_ids: Sequence[str]) -> list[str]:
    """Those of `worker_ids` whose lease on `queue` has expired, in one round trip."""
    if not worker_ids:
        return []
    pipe = client.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.exists(Keys.of(queue, worker_id).lease)
    alive = pipe.execute()
    return [w for w, live in zip(worker_ids, alive, strict=True) if not live]


@dataclass(frozen=True)
class DeadLetter:
    index: int  # 0 is the newest
    payload: bytes
    info: dict[str, Any] | None  # this copy's record: reason, attempts, at, worker, id
    copies: int = 1  # copies of this payload in the dead list, this one included


class DeadLetters:
    """The dead-letter list of one queue, as operators handle it.

    Copies of one payload (twins) share a record field; the k-th copy from the head of the
    list owns the k-th record, newest first, since both are pushed and removed together.
    """

    def __init__(self, client: Client, queue: str) -> None:
        self.client = client
        self.keys = Keys.of(queue, "")
        self._take = Bound(script_caller(client, False), self.keys, scripts.DEAD_TAKE)

    def __len__(self) -> int:
        return int(self.client.llen(self.keys.dead))

    def page(self, start: int = 0, limit: int = 20) -> list[DeadLetter]:
        """Up to `limit` dead letters from index `start` (0 is the newest)."""
        if limit <= 0:
            return []
        payloads = cast(list[bytes], self.client.lrange(self.keys.dead, start, start + limit - 1))
        return self._with_info(start, payloads)

    def oldest(self, limit: int) -> list[DeadLetter]:
        """The `limit` oldest dead letters, newest of them first."""
        total = len(self)
        start = max(0, total - limit)
        return self.page(start, total - start)

    def get(self, index: int) -> DeadLetter | None:
        letters = self.page(index, 1) if index >= 0 else []
        return letters[0] if letters else None

    def requeue(self, letters: list[DeadLetter]) -> int:
        """Move `letters` (newest first) to the head of the queue, oldest first in line."""
        return self._take_out("requeue", letters)

    def purge(self, letters: list[DeadLetter]) -> int:
        return self._take_out("purge", letters)

    def _take_out(self, mode: str, letters: list[DeadLetter]) -> int:
        if not letters:
            return 0
        triples: list[bytes | str] = []
        for letter in letters:
            record_id = str((letter.info or {}).get("id", ""))
            triples += [letter.payload, digest(letter.payload), record_id]
        return self._take(mode=mode, letters=triples)

    def _with_info(self, start: int, payloads: list[bytes]) -> list[DeadLetter]:
        if not payloads:
            return []
        distinct = list(dict.fromkeys(payloads))
        fields = [digest(p) for p in distinct]
        raw = cast(list[Any], self.client.hmget(self.keys.dead_reasons, fields))
        records = {p: _record(r) for p, r in zip(distinct, raw, strict=True)}
        seen = {p: self._copies_before(p, start) for p in distinct}
        letters = []
        for offset, payload in enumerate(payloads):
            record = records[payload]
            info, copies = _copy_record(record, seen[payload])
            seen[payload] += 1
            letters.append(DeadLetter(start + offset, payload, info, copies))
        return letters

    def _copies_before(self, payload: bytes, start: int) -> int:
        """How many copies of `payload` the dead list holds above index `start`."""
        if start <= 0:
            return 0
        try:
            found = self.client.lpos(self.keys.dead, payload, rank=1, count=0, maxlen=start)  # type: ignore[arg-type]
            return len(cast(list[int], found))
        except redis.ResponseError:  # before Redis 6.0.6: count them here
            above = cast(list[bytes], self.client.lrange(self.keys.dead, 0, start - 1))
            return above.count(payload)


def _record(raw: bytes | None) -> dict[str, Any] | None:
    """A dead letter's record; None when there is none, or none rqworkers could have
    written (a field set by hand): the letter is listed, requeued and purged all the same."""
    try:
        record = json.loads(raw) if raw else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _copy_record(record: dict[str, Any] | None, rank: int) -> tuple[dict[str, Any] | None, int]:
    """The record of the `rank`-th copy (0 is the newest) of a payload, and its copies."""
    if record is None:
        return None, 1
    older = record.get("older")
    copies = int(record.get("copies", 1))
    newest = {k: v for k, v in record.items() if k not in ("older", "copies")}
    chain = [newest, *(older if isinstance(older, list) else [])]
    return (chain[rank] if rank < len(chain) else None), copies
