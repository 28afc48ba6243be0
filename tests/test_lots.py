"""A take's deliveries kept whole (`Lot`), the worker's `Batch` over them, and the outbox's
runs of their acks: the lean loop makes no `Delivery` for a member that succeeds, so these
check that every reader still sees exactly the deliveries a take made, twins, empty,
wrapped and retried payloads included, and that every path settles each exactly once.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any, cast

import fakeredis
import pytest
import redis

from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode
from rqworkers.store import levels
from rqworkers.store.fast import fast_lists
from rqworkers.store.queue import Delivery, Lot, ReliableQueue, Taken, read_private_list, wrap_dedup
from rqworkers.worker.batch import LOST_WORKER, Batch
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import Worker, WorkerSpec
from rqworkers.worker.scoreboard import Scoreboard

SEEN: list[bytes] = []
WRAPPED = levels.wrap(3, b"urgent")


def handle(message: bytes) -> None:
    """Records each payload it sees; `raise` raises, as a failing handler would."""
    SEEN.append(message)
    if message == b"raise":
        raise ValueError("boom")


def _lot(payloads: list[bytes], attempts: list[int] | None = None) -> Lot:
    return Lot(payloads, attempts or [0] * len(payloads), [], b"p1.7.", 40)


def _same(a: Delivery, b: Delivery) -> bool:
    return (a.id, a.attempts, a.payload, a.seq, a.element) == (
        b.id, b.attempts, b.payload, b.seq, b.element
    )  # fmt: skip


def test_a_lot_makes_the_deliveries_a_take_made_one_by_one_or_all_at_once() -> None:
    payloads = [b"twin", b"twin", b"", WRAPPED, b"x" * 100_000, b"retry"]
    lot = _lot(payloads, [0, 0, 0, 0, 0, 2])
    assert not lot.plain  # a wrapped payload and a retry: each needs its Delivery
    whole = lot.deliveries()
    assert [d.id for d in whole] == [b"p1.7.%d" % n for n in range(1, 7)]
    assert [d.seq for d in whole] == list(range(41, 47))
    assert whole[3].payload == b"urgent" and whole[3].level == 3
    assert whole[3].element == b"rqw1:p1.7.4:0:" + WRAPPED  # as it sits in the list
    assert whole[5].attempts == 2 and whole[0].element != whole[1].element  # twins differ
    assert all(_same(lot.delivery(i), d) for i, d in enumerate(whole))
    assert all(_same(a, b) for a, b in zip(lot.deliveries(2, 5), whole[2:5], strict=True))
    assert lot.deliveries(4, 4) == [] and lot.element(1) == whole[1].element
    assert _lot([b"a", b"", b"twin", b"twin"]).plain


def test_a_batch_keeps_a_take_whole_and_hands_out_its_deliveries_in_order() -> None:
    batch = Batch()
    lot = _lot([b"a", b"b", b"c"])
    batch.add(Taken(0, lot, None), whole=True)
    assert batch.lot is lot and len(batch) == 3 and batch.first_id() == b"p1.7.1"
    first, reason = batch.popleft()
    assert (first.id, first.payload, reason) == (b"p1.7.1", b"a", LOST_WORKER)
    assert [d.payload for d, _ in batch] == [b"b", b"c"] and batch.first_id() == b"p1.7.2"
    # More behind it: the lot's rest becomes deliveries that wait, in order, before them.
    batch.extend([(Delivery(b"q.1", 1, b"d"), "why")])
    assert batch.lot is None and [d.payload for d in batch.deliveries()] == [b"b", b"c", b"d"]
    # A take that finds deliveries waiting is queued behind them as deliveries.
    batch.add(Taken(0, _lot([b"e"]), None), whole=True)
    assert [d.payload for d in batch.deliveries()] == [b"b", b"c", b"d", b"e"]
    batch.clear()
    assert not batch and len(batch) == 0 and batch.first_id() == b""
    batch.add(Taken(0, _lot([b"z"]), None), whole=True)
    batch.moved_to(1)  # started: nothing left
    assert not batch and batch.lot is None and batch.first_id() == b""
    with pytest.raises(IndexError):
        batch.popleft()


def _worker(client: Any, fast_path: bool = False, **settings: Any) -> Worker:
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True, fast_path=fast_path)
    settings.setdefault("retry_delay", 0.0)
    pair = PairSettings(host="h", queue="jobs", handler="tests.test_lots:handle", **settings)
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), None, b"", lease_ttl=30)
    return Worker(spec, Handler("tests.test_lots:handle"), queue, Scoreboard(), StopFlag())


def _drain(worker: Worker, done: int) -> None:
    try:
        for _ in range(200):
            assert worker.step() is None
            if worker.board.succeeded + worker.board.failed >= done and not worker.batch:
                break
        worker.outbox.flush()
    finally:
        worker.finish()


def test_the_lean_loop_settles_every_kind_of_member_once(client: redis.Redis) -> None:
    """Twins, an empty payload, a wrapped one, a deduplicated one, a failure between
    successes and a huge one, in one take: each handled once in order, the failure retried,
    everything else acked; the private list ends empty (both backends)."""
    SEEN.clear()
    worker = _worker(client, prefetch=50, max_attempts=5)
    assert worker.can_run_lean()
    huge = b"h" * 1_000_000
    dedup = wrap_dedup("0" * 32, "k", b"once")
    pushed = [b"twin", b"twin", b"", WRAPPED, b"raise", b"after", dedup, huge, b"twin"]
    client.lpush("jobs", *pushed)
    worker.resume()
    assert worker.fill_batch() and worker.batch.lot is not None  # kept whole
    _drain(worker, len(pushed))
    assert [b"twin", b"twin", b"", b"urgent", b"raise", b"after", b"once", huge, b"twin"] == SEEN
    keys = worker.queue.keys
    assert worker.board.succeeded == 8 and worker.board.failed == 1
    assert client.llen(keys.processing) == 0 and client.llen("jobs") == 0
    assert client.zcard(keys.retry) == 1  # the failure, once
    assert worker.outbox.empty


def test_at_prefetch_1_a_fast_take_runs_lean_and_is_acked_by_name(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The fast path's take is a lot of one: run inline like any lot, and acked as a fast
    ack (its fast list, by payload), never as a trim (which the script would refuse, costing
    a round trip): twins, an empty payload and a failure leave the fast lists and the
    private list empty, the failure in the retry set."""
    caplog.set_level(logging.DEBUG, logger="rqworkers.worker.outbox")
    SEEN.clear()
    worker = _worker(client, fast_path=True, prefetch=1, retry_delay=3600.0)
    assert worker.can_run_lean()
    pushed = [b"twin", b"", b"raise", b"twin", b"last"]
    client.lpush("jobs", *pushed)
    worker.resume()
    worker.queue._pause_looked_up = float("inf")  # no look for a pause: the fast path takes
    lots = []
    took = worker.took

    def noting(taken: Taken) -> None:
        lots.append(taken.lot)
        took(taken)

    worker.took = noting  # type: ignore[method-assign]
    _drain(worker, len(pushed))
    assert pushed == SEEN
    assert any(lot is not None and lot.fast for lot in lots), "no take went the fast path"
    keys = worker.queue.keys
    for held in (*fast_lists(keys, worker.queue.owner_name.decode()), keys.processing):
        assert client.llen(held) == 0, f"{held} still holds {client.lrange(held, 0, -1)}"
    assert client.llen("jobs") == 0 and client.zcard(keys.retry) == 1
    assert worker.board.succeeded == 4 and worker.outbox.empty
    assert "sent one by one" not in caplog.text


def test_a_stop_signal_in_a_handler_gives_back_exactly_the_unstarted_members(
    client: redis.Redis,
) -> None:
    SEEN.clear()
    worker = _worker(client, prefetch=10)
    client.lpush("jobs", *[b"m%d" % i for i in range(10)])
    worker.resume()
    assert worker.fill_batch()

    def stop_at_fourth(message: bytes) -> None:
        SEEN.append(message)
        if len(SEEN) == 4:
            worker.on_stop_signal(signal.SIGTERM, None)

    worker.handler.handle = stop_at_fourth
    try:
        assert worker.run_batch() is None
    finally:
        worker.finish()
    assert SEEN == [b"m0", b"m1", b"m2", b"m3"]
    assert client.lrange("jobs", 0, -1)[::-1] == [b"m%d" % i for i in range(4, 10)]
    assert client.llen(worker.queue.keys.processing) == 0, "the four started were acked"


def test_max_requests_ends_a_lot_at_exactly_that_many(client: redis.Redis) -> None:
    """A lot larger than what `max_requests` leaves (`take_limit` never takes one, so this
    builds it by hand) ends the worker at exactly that many, the rest given back."""
    SEEN.clear()
    worker = _worker(client, prefetch=10, max_requests=4, max_requests_jitter=0)
    client.lpush("jobs", *[b"m%d" % i for i in range(10)])
    worker.resume()
    worker.took(worker.queue.take([], 8))
    try:
        assert worker.run_batch() == ExitCode.MAX_REQUESTS
    finally:
        worker.finish()
    assert SEEN == [b"m0", b"m1", b"m2", b"m3"]
    assert client.llen(worker.queue.keys.processing) == 0  # acked, or given back
    assert client.lrange("jobs", 0, -1)[::-1] == [b"m%d" % i for i in range(4, 10)]


def test_runs_of_acks_join_or_fall_back_to_one_by_one() -> None:
    """The outbox's run of a lot's acks: joined while contiguous, made deliveries behind a
    gap or ahead of a Delivery's ack, and in every case each ack sent once."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(client, prefetch=10)
    client.lpush("jobs", *[b"m%d" % i for i in range(6)])
    worker.resume()
    taken = worker.queue.take([], 6)
    lot = taken.lot
    assert lot is not None
    outbox = worker.outbox
    outbox.ack_run(lot, 0, 1, 1.0)
    outbox.ack_run(lot, 2, 2, 2.0)  # contiguous: one run
    assert outbox.lot is lot and (outbox.first, outbox.last) == (0, 2)
    assert outbox.overdue_at(5.0) == pytest.approx(2.0)  # the oldest pending: 1.0 + 1 s
    outbox.ack_run(lot, 4, 4, 3.0)  # a gap (3 is still running): the first run unfolds
    assert [d.payload for d in outbox.acks] == [b"m0", b"m1", b"m2"]
    outbox.ack(lot.delivery(3), 4.0)  # a Delivery's ack goes behind the run
    assert outbox.lot is None and [d.payload for d in outbox.acks][-2:] == [b"m4", b"m3"]
    outbox.flush()
    assert outbox.empty and worker.board.get("settled") == 5
    processing = worker.queue.keys.processing
    left = read_private_list(cast(list[bytes], client.lrange(processing, 0, -1)))
    assert [d.payload for d in left] == [b"m5"]


def test_a_refused_trim_of_a_run_is_sent_again_one_by_one() -> None:
    """A run claimed to be the list's oldest when it is not (another delivery sits below
    it) is refused whole, then sent one by one: nothing is removed that was not acked."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(client, prefetch=10)
    client.lpush("jobs", b"a", b"b", b"c", b"d")
    worker.resume()
    below = worker.queue.take([], 2)  # "a" and "b", below the next take's
    lot = worker.queue.take([], 2).lot
    assert lot is not None and below.count == 2
    worker.outbox.ack_run(lot, 0, 1, 1.0)
    worker.outbox.flush()
    processing = worker.queue.keys.processing
    listed = read_private_list(cast(list[bytes], client.lrange(processing, 0, -1)))
    assert [d.payload for d in listed] == [b"a", b"b"]
    assert worker.outbox.empty and worker.board.get("settled") == 2
