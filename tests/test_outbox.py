"""The outbox of settlements, against a fake queue: what is pending stays pending until Redis
confirms it, is sent again after a lost reply, and a resend's miss is not a warning."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import redis

from rqworkers.store.flow import NO_LIMITS
from rqworkers.store.queue import Delivery, Keys, ReliableQueue, Taken
from rqworkers.worker.outbox import ACK_INTERVAL, Failure, Outbox


def delivery(n: int, payload: bytes = b"same") -> Delivery:
    """The n-th delivery this process took (n >= 1), with a twin's payload by default."""
    return Delivery(b"id%d" % n, 0, payload, seq=n)


class PrivateList(list[bytes]):
    """The private list, oldest first."""

    def add(self, element: bytes) -> None:
        self.append(element)

    def update(self, elements: Iterable[bytes]) -> None:
        self.extend(elements)

    def discard(self, element: bytes) -> None:
        if element in self:
            self.remove(element)


class FakeQueue:
    """Records what reaches "Redis"; `fail_next` makes the next call raise, before or after
    it took effect (`lost_reply`), as a dropped connection would."""

    limits = NO_LIMITS  # as a ReliableQueue of a queue without flow control
    fast_path = False  # nor the fast path (prefetch 1)
    acks_in_order = True  # as a ReliableQueue of a worker that settles in take order

    def __init__(self) -> None:
        self.keys = Keys.of("jobs", "n:1")
        self.present = PrivateList()
        self.trims: list[int] = []  # acks sent as one trim, how many each time
        self.acked: list[bytes] = []
        self.retried: list[bytes] = []
        self.dead: list[bytes] = []
        self.fail_next: str | None = None  # None, "before" or "after"

    def _maybe_fail(self, effect: Any) -> Any:
        mode, self.fail_next = self.fail_next, None
        if mode == "before":
            raise redis.ConnectionError("reset before sending")
        result = effect()
        if mode == "after":
            raise redis.ConnectionError("reset before the reply")
        return result

    def take(
        self,
        acks: list[bytes],
        limit: int,
        landed: bool = False,
        trim: int = 0,
        running: int = 0,
        mine: dict[str, int] | None = None,
        fast_acks: Sequence[tuple[str, bytes]] = (),
    ) -> Taken:
        assert not fast_acks  # these deliveries are all of the private list

        def effect() -> Taken:
            if trim:  # as scripts.TAKE: the ends must be where the worker says
                present = self.present
                if present[:1] != acks[:1] or present[trim - 1 : trim] != acks[-1:]:
                    return Taken(-1, [], None)
                self.acked += present[:trim]
                del present[:trim]
                self.trims.append(trim)
                return Taken(0, [], None)
            missing = 0
            for element in acks:
                if element in self.present:
                    self.present.discard(element)
                    self.acked.append(element)
                else:
                    missing += 1
            return Taken(missing, [], None)

        result: Taken = self._maybe_fail(effect)
        return result

    def _move(self, d: Delivery, into: list[bytes]) -> bool:
        def effect() -> bool:
            if d.element not in self.present:
                return False
            self.present.discard(d.element)
            into.append(d.element)
            return True

        result: bool = self._maybe_fail(effect)
        return result

    def retry_later(self, d: Delivery, delay: float) -> bool:
        return self._move(d, self.retried)

    def dead_letter(self, d: Delivery, record: dict[str, Any]) -> bool:
        return self._move(d, self.dead)


@pytest.fixture
def fake() -> FakeQueue:
    return FakeQueue()


def outbox(fake: FakeQueue, settled: list[tuple[Failure, bool]]) -> Outbox:
    queue: ReliableQueue = fake  # type: ignore[assignment]
    return Outbox(queue, lambda failure, moved: settled.append((failure, moved)))


def test_acks_wait_for_the_next_take_and_go_together(fake: FakeQueue) -> None:
    box = outbox(fake, [])
    twins = [delivery(n) for n in range(1, 4)]
    fake.present.update(d.element for d in twins)
    for d in twins:
        box.ack(d, now=100.0)
    assert fake.acked == [] and not box.acks_overdue(100.0 + ACK_INTERVAL / 2)
    assert box.acks_overdue(100.0 + ACK_INTERVAL * 2)
    box.take(5)
    assert fake.acked == [d.element for d in twins] and box.empty
    assert fake.trims == [3], "in take order: one trim"


@pytest.mark.parametrize("mode", ["before", "after"])
def test_acks_survive_a_lost_reply_and_are_sent_again_quietly(
    fake: FakeQueue, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    box = outbox(fake, [])
    d = delivery(1)
    fake.present.add(d.element)
    box.ack(d, now=0.0)
    fake.fail_next = mode
    with pytest.raises(redis.ConnectionError):
        box.take(1)
    assert not box.empty, "unconfirmed: kept"
    box.lost_reply()
    with caplog.at_level(logging.WARNING):
        box.flush()
    assert fake.acked == [d.element], "removed once, whatever happened to the first reply"
    assert box.empty and "may run twice" not in caplog.text


def test_an_ack_that_finds_nothing_outside_a_resend_is_a_warning(
    fake: FakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    box = outbox(fake, [])
    box.ack(delivery(1), now=0.0)  # not present: someone reclaimed it
    with caplog.at_level(logging.WARNING):
        box.flush()  # a trim refused, then the ack alone
    assert "1 ack(s) removed nothing" in caplog.text


@pytest.mark.parametrize("mode", ["before", "after"])
def test_a_failure_is_settled_exactly_once_across_a_lost_reply(fake: FakeQueue, mode: str) -> None:
    settled: list[tuple[Failure, bool]] = []
    box = outbox(fake, settled)
    d = delivery(1)
    fake.present.add(d.element)
    fake.fail_next = mode
    with pytest.raises(redis.ConnectionError):
        box.fail(Failure(d, {"reason": "boom", "attempts": 1}, delay=1.0))
    assert settled == [] and not box.empty
    box.lost_reply()
    box.flush()
    assert fake.retried == [d.element]
    assert [(f.delivery, moved) for f, moved in settled] == [(d, True)], "counted once"


def test_a_failure_moved_by_someone_else_is_reported_as_not_moved(fake: FakeQueue) -> None:
    settled: list[tuple[Failure, bool]] = []
    box = outbox(fake, settled)
    box.fail(Failure(delivery(1), {"reason": "boom", "attempts": 3}, delay=None))
    assert fake.dead == [] and [moved for _, moved in settled] == [False]


def test_what_must_precede_the_acks_is_sent_first(fake: FakeQueue) -> None:
    order: list[str] = []
    queue: ReliableQueue = fake  # type: ignore[assignment]
    box = Outbox(queue, lambda f, moved: None, lambda: order.append("before"))
    original = fake.take

    def take(
        acks: list[bytes], limit: int, landed: bool = False, trim: int = 0, *_: Any, **__: Any
    ) -> Taken:
        order.append(f"take {trim or len(acks)}")
        return original(acks, limit, landed, trim)

    fake.take = take  # type: ignore[method-assign]
    box.take(1)
    d = delivery(1)
    fake.present.add(d.element)
    box.ack(d, now=0.0)
    box.take(1)
    assert order == ["take 0", "before", "take 1"], "only acks wait for it"


def test_acks_out_of_take_order_go_one_by_one(fake: FakeQueue) -> None:
    box = outbox(fake, [])
    first, second = delivery(1), delivery(2)
    fake.present.update([first.element, second.element])
    box.ack(second, now=0.0)
    box.ack(first, now=0.0)
    box.take(1)
    assert sorted(fake.acked) == [first.element, second.element] and fake.trims == []


def test_a_trim_the_list_refuses_removes_nothing_and_goes_again_one_by_one(
    fake: FakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    box = outbox(fake, [])
    first, unsettled, third = delivery(1), delivery(2), delivery(3)
    # a delivery this outbox does not know of sits between its acks
    fake.present.update([first.element, unsettled.element, third.element])
    box.ack(first, now=0.0)
    box.ack(third, now=0.0)
    box.take(1)
    assert fake.acked == [] and not box.empty, "refused: kept for the next trip"
    with caplog.at_level(logging.WARNING):
        box.flush()
    assert fake.acked == [first.element, third.element] and box.empty
    assert fake.present == [unsettled.element], "what was not acked stays"
    assert "removed nothing" not in caplog.text
    fake.present.discard(unsettled.element)  # settled elsewhere (retried, say)
    box.ack(delivery(4), now=0.0)
    fake.present.add(delivery(4).element)
    box.flush()
    assert fake.trims == [1], "one by one only once"


def test_deliveries_read_back_from_redis_are_never_trimmed(fake: FakeQueue) -> None:
    box = outbox(fake, [])
    d = Delivery.parse(delivery(1).element)  # seq 0: its place in the list is unknown
    fake.present.add(d.element)
    box.ack(d, now=0.0)
    box.flush()
    assert fake.acked == [d.element] and fake.trims == []
