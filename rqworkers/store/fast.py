"""The fast path: a worker at prefetch 1 takes a fresh message with native commands.

A take through the TAKE script costs Redis the script call itself, whatever the script
does: in bench/RESULTS.md ("The cost of one message"), an EVALSHA that takes one message
cost Redis about twice the CPU of the plain consumer that acks one message and moves the
next in one pipeline (yardstick (b)). At prefetch 1, the default, that is the whole cost
of a message. So a worker that handles one message at a time, when nothing in the retry
set is due, sends one pipeline of native commands instead:

    LREM  <fast list A> -1 <payload>      the ack of the delivery it handled
    LMOVE <queue> <fast list B> RIGHT LEFT the take
    ZRANGE <retry> 0 0 WITHSCORES         is a retry, a delayed or a prioritised message due?

the yardstick's two commands and one more. A process has two fast lists of its own (their
keys name it), used in turn, each holding at most the one delivery in hand, as the payload
it came as, without an envelope.

What the script did beside the move, and how each still holds:
- *Twins* stay separate, and *nothing settled is handled again*: an ack is an LREM by
  value, which could not tell a message from its identical twin in the same list; but
  the take goes to the other list. So when a reply is lost, the lists say what happened
  (Redis runs a pipeline's commands in order): the acked payload still in A means that
  nothing ran, and the ack is sent again; anything in B is the new delivery, replayed.
- *Attempts*: a fast delivery has none behind it (a message from the shared list). Should
  it end without a result, its retry or dead letter writes the envelope then
  (`retry_later`, `dead_letter` with its fast list as the private list); a replay or a
  reclaim charges it as a started delivery, as the scoreboard says.
- *A superseded process takes nothing more*: a replay by the worker's successor, or a
  reclaim, takes the fast lists' deliveries and *seals* them, leaving a string in their
  place (`SEAL`): the superseded process's next LMOVE fails (WRONGTYPE) having moved
  nothing, its next LREM too, and it exits. The seal lasts a day: longer than any process
  sleeps between deciding to take and sending the take, since a worker looks through the
  script at least once a second (for a pause), and the script checks the list's owner.
- *Due retries, delayed and prioritised messages* come first: when the ZRANGE finds one
  due, the message just taken goes back to the queue's tail, where it was, and the script
  takes; until a take finds nothing due, the script takes every time.
- *Nudges and look-alikes*: a payload that is the queue's nudge token, or that looks like
  an envelope (only the script wraps those; a nudge token starts alike), goes back the
  same way, and the script drops or wraps it.
- *Pauses and lapsed leases*: the script's once-a-second look (`PAUSE_LOOKUP`) finds
  them, as it did before.
- *Out of memory*: Redis refuses the LMOVE over maxmemory (the acks still go through); the
  script, flagged to run all the same (it only moves messages), takes instead, so a full
  Redis still drains.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from rqworkers.errors import Superseded
from rqworkers.store.keys import Keys
from rqworkers.store.scripts import PREFIX

SEAL = b"superseded"  # what a fast list becomes once taken over (see lua/replay.lua)
_PREFIX = PREFIX.encode()
_DEDUP_HEAD = _PREFIX + b"dedup:"  # a deduplicated payload's wrapper: taken as it is
_TOKEN = re.compile(rb"[0-9a-f]{32}")  # a nudge token as earlier versions wrote it

R = TypeVar("R")
SendAll = Callable[[Sequence[Sequence[Any]]], list[Any]]
FastAck = tuple[str, bytes]  # a handled fast delivery: its fast list, its payload there


def fast_lists(keys: Keys, process: str) -> tuple[str, str]:
    """The two fast lists of the process whose id prefix is `process`."""
    named = Keys(keys.queue_name, keys.worker_id, process)
    return named.fast_0, named.fast_1


@dataclass(frozen=True)
class FastTake:
    """What a fast take did: acks that found nothing, the payload it took (None if none),
    and the retry set's first due time (epoch seconds; None if the set is empty)."""

    missing_acks: int
    payload: bytes | None
    next_due: float | None
    to_script: bool  # it took nothing, and the script must take now (something is due)


class FastPath:
    """One process's two fast lists and its takes.

    `held`: the fast list holding this process's delivery in hand, if it has one taken by
    this path and not yet settled (at most one: with more, the script takes). `due_now`:
    a take found something due in the retry set; the script takes until one finds none.
    """

    __slots__ = ("_nudge", "_send_all", "due_now", "held", "keys", "lists", "no_lmove")

    def __init__(self, keys: Keys, process: str, send_all: SendAll) -> None:
        self.keys = keys
        self.lists = fast_lists(keys, process)
        self._send_all = send_all
        self.held: str | None = None
        self.due_now = False
        self.no_lmove = False  # a server before 6.2: the script takes (see `take`)
        self._nudge: bytes | None = None  # the queue's nudge token, once read

    def ready(self, acks: Sequence[FastAck]) -> bool:
        """Whether a fast take may go with `acks`: they settle the delivery in hand, if
        any, and nothing is known to be due."""
        if self.no_lmove or self.due_now or len(acks) != (self.held is not None):
            return False
        return not acks or acks[0][0] == self.held

    def take(self, acks: Sequence[FastAck], listed: Sequence[bytes], side: int) -> FastTake:
        """Ack `acks` (the delivery in hand, if `ready` said so) and `listed` (envelopes of
        the private list: what the script took last) and take one message into the fast
        list `side` (the parity of the take's number), which never holds the delivery in
        hand."""
        k = self.keys
        into = self.lists[side]
        assert into != self.held, "a take's number is never of the held list's parity"
        commands: list[tuple[Any, ...]] = [("LREM", name, -1, ack) for name, ack in acks]
        commands += [("LREM", k.processing, -1, envelope) for envelope in listed]
        acks = [*acks, *((k.processing, e) for e in listed)]
        commands.append(("LMOVE", k.queue, into, "RIGHT", "LEFT"))
        commands.append(("ZRANGE", k.retry, 0, 0, "WITHSCORES"))
        replies = self._send_all(commands)
        # Over maxmemory, Redis refuses a LMOVE (it may grow memory) before it moves
        # anything; the script, which may, takes instead (the acks went through). Before
        # 6.2 Redis knows no LMOVE (as `ReliableQueue.fetch` finds of BLMOVE): the script
        # takes, from then on every time.
        moved = replies[-2]
        full = isinstance(moved, redis.exceptions.OutOfMemoryError)
        if isinstance(moved, redis.ResponseError) and "unknown command" in str(moved).lower():
            full = self.no_lmove = True
        if full:
            replies[-2] = None
        replies = self._checked(replies)
        self.held = None
        missing = sum(1 for removed in replies[: len(acks)] if not removed)
        payload, next_due = replies[-2], _first_score(replies[-1])
        self.due_now = next_due is not None and next_due <= time.time()
        if full or self.due_now or (payload is not None and self._not_plain(payload)):
            if payload is not None:  # back to the queue's tail, where it was
                self._checked(self._send_all([("LMOVE", into, k.queue, "LEFT", "RIGHT")]))
            self.due_now = True  # only the script takes rightly what comes first now
            return FastTake(missing, None, next_due, True)
        if payload is not None:
            self.held = into
        return FastTake(missing, payload, next_due, False)

    def ack(self, acks: Sequence[FastAck]) -> int:
        """Remove handled deliveries; returns how many found nothing."""
        replies = self._checked(self._send_all([("LREM", name, -1, a) for name, a in acks]))
        for name, _ in acks:
            self.settled(name)
        return sum(1 for removed in replies if not removed)

    @property
    def held_side(self) -> int | None:
        """The side (0 or 1) of the fast list holding the delivery in hand, if any."""
        return None if self.held is None else self.lists.index(self.held)

    def settled(self, fast_list: str) -> None:
        """The delivery in `fast_list` is settled (acked, retried, dead or given back)."""
        if self.held == fast_list:
            self.held = None

    def settling(self, settle: Callable[..., R], **args: Any) -> R:
        """`settle(**args)`, a script settling a delivery in a fast list: should it find the list
        sealed, `Superseded`, as a take or an ack would (not a lasting error of a key of the
        wrong type, which an operator told so would delete)."""
        try:
            return settle(**args)
        except redis.ResponseError as exc:
            self._checked([exc])
            raise

    def forget(self) -> None:
        """This process's own replay moved its fast lists into the private list."""
        self.held = None

    def note(self, next_due: float | None) -> None:
        """A script take said when the retry set's first is due (`now` if it may hold more
        due than it took)."""
        self.due_now = next_due is not None and next_due <= time.time()

    def _not_plain(self, payload: bytes) -> bool:
        """True for what only the script may take: a nudge, or a look-alike envelope (a
        nudge token starts as an envelope does; one an earlier version wrote, 32 hex
        digits, is read from Redis once, should a payload of that form come)."""
        if payload.startswith(_PREFIX):
            return not payload.startswith(_DEDUP_HEAD)
        if len(payload) != 32 or not _TOKEN.fullmatch(payload):
            return False
        if self._nudge is None:
            [token] = self._checked(self._send_all([("GET", self.keys.nudge)]))
            self._nudge = token or b""
        return payload == self._nudge

    def _checked(self, replies: list[Any]) -> list[Any]:
        """`replies`, unless one is an error: WRONGTYPE on a fast list means another
        process took it over (`Superseded`); any other error is raised as it is."""
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                # Anywhere in it: in a script, before Redis 7.0, "ERR Error running ... -WRONGTYPE".
                if "WRONGTYPE" in str(reply) and self._sealed():
                    raise Superseded(f"{self.lists[0]} was taken over by another process")
                raise reply
        return replies

    def _sealed(self) -> bool:
        kinds = self._send_all([("TYPE", name) for name in self.lists])
        return any(kind in (b"string", "string") for kind in kinds)


def _first_score(reply: Any) -> float | None:
    """The score of ZRANGE WITHSCORES's one member, as RESP2 ([member, score]) or RESP3
    ([[member, score]]) gives it; None for an empty set."""
    if not reply:
        return None
    first = reply[0]
    return float(first[1]) if isinstance(first, list | tuple) else float(reply[1])
