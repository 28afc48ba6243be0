"""What a worker has taken and not yet started, oldest first.

Two kinds of entries, one order. Deliveries that came one by one (a replay's leftovers, or
anything taken while others still waited) wait as `(delivery, lost_reason)` pairs. A take
that finds the batch empty is kept whole, as its `Lot`, with a cursor on the next to
start: `Worker.run_lot` runs them from there without making a `Delivery` each. Any other
reader gets deliveries made on demand, so the rest of the worker sees one kind.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from rqworkers.store.queue import Delivery, Lot, Taken

# Why a delivery that never finished before dies unhandled once it reaches `max_attempts`:
# what a take brings carries this; a replay's leftovers, how their worker ended.
LOST_WORKER = "earlier deliveries never finished (worker lost)"

Entry = tuple[Delivery, str]  # a delivery, and the reason it would be dead-lettered unhandled


class Batch:
    """Taken, not yet started: waiting pairs, or (only when none wait) the rest of one
    take's lot, from its index `next` on. A lot is dropped once its last has started, so
    that `lot is not None` says there is something left in it."""

    __slots__ = ("lot", "next", "waiting")

    def __init__(self) -> None:
        self.waiting: deque[Entry] = deque()
        self.lot: Lot | None = None  # a take's deliveries, kept whole
        self.next = 0  # the index in `lot` of the next to start

    def __bool__(self) -> bool:
        return self.lot is not None or bool(self.waiting)

    def __len__(self) -> int:
        return len(self.waiting) + self.lot_left()

    def __iter__(self) -> Iterator[Entry]:
        yield from self.waiting
        lot, start = self.lot, self.next
        if lot is not None:
            for delivery in lot.deliveries(start):
                yield delivery, LOST_WORKER

    def lot_left(self) -> int:
        # `self.lot` read once: another thread (`FreezeWatch`) may read the batch as the
        # worker ends its lot.
        lot = self.lot
        return 0 if lot is None else len(lot) - self.next

    def add(self, taken: Taken, whole: bool) -> None:
        """Add what a take brought: kept `whole` (for `Worker.run_lot`) if nothing else
        waits. A loop that takes deliveries one by one gets them made at once, in one go."""
        lot = taken.lot
        if whole and lot is not None and lot.payloads and self.lot is None and not self.waiting:
            self.next, self.lot = 0, lot
        else:
            self.extend((delivery, LOST_WORKER) for delivery in taken.deliveries)

    def extend(self, entries: Iterable[Entry]) -> None:
        self._unfold()
        self.waiting.extend(entries)

    def popleft(self) -> Entry:
        """The oldest unstarted, taken out of the batch."""
        if self.waiting:
            return self.waiting.popleft()
        lot = self.lot
        if lot is None:
            raise IndexError("pop from an empty batch")
        delivery = lot.delivery(self.next)
        self.moved_to(self.next + 1)
        return delivery, LOST_WORKER

    def moved_to(self, index: int) -> None:
        """The lot's deliveries before `index` have started."""
        lot = self.lot
        if lot is not None and index >= len(lot.payloads):
            self.lot, self.next = None, 0
        else:
            self.next = index

    def first_id(self) -> bytes:
        """The id of the oldest unstarted delivery; b"" if there is none."""
        if self.waiting:
            return self.waiting[0][0].id
        lot = self.lot
        return b"" if lot is None else lot.prefix + b"%d" % (self.next + 1)

    def deliveries(self) -> list[Delivery]:
        return [delivery for delivery, _ in self]

    def clear(self) -> None:
        self.waiting.clear()
        self.lot, self.next = None, 0

    def _unfold(self) -> None:
        """Make the lot's unstarted deliveries pairs that wait, so more can queue behind."""
        if self.lot is not None:
            rest = self.lot.deliveries(self.next)
            self.lot, self.next = None, 0
            self.waiting.extend((delivery, LOST_WORKER) for delivery in rest)
