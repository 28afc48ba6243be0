"""The outbox of settlements, against a fake queue: what is pending stays pending until Redis
confirms it, is sent again after a lost reply, and a resend's miss is not a warning."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from rqworkers.outbox import ACK_INTERVAL, Failure, Outbox
from rqworkers.queue import Delivery, Keys, ReliableQueue, Taken


def delivery(n: int, payload: bytes = b"same") -> Delivery:
    return Delivery(b"rqw1:id%d:0:" % n + payload, b"id%d" % n, 0, payload)


class FakeQueue:
    """Records what reaches "Redis"; `fail_next` makes the next call raise, before or after
    it took effect (`lost_reply`), as a dropped connection would."""

    def __init__(self) -> None:
        self.keys = Keys.of("jobs", "n:1")
        self.present: set[bytes] = set()
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

    def take(self, acks: list[bytes], limit: int, landed: bool = False) -> Taken:
        def effect() -> Taken:
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
    twins = [delivery(n) for n in range(3)]
    fake.present.update(d.element for d in twins)
    for d in twins:
        box.ack(d, now=100.0)
    assert fake.acked == [] and not box.acks_overdue(100.0 + ACK_INTERVAL / 2)
    assert box.acks_overdue(100.0 + ACK_INTERVAL * 2)
    box.take(5)
    assert fake.acked == [d.element for d in twins] and box.empty


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
        box.take(1)
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

    def take(acks: list[bytes], limit: int, landed: bool = False) -> Taken:
        order.append(f"take {len(acks)}")
        return original(acks, limit, landed)

    fake.take = take  # type: ignore[method-assign]
    box.take(1)
    d = delivery(1)
    fake.present.add(d.element)
    box.ack(d, now=0.0)
    box.take(1)
    assert order == ["take 0", "before", "take 1"], "only acks wait for it"
