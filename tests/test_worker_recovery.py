"""The worker loop when Redis loses a reply: nothing settled runs again, nothing is lost.

These drive `Worker` in-process against a real redis-server, with a queue whose `take`
fails at a chosen moment: before Redis ran it, or after (the reply is lost).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from rqworkers.client.producer import Producer
from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.manager.slots import Slot
from rqworkers.store.keys import Keys
from rqworkers.store.queue import Delivery, ReliableQueue, Taken, read_private_list
from rqworkers.worker.dispatch import ConcurrentWorker
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import Worker, WorkerSpec
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import RedisServer, step_through_outages

HANDLED: list[bytes] = []


def record(message: bytes) -> None:
    HANDLED.append(message)


class FlakyQueue(ReliableQueue):
    """Fails the `fail_at`-th take, `after` Redis ran it (reply lost) or before."""

    def __init__(self, client: redis.Redis, fail_at: int, after: bool) -> None:
        super().__init__(client, "jobs", "node:1", keep_connection=True)
        self.takes = 0
        self.fail_at = fail_at
        self.after = after

    def take(self, *args: Any, **kwargs: Any) -> Taken:
        self.takes += 1
        if self.takes == self.fail_at and not self.after:
            raise redis.ConnectionError("connection reset before the command was sent")
        taken = super().take(*args, **kwargs)
        if self.takes == self.fail_at:
            raise redis.ConnectionError("connection reset before the reply arrived")
        return taken


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    HANDLED.clear()
    conn = redis_server.client()
    yield conn
    conn.close()


def run_worker(queue: ReliableQueue, prefetch: int, messages: int) -> Worker:
    pair = PairSettings(
        host="h", queue="jobs", handler="tests.test_worker_recovery:record", prefetch=prefetch
    )
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), None, b"", lease_ttl=30)
    worker = Worker(spec, Handler(pair.handler), queue, Scoreboard(), StopFlag())
    worker.outage.backoff = type(worker.outage.backoff)(base=0.0, cap=0.0)
    for _ in range(10 * messages):
        try:
            worker.step()
        except redis.ConnectionError as exc:
            worker.lose_track()
            worker.outage.record(exc)
        if len(HANDLED) >= messages and not worker.batch:
            break
    worker.finish()
    return worker


@pytest.mark.parametrize("after", [True, False], ids=["reply-lost", "never-sent"])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_identical_payloads_survive_a_lost_take(
    client: redis.Redis, after: bool, prefetch: int, tmp_path: Path
) -> None:
    # P, P: the second has the same bytes as the first, and is taken by the very round trip
    # that carries the first one's ack.
    client.lpush("jobs", b"P", b"P", b"X", b"Y")
    worker = run_worker(FlakyQueue(client, fail_at=2, after=after), prefetch, messages=4)
    assert sorted(HANDLED) == [b"P", b"P", b"X", b"Y"], "each once, none lost"
    assert client.llen("jobs") == 0
    assert client.llen(Keys("jobs", "node:1").processing) == 0
    assert client.zcard(Keys("jobs").retry) == 0 and client.llen(Keys("jobs").dead) == 0
    assert worker.board.in_flight() == 0


# -- what a SIGKILL would charge, at every handler start, on both loops ---------------------

CHARGED: list[tuple[bytes, bool]] = []  # (payload, whether a kill now charges what started)
RUNNING: list[Worker] = []


def private_list(worker: Worker) -> list[bytes]:
    """`worker`'s private list, oldest first, as envelopes (a segment's members too: the
    envelopes a replay gives them, see lua/envelope.lua)."""
    elements = worker.queue.client.lrange(worker.queue.keys.processing, 0, -1)
    return [d.element for d in read_private_list(cast(list[bytes], elements))]


def what_a_kill_charges() -> list[bytes]:
    """The private list's envelopes a successor would charge were this worker killed now:
    those older than the scoreboard's mark, or all of them if no envelope has its id."""
    worker = RUNNING[0]
    mark = worker.board.first_unstarted
    elements = private_list(worker)
    ids = [Delivery.parse(element).id for element in elements]
    return elements[: ids.index(mark)] if mark in ids else elements


def charge_check(message: bytes) -> None:
    """Records whether a kill now would charge exactly the deliveries that reached a
    handler (this one, and those finished but not yet acked), then raises for `raise`."""
    worker = RUNNING[0]
    unstarted = {delivery.element for delivery, _ in worker.batch}
    elements = private_list(worker)
    started = [element for element in elements if element not in unstarted]
    CHARGED.append((message, what_a_kill_charges() == started))
    if message == b"raise":
        raise ValueError("boom")


class ChargeCheckWithCallback:
    """`charge_check` with an `on_success`: its worker takes the general path."""

    def handle(self, message: bytes) -> None:
        charge_check(message)

    def on_success(self, message: bytes, result: object) -> None:
        pass


@pytest.mark.parametrize(
    "handler",
    [
        "tests.test_worker_recovery:charge_check",
        "tests.test_worker_recovery:ChargeCheckWithCallback",
    ],
    ids=["lean", "general"],
)
def test_a_kill_at_any_handler_start_charges_exactly_what_started(
    client: redis.Redis, redis_server: RedisServer, handler: str
) -> None:
    """Leftovers with attempts, twins, a prioritised and a deduplicated message and a failure
    in one batch: at every handler start, the scoreboard's mark leaves charged exactly the
    delivery in the handler and those finished but unacked, on the lean loop as on the
    general path, whose scoreboard counts it matches."""
    CHARGED.clear()
    RUNNING.clear()
    pair = PairSettings(host="h", queue="jobs", handler=handler, prefetch=10, retry_delay=0.0)
    client.lpush("jobs", b"left1", b"left2")
    first = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    assert len(first.take([], 2).deliveries) == 2
    # The first worker died in left1: its mark names left2, which never started.
    previous = f"{first._id_prefix}.1.2".encode()
    producer = Producer(redis_server.url)
    producer.push("jobs", b"twin", b"twin", b"raise", b"plain")
    producer.push("jobs", b"urgent", priority=5)
    producer.push("jobs", b"once", dedup_key="k")
    producer.push("jobs", b"twin")
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), "killed", previous, lease_ttl=30)
    worker = Worker(spec, Handler(handler), queue, Scoreboard(), StopFlag())
    assert worker.can_run_lean() == handler.endswith(":charge_check")
    RUNNING.append(worker)
    try:
        for _ in range(50):
            worker.step()
            if len(CHARGED) == 10:
                break
    finally:
        worker.finish()
    assert [m for m, _ in CHARGED] == [
        b"left1", b"left2", b"urgent", b"twin", b"twin", b"raise", b"plain", b"once", b"twin",
        b"raise",
    ]  # fmt: skip
    assert [m for m, exact in CHARGED if not exact] == []
    assert (worker.board.succeeded, worker.board.failed) == (8, 2)
    assert sum(worker.board.buckets()) == 10
    assert client.llen(queue.keys.processing) == 0 and client.llen("jobs") == 0
    retried = cast(list[bytes], client.zrange(queue.keys.retry, 0, -1))
    assert [r.rsplit(b":", 2)[1:] for r in retried] == [[b"2", b"raise"]], "to run a third time"


@pytest.mark.parametrize("after", [True, False], ids=["reply-lost", "never-sent"])
def test_a_kill_at_any_start_of_a_replay_after_a_lost_take_charges_exactly_what_started(
    client: redis.Redis, after: bool
) -> None:
    """The lean loop moves the mark along a take by number (`Scoreboard.start`). After a
    Redis error its batch is the replay's leftovers, not that take's: at each of their
    handler starts too, a kill charges exactly what started."""
    CHARGED.clear()
    RUNNING.clear()
    handler = "tests.test_worker_recovery:charge_check"
    pair = PairSettings(host="h", queue="jobs", handler=handler, prefetch=4)
    client.lpush("jobs", *[b"m%d" % n for n in range(12)])
    queue = FlakyQueue(client, fail_at=2, after=after)
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), None, b"", lease_ttl=30)
    worker = Worker(spec, Handler(handler), queue, Scoreboard(), StopFlag())
    worker.outage.backoff = type(worker.outage.backoff)(base=0.0, cap=0.0)
    assert worker.can_run_lean()
    RUNNING.append(worker)
    try:
        for _ in range(50):
            try:
                worker.step()
            except redis.ConnectionError as exc:
                worker.lose_track()
                worker.outage.record(exc)
            if len(CHARGED) == 12:
                break
    finally:
        worker.finish()
    assert sorted(m for m, _ in CHARGED) == sorted(b"m%d" % n for n in range(12))
    assert [m for m, exact in CHARGED if not exact] == []
    assert client.llen(queue.keys.processing) == 0 and client.llen("jobs") == 0


@pytest.mark.parametrize(
    ("kind", "handler"),
    [
        (Worker, "tests.test_worker_recovery:record"),
        (Worker, "tests.test_worker_recovery:ChargeCheckWithCallback"),
        (ConcurrentWorker, "tests.test_worker_recovery:record"),
    ],
    ids=["lean", "general", "concurrent"],
)
def test_a_kill_after_an_exhausted_leftover_charges_nothing_the_next_take_brought(
    client: redis.Redis, kind: type[Worker], handler: str
) -> None:
    """A leftover that used up its attempts is dead-lettered unhandled; the scoreboard's
    mark, which named it, must move on: a worker killed as its next take arrives has
    started none of what that take brought, and its successor charges none of it."""
    HANDLED.clear()
    RUNNING.clear()
    pair = PairSettings(
        host="h", queue="jobs", handler=handler, prefetch=10, max_attempts=1, concurrency=2
    )
    client.lpush("jobs", b"doomed")
    assert ReliableQueue(client, "jobs", "node:1", keep_connection=True).take([], 1).deliveries
    # Its worker died, and which of its deliveries had started is unknown: all are charged.
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), "killed", None, lease_ttl=30)
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    board = Scoreboard()
    worker = kind(spec, Handler(handler), queue, board, StopFlag())
    RUNNING.append(worker)
    try:
        worker.resume()
        if isinstance(worker, ConcurrentWorker):
            worker.start_what_fits()
        else:
            assert worker.run_batch() is None
        assert client.lrange(queue.keys.dead, 0, -1) == [b"doomed"] and HANDLED == []
        client.lpush("jobs", b"a", b"b")
        assert worker.fill_batch() and len(worker.batch) == 2
        # Killed now, as the take's reply arrived: its successor replays the private list.
        assert what_a_kill_charges() == [], "a and b never reached a handler"
        charge_before = board.first_unstarted
    finally:
        worker.batch.clear()  # "killed": nothing given back
        worker.finish()
    successor = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    replayed = successor.replay(charge_before)
    assert [(d.payload, d.attempts) for d in replayed] == [(b"a", 0), (b"b", 0)]


def test_a_worker_killed_in_its_replay_leaves_each_started_delivery_charged_once(
    client: redis.Redis,
) -> None:
    client.lpush("jobs", b"ran", b"never")
    first = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    _, never = first.take([], 2).deliveries
    mark = never.id  # the first worker died in `ran`
    second = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    assert [(d.payload, d.attempts) for d in second.replay(mark)] == [(b"ran", 1), (b"never", 0)]
    # Killed before its scoreboard said `replayed`: its manager passes the same mark on, and
    # names the process whose replay charged what carries its ids.
    third = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    replayed = third.replay(mark, spared=[second.owner_name])
    assert [(d.payload, d.attempts) for d in replayed] == [(b"ran", 1), (b"never", 0)]


class _Killed(BaseException):
    """The worker's end at the worst instant (SIGKILL)."""


def test_a_slot_spares_what_a_worker_killed_in_its_replay_had_charged(
    client: redis.Redis,
) -> None:
    """The whole way: a worker killed after its REPLAY charged `ran`, before its scoreboard
    said `replayed`; its slot passes the old mark on, with the killed process's id, and the
    next worker's replay charges `ran` no second time, and `never` not at all."""
    client.lpush("jobs", b"ran", b"never")
    first = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    _, never = first.take([], 2).deliveries
    pair = PairSettings(host="h", queue="jobs", handler="tests.test_loop:handle", prefetch=10)
    slot = Slot(pair, 1, "jobs-1", "node:1")
    slot.previous_unstarted = never.id  # the first worker died in `ran`
    backoff = ExponentialBackoff(base=0.5, cap=30.0, free=1)

    def start() -> Worker:
        slot.board.prepare()
        slot.spawned(os.getpid(), now=100.0)
        spec = WorkerSpec(
            pair, "jobs-1", "node:1", os.getppid(), "killed", slot.previous_unstarted,
            lease_ttl=30, spared=slot.spared,
        )  # fmt: skip
        queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
        return Worker(spec, Handler(pair.handler), queue, slot.board, StopFlag())

    second = start()

    def killed() -> None:
        raise _Killed

    second.board.replayed = killed  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        second.resume()
    del second.board.replayed  # the slot's board, which its next worker writes as it should
    slot.ended(signal.SIGKILL, now=101.0, backoff=backoff)
    assert slot.previous_unstarted == never.id and slot.spared == (second.queue.owner_name,)
    # Handed on for the keeper too, should it reclaim the list before the next worker starts.
    assert slot.board.first_unstarted == never.id and slot.board.spared == slot.spared
    third = start()
    third.resume()
    assert [(d.payload, d.attempts) for d, _ in third.batch] == [(b"ran", 1), (b"never", 0)]
    third.board.mark_unstarted(b"")  # it ran both, and recycled: the slot forgets the spared
    slot.ended(0, now=102.0, backoff=backoff)
    assert slot.spared == () and slot.previous_unstarted == b""


# -- kills at every step of a replay, one or two in a row ------------------------------------

# Where a successor may die in its replay: (object, method, before or after it ran).
REPLAY_STEPS = [
    ("board", "replay_begun", "before"),  # nothing written yet
    ("board", "replay_begun", "after"),  # named on the scoreboard, nothing sent to Redis
    ("queue", "_take_over", "after"),  # a fast list moved in, charged, REPLAY not sent
    ("queue", "_replay", "after"),  # REPLAY charged and renamed, reply not read
    ("queue", "give_back", "after"),  # under a limit: leftovers back in the queue
    ("board", "replayed", "before"),  # its new mark written, not yet that it replayed
]


def _die_at(worker: Worker, step: tuple[str, str, str]) -> None:
    """Make `worker` end (as by SIGKILL) at `step` of its replay, should it get there."""
    where, name, when = step
    target = worker.board if where == "board" else worker.queue
    real = getattr(target, name)

    def killed(*args: Any, **kwargs: Any) -> None:
        if when == "after":
            real(*args, **kwargs)
        raise _Killed

    setattr(target, name, killed)


def _attempts(client: redis.Redis, keys: Keys) -> dict[bytes, list[int]]:
    """Every copy of every message of the worker, wherever it is, with its attempts."""
    found: dict[bytes, list[int]] = {}
    in_flight = read_private_list(cast(list[bytes], client.lrange(keys.processing, 0, -1)))
    retrying = [Delivery.parse(e) for e in cast(list[bytes], client.zrange(keys.retry, 0, -1))]
    for delivery in [*in_flight, *retrying]:
        found.setdefault(delivery.payload, []).append(delivery.attempts)
    for payload in cast(
        list[bytes], [*client.lrange("jobs", 0, -1), *client.lrange(keys.landing, 0, -1)]
    ):
        found.setdefault(payload, []).append(0)
    return found


def _start(client: redis.Redis, slot: Slot, fast: bool) -> Worker:
    """The next worker of `slot`, as its manager starts it (in this process)."""
    slot.board.prepare()
    slot.spawned(os.getpid(), now=100.0)
    pair = slot.pair
    spec = WorkerSpec(
        pair, "jobs-1", "node:1", os.getppid(), "killed", slot.previous_unstarted,
        lease_ttl=30, spared=slot.spared,
    )  # fmt: skip
    queue = ReliableQueue(client, "jobs", "node:1", limits=pair.limits, fast_path=fast)
    return Worker(spec, Handler(pair.handler), queue, slot.board, StopFlag())


@pytest.mark.parametrize(
    "case", ["script", "limits", "new-manager", "fast-started", "fast-unstarted"]
)
def test_kills_at_any_step_of_one_or_two_replays_charge_each_started_delivery_once(
    client: redis.Redis, case: str
) -> None:
    """The first worker died with `ran` started and `never` not (a fast delivery on the fast
    path), a message landed and an element that is no envelope; its successors are killed
    at every step of their replay, once or twice in a row, through the slot. The worker
    that replays at last finds `ran` charged once and nothing else charged (or, after a
    new manager, which knows nothing, every delivery once)."""
    fast = case.startswith("fast")
    limits: dict[str, Any] = {"max_running": 5} if case == "limits" else {}
    pair = PairSettings(host="h", queue="jobs", handler="tests.test_worker_recovery:record",
                        prefetch=1 if fast else 10, **limits)  # fmt: skip
    combos = [(), *[(s,) for s in REPLAY_STEPS], *itertools.product(REPLAY_STEPS, repeat=2)]
    wrong = []
    for combo in combos:
        client.flushdb()
        first = ReliableQueue(client, "jobs", "node:1", fast_path=fast)
        if fast:
            first.replay(b"")
            first._pause_looked_up = float("inf")  # no look for a pause: the fast path takes
            client.lpush("jobs", b"ran")
            mark = first.next_take_id if case == "fast-unstarted" else b""
            assert first.take([], 1).deliveries[0].fast
            expected = {b"ran": [0 if case == "fast-unstarted" else 1]}
        else:
            client.rpush(first.keys.processing, b"no envelope")  # never reached a handler
            client.lpush("jobs", b"ran", b"never")
            mark = first.take([], 2).deliveries[1].id
            expected = {b"no envelope": [0], b"ran": [1], b"never": [int(case == "new-manager")]}
        client.lpush(first.keys.landing, b"landed")
        expected[b"landed"] = [0]
        slot = Slot(pair, 1, "jobs-1", "node:1")
        slot.previous_unstarted = None if case == "new-manager" else mark
        backoff = ExponentialBackoff(base=0.5, cap=30.0, free=1)
        for step in combo:
            worker = _start(client, slot, fast)
            _die_at(worker, step)
            with contextlib.suppress(_Killed):  # not every step is on every path
                worker.resume()
            vars(slot.board).pop(step[1], None)  # the slot's board: its next worker's too
            slot.ended(signal.SIGKILL, now=101.0, backoff=backoff)
        _start(client, slot, fast).resume()
        found = _attempts(client, Keys("jobs", "node:1"))
        if found != expected:
            wrong.append((combo, found))
    assert wrong == []


# -- what a SIGKILL would charge at every call to Redis, not only at handler starts ----------

WATCHED: list[tuple[str, bool]] = []  # (where, whether a kill there charges what started)
FAILED_ONCE: set[bytes] = set()
IN_HAND: set[bytes] = set()  # popped by `Worker.deliver`, its handler not yet started


def watch(where: str, unstarted: Iterable[bytes] = ()) -> None:
    """Record whether a kill now would charge exactly what reached a handler: the private
    list's deliveries but those taken and not started (the batch, `unstarted` and the
    one `Worker.deliver` has in hand before its handler starts). Not while the worker
    replays after a lost reply: its batch is then unknown, and its mark stays."""
    worker = RUNNING[0]
    if worker.replaying:
        return
    taken = {d.element for d, _ in worker.batch}.union(unstarted, IN_HAND)
    started = [element for element in private_list(worker) if element not in taken]
    WATCHED.append((where, what_a_kill_charges() == started))


def watched_handler(message: bytes) -> None:
    """Watches, may stop its worker (as SIGTERM would), raises once for `raise...`."""
    IN_HAND.clear()
    watch("handler")
    if message == b"stop":
        RUNNING[0].on_stop_signal(signal.SIGTERM, None)
        watch("handler, the batch given back")
    if message.startswith(b"raise") and message not in FAILED_ONCE:
        FAILED_ONCE.add(message)
        raise ValueError("boom")


class WatchedQueue(ReliableQueue):
    """Watches before and after each take (a flush's too), retry and give-back, and loses
    the reply of the takes in `lose` (before Redis ran it for an odd number)."""

    def __init__(self, client: redis.Redis, lose: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(client, "jobs", "node:1", keep_connection=True, **kwargs)
        self.lose = lose
        self.takes = 0

    def take(self, *args: Any, **kwargs: Any) -> Taken:
        watch("before a take")
        self.takes += 1
        if self.takes in self.lose and self.takes % 2:
            raise redis.ConnectionError("connection reset before the command was sent")
        taken = super().take(*args, **kwargs)
        watch("after a take", {d.element for d in taken.deliveries})
        if self.takes in self.lose:
            raise redis.ConnectionError("connection reset before the reply arrived")
        return taken

    def retry_later(self, delivery: Delivery, delay: float) -> bool:
        watch("before a retry")
        moved = super().retry_later(delivery, delay)
        watch("after a retry")
        return moved

    def give_back(self, unstarted: list[Delivery]) -> int:
        watch("before a give-back")
        return super().give_back(unstarted)


@pytest.mark.parametrize(
    ("settings", "lose"),
    [
        ({"prefetch": 10}, ()),
        ({"prefetch": 4}, (2, 3, 6, 9)),
        ({"prefetch": 3, "level0_every": 2}, (4, 7)),
        ({"prefetch": 10, "max_requests": 7}, ()),
        ({"prefetch": 1, "fast_path": True}, (3, 6)),
    ],
    ids=["prefetch-10", "lost-replies", "level0-every", "max-requests", "fast-path"],
)
def test_a_kill_at_any_call_to_redis_charges_exactly_what_started(
    client: redis.Redis, redis_server: RedisServer, settings: dict[str, Any], lose: tuple[int, ...]
) -> None:
    """Plain messages among retries, prioritised, deduplicated and failing ones, on the lean
    loop, with lost replies, `level0_every`, `max_requests`, the fast path and a stop
    mid-batch: before and after every take, flush, retry and give-back, as at every
    handler start, a kill charges exactly the deliveries that reached a handler."""
    WATCHED.clear()
    RUNNING.clear()
    FAILED_ONCE.clear()
    IN_HAND.clear()
    handler = "tests.test_worker_recovery:watched_handler"
    fast = settings.pop("fast_path", False)
    pair = PairSettings(host="h", queue="jobs", handler=handler, retry_delay=0.0, **settings)
    producer = Producer(redis_server.url)
    producer.push("jobs", b"a", b"raise1", b"b", b"twin", b"twin", b"c", b"raise2", b"d")
    producer.push("jobs", b"urgent", priority=5)
    producer.push("jobs", b"e", b"f", b"g")
    producer.push("jobs", b"once", dedup_key="k")
    producer.push("jobs", b"h", b"raise3", b"i", b"j", b"k", b"stop", b"l", b"m", b"n")
    queue = WatchedQueue(client, lose, level0_every=pair.level0_every, fast_path=fast)
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), None, b"", lease_ttl=30)
    worker = Worker(spec, Handler(handler), queue, Scoreboard(), StopFlag())
    worker.outage.backoff = type(worker.outage.backoff)(base=0.0, cap=0.0)
    real_deliver = worker.deliver

    def deliver(delivery: Delivery, lost_reason: str) -> bool:
        IN_HAND.add(delivery.element)
        return real_deliver(delivery, lost_reason)

    worker.deliver = deliver  # type: ignore[method-assign]
    assert worker.can_run_lean()
    RUNNING.append(worker)
    try:
        step_through_outages(worker, 200)
    finally:
        worker.finish()
    assert [where for where, exact in WATCHED if not exact] == []
    places = {where for where, _ in WATCHED}
    assert {"handler", "before a take", "after a take", "before a retry"} <= places
    # `max_requests` recycles before `stop`, having taken no more than it would start
    assert ("handler, the batch given back" in places) == ("max_requests" not in settings)
