"""What a worker has decided about its deliveries and Redis has not yet confirmed.

Acks wait here to travel with the next take (one round trip for both); a failure's retry or
dead-letter is sent at once. When a Redis error swallows a reply, everything pending stays
and is sent again once Redis answers: every delivery is a unique envelope, so an operation
that did happen the first time finds nothing the second time and changes nothing. Nothing
settled is therefore handled again, and nothing is settled twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rqworkers.store.queue import Delivery, Lot, ReliableQueue, Taken
from rqworkers.worker.handlers import Reply

log = logging.getLogger(__name__)

ACK_INTERVAL = 1.0  # seconds a handled message may wait for its ack to share a round trip


@dataclass(frozen=True)
class Failure:
    """A delivery that ended without a result: retried after `delay` seconds, or
    dead-lettered when `delay` is None. `record` is what its dead letter keeps."""

    delivery: Delivery
    record: dict[str, Any]
    delay: float | None
    error: BaseException | None = None  # the exception, when one was raised


Listener = Callable[[Failure, bool], None]  # (failure, whether it moved) once confirmed


@dataclass
class Outbox:
    queue: ReliableQueue
    on_failure_settled: Listener
    before_acks: Callable[[], None] = lambda: None  # what must reach Redis ahead of acks
    before_take: Callable[[], None] = lambda: None  # called as a take is about to be sent
    on_settled: Callable[[int], None] = lambda deliveries: None  # once Redis confirmed them
    # This worker's deliveries that hold a permit beside what a take brings: those in a
    # handler, and those taken and not yet started.
    holding: Callable[[], list[Delivery]] = lambda: []
    acks: list[Delivery] = field(default_factory=list)
    # Acks behind `acks`: the deliveries `first` to `last` (indexes) of one take's lot,
    # run in order by the lean loop (`ack_run`), which travel as one trim with no
    # `Delivery` made for them.
    lot: Lot | None = None
    first: int = 0
    last: int = 0
    # The replies some acks must be preceded by (`before_acks` writes them), by the id of
    # the delivery whose run made each: twins share a payload, never an id.
    replies: dict[bytes, Reply] = field(default_factory=dict)
    oldest_ack: float = 0.0  # monotonic seconds when the oldest pending ack was added
    failed: list[Failure] = field(default_factory=list)
    # After a lost reply, pending operations are sent again: a miss is then expected.
    resending: bool = False
    one_by_one: bool = False  # the last trim found the list otherwise: send each ack once

    def ack(self, delivery: Delivery, now: float, reply: Reply | None = None) -> bool:
        """Queue `delivery`'s ack, preceded by `reply` if its run made one; True when the
        pending acks are overdue (`acks_overdue`)."""
        self._unfold()  # this ack goes behind them
        acks = self.acks
        if not acks:
            self.oldest_ack = now
        acks.append(delivery)
        if reply is not None:
            self.replies[delivery.id] = reply
        return now - self.oldest_ack > ACK_INTERVAL

    def ack_run(self, lot: Lot, first: int, last: int, since: float) -> None:
        """Queue the acks of the deliveries `first` to `last` (indexes, both included) of
        `lot`, which ran in take order after every ack pending, the first of them ending at
        monotonic `since`. A run that goes on from the pending one joins it; any other
        makes the pending one deliveries first (one trim then names them all, or, should
        it be refused, each goes one by one)."""
        if self.lot is not None:
            if self.lot is lot and self.last + 1 == first:
                self.last = last  # the run goes on
                return
            self._unfold()
        if not self.acks:
            self.oldest_ack = since
        self.lot, self.first, self.last = lot, first, last

    def _unfold(self) -> None:
        """Make the pending run's deliveries acks among `acks`, for what needs them
        one by one (a Delivery's ack behind them, or a trim refused)."""
        if self.lot is not None:
            self.acks.extend(self.lot.deliveries(self.first, self.last + 1))
            self.lot = None

    def replace_ack(self, delivery: Delivery, failure: Failure) -> None:
        """`delivery` is not to be acked after all (its reply was refused): `failure`
        takes the place of its ack, and of its reply."""
        self.acks.remove(delivery)  # equal only with its own id: never a twin
        self.replies.pop(delivery.id, None)
        self.failed.append(failure)

    def forget_acks(self) -> None:
        """Drop the pending acks and their replies: they are no longer this worker's."""
        self.acks = []
        self.lot = None
        self.replies.clear()

    def acks_overdue(self, now: float) -> bool:
        """True when finished work has waited long enough for its ack."""
        return self.has_acks and now - self.oldest_ack > ACK_INTERVAL

    def overdue_at(self, now: float) -> float:
        """When the pending acks, with one queued at monotonic `now`, are overdue."""
        return (self.oldest_ack if self.has_acks else now) + ACK_INTERVAL

    @property
    def has_acks(self) -> bool:
        """Whether any ack waits: a `Delivery`'s, or a lot's run."""
        return bool(self.acks) or self.lot is not None

    def fail(self, failure: Failure) -> None:
        """Retry or dead-letter `failure` now (it stays pending if Redis does not answer)."""
        self.failed.append(failure)
        self.send_failed()

    def take(self, limit: int, landed: bool = False) -> Taken:
        """Send the failed deliveries' moves, then the acks with a take of up to `limit` new
        deliveries (`landed`: a blocking fetch left one in the landing list). What must
        precede the acks goes first: it may turn an ack into a failure."""
        if self.acks:
            self.before_acks()
        self.send_failed()
        run = self.lot
        if run is not None and (self.acks or self.one_by_one or not self.queue.acks_in_order):
            self._unfold()
            run = None
        acks = self.acks
        if not acks and run is None and limit <= 0:
            return Taken(0, [], None)  # nothing to send
        fast: list[tuple[str, bytes]] = []
        elements: list[bytes] = []
        if run is not None and run.fast:  # fast acks: the fast list, and the payload as it is
            fast = [(run.fast, payload) for payload in run.payloads[self.first : self.last + 1]]
            trim, settled = 0, len(fast)
        elif run is not None:  # a run of one lot alone: one trim
            trim = settled = self.last - self.first + 1
            elements = [run.element(self.first), run.element(self.last)]
        else:
            # The fast path's acks are payloads of the fast list (see store/fast.py); the
            # others, envelopes of the private list. Only a queue with the fast path has any.
            if self.queue.fast_path:
                fast = [(d.fast, d.element) for d in acks if d.fast]
            listed = [d for d in acks if not d.fast] if fast else acks
            trim = len(listed) if self._in_take_order(listed) else 0
            if trim:
                elements = [listed[0].element, listed[-1].element]
            else:
                elements = [d.element for d in listed]
            settled = len(acks)
        self.before_take()
        limits = self.queue.limits
        if limits.any or limits.sorter:  # what this worker holds counts only against limits
            held = self.holding()
            groups = Counter(d.group for d in held if d.group is not None)
            taken = self.queue.take(
                elements, limit, landed, trim, len(held), dict(groups), fast_acks=fast
            )
        else:
            taken = self.queue.take(elements, limit, landed, trim, fast_acks=fast)
        if taken.missing_acks < 0:  # none of `listed` was removed: they wait for the next trip
            log.debug("%d acks were not the oldest of the private list; sent one by one", trim)
            self.one_by_one = True
            if fast:  # those went all the same
                self.on_settled(len(fast))
                for delivery in acks:
                    if delivery.fast:
                        self.replies.pop(delivery.id, None)
                self.acks = list(listed)
            return taken
        if taken.missing_acks and not self.resending:
            log.warning(
                "%d ack(s) removed nothing from %s: moved by someone else, they may run twice",
                taken.missing_acks,
                self.queue.keys.processing,
            )
        if settled:
            self.on_settled(settled)
        self.forget_acks()
        self.resending = self.one_by_one = False
        return taken

    def _in_take_order(self, acks: list[Delivery]) -> bool:
        """True when `acks` may travel as a trim: each taken after the one before."""
        if not acks or not self.queue.acks_in_order or self.one_by_one:
            return False
        previous = acks[0].seq
        for delivery in acks[1:]:
            if delivery.seq <= previous:
                return False
            previous = delivery.seq
        return acks[0].seq > 0  # 0: a delivery read back from Redis, of unknown order

    def flush(self) -> None:
        """Send everything pending, taking nothing new (a trim refused is sent again, one
        by one, so this ends in two trips at most)."""
        while not self.empty:
            self.take(0)

    def lost_reply(self) -> None:
        """A Redis error hid whether the last operation happened: resend, quietly."""
        self.resending = True

    @property
    def empty(self) -> bool:
        return not (self.has_acks or self.failed)

    def send_failed(self) -> None:
        while self.failed:
            failure = self.failed[0]
            if failure.delay is None:
                moved = self.queue.dead_letter(failure.delivery, failure.record)
            else:
                moved = self.queue.retry_later(failure.delivery, failure.delay)
            self.failed.pop(0)
            self.on_settled(1)
            self.on_failure_settled(failure, moved or self.resending)
