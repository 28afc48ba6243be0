"""A hostile review of the lean loop's lots (`Lot`, `Batch`, `Worker.run_lot`,
`Outbox.ack_run`): every settling order within a lot, a Redis error at every call while
lots run, the scoreboard's mark at every instant, stop signals, `max_requests`, timeouts and
ACK_INTERVAL mid-lot, and the real service killed mid-lot. Each checks that nothing is lost,
nothing is settled or handled twice, and a kill charges exactly the deliveries that ran.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, cast

import fakeredis
import pytest
import redis

from bench.redisproc import wait_for
from rqworkers.client.producer import Producer
from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode
from rqworkers.store import flow, levels
from rqworkers.store.flow import Limits
from rqworkers.store.keys import Keys
from rqworkers.store.queue import Delivery, Lot, ReliableQueue, Taken, read_private_list, wrap_dedup
from rqworkers.worker import batch as batch_module
from rqworkers.worker import dispatch, loop, outbox, scoreboard, settle
from rqworkers.worker.batch import Batch
from rqworkers.worker.dispatch import ConcurrentWorker
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import Worker, WorkerSpec
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import RedisServer, Service, step_through_outages

HANDLER = "tests.test_lots_review:handle"
HANDLED: list[bytes] = []
FAILED_ONCE: set[bytes] = set()
HOOKS: list[Callable[[bytes], None]] = []  # run by `handle` before it acts


def handle(message: bytes) -> None:
    """Records each payload; `fail...` always raises, `raise...` raises the first time,
    `slow` sleeps past any timeout a test sets."""
    HANDLED.append(message)
    for hook in HOOKS:
        hook(message)
    if message.startswith(b"fail"):
        raise ValueError("always")
    if message.startswith(b"raise") and message not in FAILED_ONCE:
        FAILED_ONCE.add(message)
        raise ValueError("once")
    if message == b"slow":
        time.sleep(5)


class WithCallback:
    """`handle` with an `on_success`: its worker runs the general path, not the lean loop."""

    def handle(self, message: bytes) -> None:
        handle(message)

    def on_success(self, message: bytes, result: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # An idle fetch returns at once: a drained queue ends a test's steps, not 10 s later.
    monkeypatch.setattr(loop, "BLOCK_TIMEOUT", 0.01)
    HANDLED.clear()
    FAILED_ONCE.clear()
    HOOKS.clear()
    yield
    HOOKS.clear()


def _worker(
    client: Any,
    cls: type[Worker] = Worker,
    queue_args: dict[str, Any] | None = None,
    previous: tuple[str | None, bytes] = (None, b""),  # how the last worker ended, its mark
    handler: str = HANDLER,
    **settings: Any,
) -> Worker:
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True, **(queue_args or {}))
    settings.setdefault("retry_delay", 0.0)
    pair = PairSettings(host="h", queue="jobs", handler=handler, **settings)
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), *previous, lease_ttl=30)
    worker = cls(spec, Handler(handler), queue, Scoreboard(), StopFlag())
    worker.outage.backoff = type(worker.outage.backoff)(base=0.0, cap=0.0)
    return worker


def _craft(worker: Worker, members: list[tuple[bytes, int]]) -> Lot:
    """Put `members` (payload, attempts) in `worker`'s private list as a take into it would
    (envelopes, in take order) and hand the worker their lot, as `took` does with a take's:
    a retry's attempts can then sit anywhere in a lot, not only at its head."""
    queue = worker.queue
    prefix = queue._id_base().encode()
    before = queue._seq
    queue._seq += len(members)
    envelopes = [b"rqw1:%s%d:%d:%s" % (prefix, n + 1, a, p) for n, (p, a) in enumerate(members)]
    queue.client.lpush(queue.keys.processing, *envelopes)
    lot = Lot([p for p, _ in members], [a for _, a in members], [], prefix, before)
    worker.took(Taken(0, lot, None))
    assert (worker.batch.lot is lot) == worker.can_run_lean()  # kept whole by the lean loop
    return lot


def _run_batch(worker: Worker) -> None:
    """Run the batch in hand to its end, send what it settled, and finish the worker."""
    try:
        assert worker.run_batch() is None
        worker.outbox.flush()
    finally:
        worker.finish()


def _run_all(worker: Worker, steps: int, messages: int) -> None:
    """Step `worker` through outages until `messages` are handled, then stop it as SIGTERM
    would and let it finish what is in flight."""
    try:
        step_through_outages(worker, steps, lambda: len(HANDLED) == messages)
        worker.stop(signal.SIGTERM, None)
        while worker.keep_going():
            worker.step()
    finally:
        worker.finish()


def _shown(payload: bytes) -> bytes:
    """What a handler sees of a payload as it sits in an envelope."""
    return Delivery(b"x", 0, payload).payload


def _listed(client: Any, key: str) -> list[Delivery]:
    return read_private_list(cast(list[bytes], client.lrange(key, 0, -1)))


def _retried(client: Any, keys: Keys) -> list[tuple[int, bytes]]:
    """(attempts, payload as its handler sees it) of each delivery in the retry set."""
    members = cast(list[bytes], client.zrange(keys.retry, 0, -1))
    return sorted((d.attempts, d.payload) for d in map(Delivery.parse, members))


# -- every settling order within a lot ----------------------------------------------------

MAX_ATTEMPTS = 3
HUGE = b"h" * 1_000_000
DEDUP = wrap_dedup("0" * 32, "k", b"once")
URGENT = levels.wrap(4, b"urgent")


def _orders() -> Iterator[tuple[str, list[tuple[bytes, int]]]]:
    """Lots of five: every set of failing members among twins; a retry (attempts > 0) at
    every place with a failure at every place, itself included; a deduplicated, a
    prioritised and an exhausted member (attempts used up: dead-lettered unhandled) moved
    along; and one with an empty and a 1 MB payload among them all."""
    for mask in range(32):
        yield f"fails-{mask:05b}", [((b"fail" if mask >> i & 1 else b"twin"), 0) for i in range(5)]
    for at in range(5):
        for failing in [-1, *range(5)]:
            members = [(b"twin", 0)] * 5
            members[at] = (b"again", 1)
            if failing >= 0:
                members[failing] = (b"fail", members[failing][1])
            yield f"retry-{at}-fail-{failing}", members
    for at in range(5):
        members = [(b"twin", 0)] * 5
        members[at] = (DEDUP, 0)
        members[(at + 2) % 5] = (URGENT, 0)
        members[(at + 4) % 5] = (b"spent", MAX_ATTEMPTS)
        yield f"dedup-{at}", members
    marked = b"rqw1:deadbeef0000.1.1+3:0:evil"  # a segment's bottom, as a producer's payload
    lookalikes = [b"rqw1:x.1.1:0:fake", b"rqw1:dedup:junk", b"rqw1:", b"rqw1:L3:zz", b"fail"]
    yield "lookalikes", [(p, 0) for p in [b"a", *lookalikes, marked, b"b"]]
    yield "lookalikes-first", [(p, 0) for p in [marked, marked, b"a", *lookalikes]]
    yield "all-kinds", [
        (b"", 0), (HUGE, 0), (b"fail", 0), (DEDUP, 0), (b"again", 2), (b"twin", 0),
        (URGENT, 0), (b"spent", MAX_ATTEMPTS), (b"", 0), (b"fail", 1), (b"twin", 0),
    ]  # fmt: skip


def _expected(members: list[tuple[bytes, int]]) -> tuple[list[bytes], list[Any], list[bytes]]:
    """What handling `members` in order must come to: (handled, retried, dead)."""
    handled: list[bytes] = []
    retried: list[tuple[int, bytes]] = []
    dead: list[bytes] = []
    for payload, attempts in members:
        if attempts >= MAX_ATTEMPTS:
            dead.append(payload)
            continue
        shown = _shown(payload)
        handled.append(shown)
        if shown.startswith(b"fail"):
            if attempts + 1 >= MAX_ATTEMPTS:
                dead.append(payload)
            else:
                retried.append((attempts + 1, shown))
    return handled, sorted(retried), sorted(dead)


@pytest.mark.parametrize("handler", [HANDLER, "tests.test_lots_review:WithCallback"])
def test_every_settling_order_of_a_lot_settles_each_member_once(
    redis_server: RedisServer, handler: str
) -> None:
    """Failures first, last, in the middle, consecutive, all; a retry between fresh
    members; wrapped, deduplicated and exhausted members; twins, empty and 1 MB payloads:
    each member handled once in take order (or dead-lettered unhandled), the retry set and
    dead list hold exactly the failures, the private list ends empty and every member is
    settled exactly once, on the lean loop and the general path (`run_batch` popping the
    lot). Lots of fresh members come from a real take; the others are crafted."""
    client = redis_server.client()
    wrong: list[str] = []
    for name, members in _orders():
        client.flushall()
        HANDLED.clear()
        worker = _worker(client, prefetch=50, max_attempts=MAX_ATTEMPTS, handler=handler)
        assert worker.can_run_lean() == (handler == HANDLER)
        worker.resume()
        if all(a == 0 for _, a in members) and not name.startswith("dedup"):
            client.lpush("jobs", *[p for p, _ in members])
            assert worker.fill_batch()
            assert (worker.batch.lot is not None) == (handler == HANDLER)  # lean keeps lots
        else:
            _craft(worker, members)
        _run_batch(worker)
        keys = worker.queue.keys
        handled, retried, dead = _expected(members)
        found = (
            HANDLED,
            _retried(client, keys),
            sorted(cast(list[bytes], client.lrange(keys.dead, 0, -1))),
            _listed(client, keys.processing),
            client.llen("jobs"),
            worker.board.get("settled"),
            worker.board.succeeded + worker.board.failed,
        )
        if found != (handled, retried, dead, [], 0, len(members), len(handled)):
            wrong.append(f"{name}: {found!r:.300}")
    assert wrong == []


def test_twins_that_fail_and_succeed_in_one_lot_are_each_settled_as_they_ended(
    redis_server: RedisServer,
) -> None:
    """Five copies of one payload in one lot, the 2nd and 4th failing: two copies in the
    retry set, three acked, none twice, the private list empty."""
    client = redis_server.client()
    worker = _worker(client, prefetch=50)

    def second_and_fourth_fail(message: bytes) -> None:
        if len(HANDLED) in (2, 4):
            raise ValueError("a twin fails")

    HOOKS.append(second_and_fourth_fail)
    client.lpush("jobs", *[b"same"] * 5)
    worker.resume()
    assert worker.fill_batch() and worker.batch.lot is not None
    _run_batch(worker)
    keys = worker.queue.keys
    assert HANDLED == [b"same"] * 5 and _retried(client, keys) == [(1, b"same")] * 2
    assert client.llen(keys.processing) == 0 and worker.board.get("settled") == 5


# -- a Redis error at every call while lots run -----------------------------------------------


class Faults:
    """Makes the `fail_at`-th call to Redis of a queue's script runner fail: before it is
    sent, or (`after`) once Redis ran it, its reply lost."""

    def __init__(self, queue: ReliableQueue, fail_at: int, after: bool) -> None:
        self.calls = 0
        self.fail_at, self.after = fail_at, after
        runner = queue._runner
        run, send_all = runner._run, runner.send_all  # type: ignore[union-attr]
        runner._run = lambda packed: self.call(run, packed)  # type: ignore[union-attr]
        runner.send_all = lambda commands: self.call(send_all, commands)  # type: ignore[method-assign]

    def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at and not self.after:
            raise redis.ConnectionError("connection reset before the command was sent")
        result = fn(arg)
        if self.calls == self.fail_at:
            raise redis.ConnectionError("connection reset before the reply arrived")
        return result


SWEPT = [b"rqw1:deadbeef0000.1.1+3:0:evil", b"a", b"raise1", b"twin", b"twin", b"", b"c"]
SWEPT += [b"raise2", b"d", b"twin", b"rqw1:x.1.1:0:fake"]


def _sweep_once(
    client: redis.Redis,
    producer: Producer,
    fail_at: int,
    after: bool,
    settings: dict[str, Any],
    watch: bool = False,
) -> tuple[int, str | None]:
    """Drain SWEPT (plus a deduplicated and a prioritised message) with the `fail_at`-th
    call failing; (the calls made, what went wrong or None). `watch`: and check at every
    line the worker runs what a kill would charge (`MarkWatch`)."""
    client.flushall()
    HANDLED.clear()
    FAILED_ONCE.clear()
    producer.push("jobs", *SWEPT[:5])
    producer.push("jobs", b"once", dedup_key="k")
    producer.push("jobs", b"urgent", priority=5)
    producer.push("jobs", *SWEPT[5:])
    settings = dict(settings)
    fast = settings.pop("fast_path", False)
    level0 = settings.get("level0_every", 0)
    queue_args = {"fast_path": fast, "level0_every": level0}
    worker = _worker(client, queue_args=queue_args, max_attempts=5, **settings)
    faults = Faults(worker.queue, fail_at, after)
    watching = MarkWatch(worker) if watch else None
    if watching is not None:
        HOOKS[:] = [watching.entering]
        sys.settrace(watching.tracer)
    expected = Counter([*SWEPT, b"raise1", b"raise2", b"once", b"urgent"])
    keys = worker.queue.keys

    def done() -> bool:  # all handled: the acks still pending are sent below
        return Counter(HANDLED) == expected and not worker.batch

    try:
        step_through_outages(worker, 60, done)
        for _ in range(3):  # as the worker's next step would: replay if a reply was lost
            try:
                worker.resume()
                worker.outbox.flush()
                break
            except redis.ConnectionError:
                worker.lose_track()
    finally:
        sys.settrace(None)
        worker.finish()
    if watching is not None and watching.wrong:
        return faults.calls, f"charged: {watching.wrong[:3]}"
    state = (
        Counter(HANDLED),
        client.llen("jobs"),
        client.llen(keys.processing),
        client.zcard(keys.retry),
        client.llen(keys.dead),
        worker.outbox.empty,
    )
    if state != (expected, 0, 0, 0, 0, True):
        return faults.calls, f"{state!r:.400}"
    return faults.calls, None


@pytest.mark.parametrize(
    "settings",
    [
        {"prefetch": 50},
        {"prefetch": 50, "ack_interval": 0.0},
        {"prefetch": 3, "level0_every": 2},
        {"prefetch": 1, "fast_path": True},
    ],
    ids=["prefetch-50", "ack-interval-0", "level0-every", "fast-path"],
)
def test_a_redis_error_at_any_call_while_lots_run_loses_and_repeats_nothing(
    redis_server: RedisServer, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twins, an empty payload, payloads that look like envelopes (a segment's bottom among
    them), failures retried, a deduplicated and a prioritised message run as lots; each
    call to Redis in turn fails, before it was sent or with its reply lost: every message
    is handled exactly once (the failing ones twice), nothing is left in the queue, the
    private list, the retry set or the dead list."""
    settings = dict(settings)
    if "ack_interval" in settings:  # every other success flushes mid-lot
        monkeypatch.setattr(outbox, "ACK_INTERVAL", settings.pop("ack_interval"))
    client = redis_server.client()
    producer = Producer(redis_server.url)
    calls, problem = _sweep_once(client, producer, 0, False, settings)
    assert problem is None and calls > 5
    wrong = []
    for fail_at in range(1, calls + 1):
        for after in (False, True):
            _, problem = _sweep_once(client, producer, fail_at, after, settings)
            if problem is not None:
                wrong.append(f"call {fail_at} {'reply lost' if after else 'not sent'}: {problem}")
    assert wrong == []


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"prefetch": 50}, {"prefetch": 4, "ack_interval": 0.0}])
def test_a_kill_at_any_instant_around_a_redis_error_while_lots_run_charges_exactly_what_ran(
    redis_server: RedisServer, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage sweep above, watched at every line the worker runs: whichever call
    fails, and whether Redis ran it, a kill at any instant (outside a replay, whose mark
    is its predecessor's) charges exactly the deliveries whose handler was entered."""
    settings = dict(settings)
    if "ack_interval" in settings:
        monkeypatch.setattr(outbox, "ACK_INTERVAL", settings.pop("ack_interval"))
    client = redis_server.client()
    producer = Producer(redis_server.url)
    calls, problem = _sweep_once(client, producer, 0, False, settings, watch=True)
    assert problem is None
    wrong = []
    for fail_at in range(1, calls + 1):
        for after in (False, True):
            _, problem = _sweep_once(client, producer, fail_at, after, settings, watch=True)
            if problem is not None:
                wrong.append(f"call {fail_at} {'reply lost' if after else 'not sent'}: {problem}")
    assert wrong == []


# -- the scoreboard's mark at every instant ------------------------------------------------

_WATCHED_FILES = {m.__file__ for m in (loop, outbox, settle, scoreboard, batch_module)}
_RUN_LOT = Worker.run_lot.__code__
_DELIVER = Worker.deliver.__code__


class MarkWatch:
    """At every line the worker's code runs (its loop, outbox, settler, scoreboard and
    batch), checks what a SIGKILL at that instant would charge: every delivery of the
    private list whose handler was entered, and none that was not, but the one about to
    be (`run_lot`'s index, or `deliver`'s delivery)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.entered: set[bytes] = set()
        self.checks = 0
        self.wrong: list[str] = []

    @staticmethod
    def in_hand(frame: FrameType | None) -> bytes | None:
        """The id of the delivery the innermost `deliver` or `run_lot` on the stack has in
        hand (about to start, running, or being settled)."""
        while frame is not None:
            if frame.f_code is _DELIVER:
                return cast(Delivery, frame.f_locals["delivery"]).id
            if frame.f_code is _RUN_LOT:
                lot, index = frame.f_locals["lot"], frame.f_locals.get("index")
                return None if index is None else cast(bytes, lot.prefix + b"%d" % (index + 1))
            frame = frame.f_back
        return None

    def entering(self, message: bytes) -> None:
        """A `HOOKS` entry: the handler has been entered."""
        current = self.in_hand(sys._getframe(1))
        assert current is not None
        self.entered.add(current)

    def check(self, frame: FrameType) -> None:
        worker = self.worker
        if worker.replaying or not worker.board.get("replayed"):
            return  # its predecessor's mark stands (`Scoreboard.first_unstarted`)
        client, keys = worker.queue.client, worker.queue.keys
        ids = [d.id for d in _listed(client, keys.processing)]
        mark = worker.board.first_unstarted
        charged = set(ids[: ids.index(mark)]) if mark in ids else set(ids)
        must = {i for i in ids if i in self.entered}
        may = set(must)
        current = self.in_hand(frame)
        if current is not None:
            may.add(current)
        self.checks += 1
        if not must <= charged <= may:
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
            self.wrong.append(f"{where} charges {sorted(charged)}, ran {sorted(must)}")

    def tracer(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename in _WATCHED_FILES:
            return self.local

        return None

    def local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.check(frame)
        return self.local

    def run(self, steps: int, done: Callable[[], bool]) -> None:
        sys.settrace(self.tracer)
        try:
            step_through_outages(self.worker, steps, done)
        finally:
            sys.settrace(None)
            self.worker.finish()


@pytest.mark.parametrize(
    "scenario",
    ["mixed", "crafted", "ack-interval-0", "stop", "max-requests", "leftovers", "general"],
)
def test_a_kill_at_any_instant_of_a_lot_charges_exactly_what_ran(
    redis_server: RedisServer, scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lots with failures, a retry at their head and (crafted) in their middle, an
    exhausted member, wrapped and deduplicated ones, twins, ACK_INTERVAL expiring mid-lot,
    a stop signal in a handler, `max_requests` mid-lot, a replay's leftovers before a lot,
    and the general path popping a lot: at every line the worker runs, a kill would charge
    exactly the deliveries whose handler was entered (and at most the one about to be)."""
    client = redis_server.client()
    producer = Producer(redis_server.url)
    settings: dict[str, Any] = {"prefetch": 4 if scenario == "mixed" else 50, "max_attempts": 3}
    if scenario == "max-requests":
        settings.update(max_requests=6, max_requests_jitter=0)
    if scenario == "ack-interval-0":
        monkeypatch.setattr(outbox, "ACK_INTERVAL", 0.0)
    spec_unstarted = b""
    if scenario == "leftovers":  # a first worker took two and died in the first
        client.lpush("jobs", b"left1", b"left2")
        first = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
        assert first.take([], 2).count == 2
        spec_unstarted = f"{first._id_prefix}.1.2".encode()
    producer.push("jobs", b"a", b"raise1", b"twin", b"twin")
    producer.push("jobs", b"once", dedup_key="k")
    producer.push("jobs", b"b", b"raise2", b"stop", b"c", b"twin", b"fail")
    producer.push("jobs", b"urgent", priority=5)
    handler = "tests.test_lots_review:WithCallback" if scenario == "general" else HANDLER
    worker = _worker(client, previous=("killed", spec_unstarted), handler=handler, **settings)
    assert worker.can_run_lean() == (scenario != "general")
    watch = MarkWatch(worker)
    HOOKS.append(watch.entering)
    if scenario == "stop":
        HOOKS.append(lambda m: m == b"stop" and worker.on_stop_signal(signal.SIGTERM, None))
    if scenario == "crafted":
        worker.resume()
        _craft(worker, [
            (b"t", 0), (b"again", 1), (b"t", 0), (b"t", 0), (URGENT, 0), (b"fail", 0),
            (DEDUP, 0), (b"raise3", 2), (b"t", 0), (b"fail", 0),
        ])  # fmt: skip

    def drained() -> bool:
        keys = worker.queue.keys
        return (
            not worker.batch
            and worker.outbox.empty
            and client.llen(keys.processing) == 0
            and (client.llen("jobs") == 0 and client.zcard(keys.retry) == 0)
        )

    watch.run(80, drained)
    assert watch.checks > 100
    assert watch.wrong == []
    if scenario == "stop":
        assert HANDLED[-1] == b"stop" and client.llen("jobs") > 0, "the rest given back"
    elif scenario == "max-requests":
        assert len(HANDLED) == 6
    else:
        assert client.llen(worker.queue.keys.processing) == 0


_START_WHAT_FITS = ConcurrentWorker.start_what_fits.__code__


class ConcurrentMarkWatch(MarkWatch):
    """`MarkWatch` for `ConcurrentWorker`, whose handlers run on threads: a handler entered
    is known by its payload (the test's are unique), and the deliveries in a thread, or
    popped by `start_what_fits` and about to be, may be charged."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.entered_payloads: set[bytes] = set()

    def entering(self, message: bytes) -> None:
        self.entered_payloads.add(message)

    def check(self, frame: FrameType) -> None:
        worker = cast(ConcurrentWorker, self.worker)
        if worker.replaying or not worker.board.get("replayed"):
            return
        client, keys = worker.queue.client, worker.queue.keys
        listed = _listed(client, keys.processing)
        ids = [d.id for d in listed]
        mark = worker.board.first_unstarted
        charged = set(ids[: ids.index(mark)]) if mark in ids else set(ids)
        must = {d.id for d in listed if d.payload in self.entered_payloads}
        may = must | {r.delivery.id for r in worker.running.values()}
        while frame is not None:
            if frame.f_code is _START_WHAT_FITS and "delivery" in frame.f_locals:
                may.add(cast(Delivery, frame.f_locals["delivery"]).id)
            frame = frame.f_back  # type: ignore[assignment]
        self.checks += 1
        if not must <= charged <= may:
            self.wrong.append(f"charges {sorted(charged)}, ran {sorted(must)}")


def test_a_kill_at_any_instant_of_the_concurrent_worker_on_lots_charges_exactly_what_ran(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ConcurrentWorker` pops lots (`Batch.popleft`), and takes more behind part of one:
    at every line its thread runs, a kill would charge exactly the deliveries whose
    handler was entered, or that are in (or about to be handed to) a thread."""
    monkeypatch.setattr(
        sys.modules[__name__], "_WATCHED_FILES", _WATCHED_FILES | {dispatch.__file__}
    )
    client = redis_server.client()
    producer = Producer(redis_server.url)
    # Unique payloads, none retried: a handler entered is known by its payload.
    producer.push("jobs", *[b"m%d" % i for i in range(6)])
    producer.push("jobs", b"once", dedup_key="k")
    producer.push("jobs", b"urgent", priority=5)
    producer.push("jobs", *[b"n%d" % i for i in range(6)])
    worker = _worker(client, ConcurrentWorker, prefetch=4, concurrency=3)
    watch = ConcurrentMarkWatch(worker)
    HOOKS.append(watch.entering)
    expected = 14

    def drained() -> bool:
        return len(HANDLED) == expected and not worker.batch and not worker.running

    sys.settrace(watch.tracer)
    try:
        step_through_outages(worker, 300, drained)
        worker.stop(signal.SIGTERM, None)
        while worker.keep_going():
            worker.step()
    finally:
        sys.settrace(None)
        worker.finish()
    assert len(HANDLED) == expected and watch.checks > 100
    assert watch.wrong == []
    assert client.llen(worker.queue.keys.processing) == 0


def test_a_kill_as_an_exhausted_member_is_dead_lettered_charges_nothing_unstarted(
    redis_server: RedisServer,
) -> None:
    """A member whose attempts are used up (a replay's leftover, or a lot's retry) is
    dead-lettered unhandled mid-lot: at no instant may a kill charge the members after
    it, which never started."""
    client = redis_server.client()
    worker = _worker(client, prefetch=50, max_attempts=3)
    watch = MarkWatch(worker)
    HOOKS.append(watch.entering)
    worker.resume()
    _craft(worker, [(b"a", 0), (b"spent", 3), (b"b", 0), (b"c", 0)])
    watch.run(5, lambda: not worker.batch)
    assert HANDLED == [b"a", b"b", b"c"]
    assert watch.wrong == []


# -- stop signals, max_requests, timeouts mid-lot -------------------------------------------

STOPPED = [b"a", b"raise", b"twin", b"once", b"twin", b"", b"b", b"fail"]


def _push_stopped(producer: Producer) -> None:
    producer.push("jobs", *STOPPED[:3])
    producer.push("jobs", b"once", dedup_key="k")
    producer.push("jobs", *STOPPED[4:])


@pytest.mark.parametrize("in_handler", [True, False], ids=["signal-in-handler", "flag-only"])
def test_a_stop_at_any_member_gives_back_exactly_the_unstarted(
    redis_server: RedisServer, in_handler: bool
) -> None:
    """A stop at every member of a lot (a plain one, a failing one, a deduplicated one
    run by `deliver`, twins): the members up to it handled once and settled, the rest back
    at the head of the queue in order, none lost; a second worker then runs exactly those."""
    client = redis_server.client()
    producer = Producer(redis_server.url)
    wrong = []
    for stop_at in range(len(STOPPED)):
        client.flushall()
        HANDLED.clear()
        FAILED_ONCE.clear()
        HOOKS.clear()
        _push_stopped(producer)
        worker = _worker(client, prefetch=50, max_attempts=1)

        def stop(message: bytes, worker: Worker = worker, at: int = stop_at) -> None:
            if len(HANDLED) == at + 1:
                if in_handler:
                    worker.on_stop_signal(signal.SIGTERM, None)
                else:  # as a signal landing once `in_handler` is False
                    worker.stop(signal.SIGTERM, None)

        HOOKS.append(stop)
        try:
            worker.resume()
            assert worker.fill_batch() and worker.batch.lot is not None
            assert worker.run_batch() is None
        finally:
            worker.finish()
        first = list(HANDLED)
        keys = worker.queue.keys
        given_back = client.llen("jobs")
        settled = worker.board.get("settled")
        HOOKS.clear()
        second = _worker(client, prefetch=50, max_attempts=1)
        try:
            step_through_outages(second, 10, lambda: client.llen("jobs") == 0)
        finally:
            second.finish()
        found = (
            first,
            given_back,
            settled,
            HANDLED[len(first) :],
            client.llen(keys.processing),
            sorted(cast(list[bytes], client.lrange(keys.dead, 0, -1))),
        )
        expected = (
            STOPPED[: stop_at + 1],
            len(STOPPED) - stop_at - 1,
            stop_at + 1,
            STOPPED[stop_at + 1 :],
            0,
            [b"fail", b"raise"],  # `max_attempts` 1: each dead at its first failure
        )
        if found != expected:
            wrong.append(f"stop at {stop_at}: {found!r:.300}")
    assert wrong == []


def _stop_at_line(server: RedisServer, producer: Producer, at: int) -> tuple[int, str | None]:
    """Run one lot with a stop signal at the `at`-th line the worker's code runs (0: none),
    then a second worker on what is left: (lines run, what went wrong or None)."""
    with server.client() as client:  # each worker keeps a connection of its own for life
        return _stop_at_line_on(client, producer, at)


def _stop_at_line_on(client: redis.Redis, producer: Producer, at: int) -> tuple[int, str | None]:
    client.flushall()
    HANDLED.clear()
    FAILED_ONCE.clear()
    _push_stopped(producer)
    worker = _worker(client, prefetch=50, max_attempts=2)
    lines = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines == at:  # where a signal lands: its handler runs between two bytecodes
                worker.on_stop_signal(signal.SIGTERM, None)
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in _WATCHED_FILES else None

    worker.resume()
    assert worker.fill_batch()
    sys.settrace(calls)
    try:
        worker.run_batch()
    finally:
        sys.settrace(None)
        worker.finish()
    keys = worker.queue.keys
    second = _worker(client, prefetch=50, max_attempts=2)
    try:
        step_through_outages(
            second, 20, lambda: client.llen("jobs") + client.zcard(keys.retry) == 0
        )
        second.outbox.flush()
    finally:
        second.finish()
    expected = Counter([*STOPPED, b"raise", b"fail"])  # each fails once first
    state = (
        Counter(HANDLED),
        client.llen("jobs"),
        client.llen(keys.processing),
        client.zcard(keys.retry),
        client.lrange(keys.dead, 0, -1),
    )
    if state != (expected, 0, 0, 0, [b"fail"]):
        return lines, f"{state!r:.300}"
    return lines, None


@pytest.mark.slow
def test_a_stop_signal_at_any_line_of_a_lot_loses_and_repeats_nothing(
    redis_server: RedisServer,
) -> None:
    """A stop signal lands at every line the worker runs while a lot runs (in a handler
    or not, in a flush, a retry, `deliver`'s path): what ran is settled once, the rest is
    given back, and a second worker runs exactly that; nothing is lost or run twice."""
    producer = Producer(redis_server.url)
    lines, problem = _stop_at_line(redis_server, producer, 0)
    assert problem is None and lines > 50
    wrong = []
    for at in range(1, lines + 1):
        _, problem = _stop_at_line(redis_server, producer, at)
        if problem is not None:
            wrong.append(f"stop at line {at}: {problem}")
    assert wrong == []


@pytest.mark.parametrize("after", [False, True], ids=["not-sent", "reply-lost"])
def test_a_give_back_that_fails_in_the_stop_signal_is_done_on_the_way_out(
    redis_server: RedisServer, after: bool
) -> None:
    """The stop signal's give-back meets a Redis error, before Redis ran it or with its
    reply lost: the lot's rest stays in the batch, the loop stops after the member in
    hand, and `finish` gives back exactly the rest, once (never two copies of it)."""
    client = redis_server.client()
    worker = _worker(client, prefetch=50)
    real_give_back = worker.queue.give_back
    calls: list[int] = []

    def give_back(unstarted: list[Delivery]) -> int:
        calls.append(len(unstarted))
        if len(calls) == 1 and not after:
            raise redis.ConnectionError("connection reset before the command was sent")
        moved = real_give_back(unstarted)
        if len(calls) == 1:
            raise redis.ConnectionError("connection reset before the reply arrived")
        return moved

    worker.queue.give_back = give_back  # type: ignore[method-assign]
    HOOKS.append(lambda m: m == b"c" and worker.on_stop_signal(signal.SIGTERM, None))
    client.lpush("jobs", b"a", b"b", b"c", b"d", b"twin", b"twin")
    worker.resume()
    assert worker.fill_batch()
    try:
        assert worker.run_batch() is None
    finally:
        worker.finish()
    assert HANDLED == [b"a", b"b", b"c"] and calls == [3, 3]
    assert client.lrange("jobs", 0, -1)[::-1] == [b"d", b"twin", b"twin"]
    assert client.llen(worker.queue.keys.processing) == 0


def test_max_requests_at_any_member_of_a_lot_ends_at_exactly_that_many(
    redis_server: RedisServer,
) -> None:
    """`max_requests` reached at every member of a lot with failures and a deduplicated
    member among them: exactly that many run, the worker recycles, the rest given back."""
    client = redis_server.client()
    producer = Producer(redis_server.url)
    wrong = []
    for limit in range(1, len(STOPPED) + 1):
        client.flushall()
        HANDLED.clear()
        FAILED_ONCE.clear()
        _push_stopped(producer)
        worker = _worker(
            client, prefetch=50, max_attempts=1, max_requests=limit, max_requests_jitter=0
        )
        worker.resume()
        worker.took(worker.queue.take([], len(STOPPED)))  # past what `take_limit` allows
        try:
            code = worker.run_batch()
        finally:
            worker.finish()
        keys = worker.queue.keys
        found = (code, HANDLED, client.llen(keys.processing), client.llen("jobs"))
        expected = (ExitCode.MAX_REQUESTS, STOPPED[:limit], 0, len(STOPPED) - limit)
        if found != expected:
            wrong.append(f"max_requests {limit}: {found!r:.300}")
    assert wrong == []


@pytest.mark.parametrize(
    "slow", [b"slow", wrap_dedup("1" * 32, "s", b"slow")], ids=["lean", "deliver"]
)
def test_a_timeout_mid_lot_retries_that_member_and_gives_back_the_rest(slow: bytes) -> None:
    """A member runs past `timeout` on the lean path, or on `deliver`'s (deduplicated):
    the worker ends with TIMEOUT, the ones before acked, it retried, the rest given back."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(client, prefetch=50, timeout=0.05)
    client.lpush("jobs", b"a", b"twin", slow, b"twin", b"b")
    worker.resume()
    assert worker.fill_batch() and worker.batch.lot is not None
    try:
        assert worker.run_batch() == ExitCode.TIMEOUT
    finally:
        worker.finish()
    keys = worker.queue.keys
    assert HANDLED == [b"a", b"twin", b"slow"]
    assert _retried(client, keys) == [(1, b"slow")]
    assert client.lrange("jobs", 0, -1)[::-1] == [b"twin", b"b"]
    assert client.llen(keys.processing) == 0 and worker.board.get("settled") == 3


def test_acks_that_waited_the_ack_interval_leave_mid_lot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ACK_INTERVAL expiring mid-lot: the run so far is acked at once (the private list
    shrinks while the lot runs), and the rest of the lot is acked after, each once."""
    monkeypatch.setattr(outbox, "ACK_INTERVAL", 0.02)
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(client, prefetch=50)
    keys = worker.queue.keys
    lengths: list[int] = []

    def pace(message: bytes) -> None:
        lengths.append(cast(int, client.llen(keys.processing)))
        time.sleep(0.015)

    HOOKS.append(pace)
    client.lpush("jobs", *[b"m%d" % i for i in range(8)])
    worker.resume()
    assert worker.fill_batch()
    _run_batch(worker)
    assert lengths[0] == 8 and min(lengths) < 8, "acked before the lot ended"
    assert lengths == sorted(lengths, reverse=True)
    assert client.llen(keys.processing) == 0 and worker.board.get("settled") == 8


@pytest.mark.parametrize("interval", [1.0, 0.0], ids=["at-the-end", "mid-lot"])
def test_runs_whose_trim_is_refused_are_acked_one_by_one_and_each_once(
    redis_server: RedisServer, interval: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something this worker does not know of sits below its lot (the private list is not
    what the run's trim claims): each trim is refused and its acks go one by one, at the
    lot's end or mid-lot as ACK_INTERVAL expires; each member is acked once, the stranger
    is left where it was, and no ack is lost between runs joined, unfolded and refused."""
    monkeypatch.setattr(outbox, "ACK_INTERVAL", interval)
    client = redis_server.client()
    worker = _worker(client, prefetch=50)
    worker.resume()
    stranger = b"rqw1:ffffffffffff.1.1:0:stranger"
    client.lpush(worker.queue.keys.processing, stranger)
    members = [(b"twin", 0), (b"a", 0), (b"fail", 0), (b"twin", 0), (DEDUP, 0)]
    members += [(b"b", 0), (b"twin", 0), (b"again", 1), (b"c", 0), (b"twin", 0)]
    _craft(worker, members)
    missing: list[int] = []
    real_take = worker.queue.take

    def take(*args: Any, **kwargs: Any) -> Taken:
        taken = real_take(*args, **kwargs)
        missing.append(taken.missing_acks)
        return taken

    worker.queue.take = take  # type: ignore[method-assign]
    _run_batch(worker)
    keys = worker.queue.keys
    assert [_shown(p) for p, _ in members] == HANDLED
    assert -1 in missing and all(m <= 0 for m in missing), "refused, then none missing"
    assert client.lrange(keys.processing, 0, -1) == [stranger]
    assert _retried(client, keys) == [(1, b"fail")]
    assert worker.board.get("settled") == len(members) and worker.outbox.empty


# -- other readers of a batch holding a lot ------------------------------------------------


@pytest.mark.parametrize("prefetch", [20, 2])
def test_the_concurrent_worker_runs_a_lot_each_member_once(prefetch: int) -> None:
    """A lot popped by `ConcurrentWorker`, whole (prefetch 20) or taken while the batch
    still holds part of one (prefetch 2): each member once, settled once."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(client, ConcurrentWorker, prefetch=prefetch, concurrency=3, max_attempts=1)
    payloads = [b"twin", b"a", b"fail", b"twin", b"", b"b", b"twin"]
    client.lpush("jobs", *payloads)
    _run_all(worker, 100, len(payloads))
    keys = worker.queue.keys
    assert sorted(HANDLED) == sorted(payloads)
    assert client.llen(keys.processing) == 0 and client.lrange(keys.dead, 0, -1) == [b"fail"]
    assert worker.board.get("settled") == len(payloads)


@pytest.mark.parametrize("cls", [Worker, ConcurrentWorker], ids=["one-at-a-time", "concurrent"])
def test_under_group_limits_what_a_worker_holds_is_its_lots_groups(cls: type[Worker]) -> None:
    """`holding()` reads a lot's groups from its cursor on: at every handler start each
    group's deliveries held (taken, or in a handler) stay within `group_max_running`, the
    batch's groups are the lot's own from its cursor, and every message runs once, its
    permits all given back at the end."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    limits = Limits(group_by="kwargs.tenant", group_max_running=2)  # type: ignore[arg-type]
    extra = {"concurrency": 2} if cls is ConcurrentWorker else {}
    worker = _worker(client, cls, queue_args={"limits": limits}, prefetch=10, **extra)
    payloads = [
        json.dumps({"kwargs": {"tenant": t}, "n": n}).encode() for n in range(6) for t in "ab"
    ]
    client.lpush("jobs", *payloads)
    wrong: list[str] = []
    grouped_lots = []

    def check(message: bytes) -> None:
        held = Counter(d.group for d in worker.holding())
        if cls is Worker:  # the one in its handler holds a permit too
            held += Counter([json.loads(message)["kwargs"]["tenant"].encode().hex()])
            lot = worker.batch.lot
            if lot is not None:
                grouped_lots.append(bool(lot.groups))
                batch_groups = Counter(d.group for d in worker.batch.deliveries())
                if batch_groups != Counter(lot.groups[worker.batch.next :]):
                    wrong.append(f"batch {batch_groups} != lot {lot.groups}")
        if max(held.values()) > 2:
            wrong.append(f"holds {held}")

    HOOKS.append(check)
    _run_all(worker, 200, len(payloads))
    assert sorted(HANDLED) == sorted(payloads) and wrong == []
    assert not grouped_lots, "under a limit a take's deliveries are made at once"
    assert client.llen(worker.queue.keys.processing) == 0
    state = flow.flow_state(client, "jobs", limits)
    assert [g.running for g in state.groups] == [0] * len(state.groups)


def test_a_batch_holding_a_lot_reads_as_its_deliveries_everywhere() -> None:
    """Past the 1,000 ids made once (`_counts`), from a cursor, unfolded behind more, and
    popped: the same deliveries, groups included, as the lot makes them all at once."""
    payloads = [b"p%d" % i for i in range(1500)]
    groups = ["6161", "6262"] * 3
    lot = Lot(payloads, [0] * 1500, groups, b"x.9.", 100)
    whole = lot.deliveries()
    assert [d.id for d in whole[998:1001]] == [b"x.9.999", b"x.9.1000", b"x.9.1001"]
    assert [d.group for d in whole[:7]] == [*groups, None]
    batch = Batch()
    batch.add(Taken(0, lot, None), whole=True)
    batch.moved_to(1200)
    assert batch.first_id() == b"x.9.1201" and len(batch) == 300
    assert [d.seq for d in batch.deliveries()] == list(range(1301, 1601))
    batch.moved_to(4)
    delivery, _ = batch.popleft()
    assert (delivery.id, delivery.group, delivery.seq) == (b"x.9.5", "6161", 105)
    batch.extend([(Delivery(b"y.1", 2, b"late"), "why")])  # the lot's rest unfolds first
    listed = batch.deliveries()
    assert listed[0].id == b"x.9.6" and listed[-1].id == b"y.1" and len(listed) == 1496
    assert [d.group for d in listed[:2]] == ["6262", None]


_BATCH_CODE = {f.__code__ for f in vars(Batch).values() if callable(f)}


def _read_while_its_lot_ends(at: int) -> tuple[bool, int]:
    """`bool(batch)` of a batch holding a lot of one, with the lot's one member started
    (`moved_to`) just before the `at`-th bytecode of the read: (its answer, bytecodes run)."""
    batch = Batch()
    batch.add(Taken(0, Lot([b"a"], [0], [], b"p.1.", 0), None), whole=True)
    ran = 0

    def opcodes(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal ran
        if event == "opcode":
            ran += 1
            if ran == at:
                batch.moved_to(1)  # the worker's thread, between two bytecodes
        return opcodes

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code in _BATCH_CODE:
            frame.f_trace_opcodes = True
            return opcodes
        return None

    sys.settrace(calls)
    try:
        return bool(batch), ran
    finally:
        sys.settrace(None)


def test_a_batch_read_from_the_freeze_watch_thread_as_its_lot_ends_never_raises() -> None:
    """`holds_permit()` runs on FreezeWatch's thread (`worker/freeze.py`) while the
    worker's thread pops the batch. This interleaves the two at every bytecode in turn:
    the watch thread's `bool(batch)` is under way when the worker starts the lot's last
    member (`moved_to`), and the read goes on. Either answer, before or after, is right;
    an exception is not."""
    for at in range(1, 100):
        held, ran = _read_while_its_lot_ends(at)
        assert held in (True, False)
        if ran < at:  # every bytecode of the read has been interleaved
            break
    else:
        pytest.fail("bool(batch) ran more bytecodes than this test interleaves")


@pytest.mark.parametrize("fail_at", [None, 1200], ids=["all-succeed", "one-fails"])
def test_a_lot_of_more_than_a_thousand_is_acked_by_one_trim(
    redis_server: RedisServer, fail_at: int | None
) -> None:
    """2,500 twins in one lot (past the 1,000 ids made once), all succeeding or one failing
    in the middle: their acks leave in one call to Redis, a trim Redis accepts (never
    refused and sent again one by one), beside the one retry."""
    client = redis_server.client()
    worker = _worker(client, prefetch=2500)
    payloads = [b"m%d" % (i % 7) for i in range(2500)]
    if fail_at is not None:
        payloads[fail_at] = b"fail"
    client.lpush("jobs", *payloads)
    worker.resume()
    assert worker.fill_batch() and worker.batch.lot is not None and len(worker.batch) == 2500
    takes: list[Taken] = []
    sent: list[tuple[int, int]] = []  # (envelopes named, the trim's count)
    real_take = worker.queue.take

    def take(
        acks: list[bytes], limit: int, landed: bool = False, trim: int = 0, **kw: Any
    ) -> Taken:
        sent.append((len(acks), trim))
        takes.append(real_take(acks, limit, landed, trim, **kw))
        return takes[-1]

    worker.queue.take = take  # type: ignore[method-assign]
    try:
        assert worker.run_batch() is None
        assert takes == [], "acks wait for the lot's end"
        worker.outbox.flush()
    finally:
        worker.finish()
    assert [t.missing_acks for t in takes] == [0], "one trim, accepted"
    assert sent == [(2, 2500 if fail_at is None else 2499)], "naming the first and the last"
    assert len(HANDLED) == 2500 and worker.board.get("settled") == 2500
    assert client.llen(worker.queue.keys.processing) == 0
    assert client.zcard(worker.queue.keys.retry) == (0 if fail_at is None else 1)


# -- the real service, killed mid-lot -----------------------------------------------------


def _mixed(special: bytes, at: int) -> list[bytes]:
    """40 payloads for testapp:handle: twins, unique ones, failures, and `special` at `at`."""
    payloads: list[bytes] = []
    for i in range(40):
        if i == at:
            payloads.append(special)
        elif i % 9 == 4:
            payloads.append(b"raise:%d" % i)
        else:
            payloads.append(b"ok" if i % 3 else b"ok:%d" % i)  # twins among them
    return payloads


@pytest.mark.service
@pytest.mark.parametrize(
    "at",
    [
        pytest.param(0, id="first", marks=pytest.mark.slow),
        pytest.param(24, id="middle"),  # the default run keeps one: under a second
        pytest.param(39, id="last", marks=pytest.mark.slow),
    ],
)
def test_the_service_killed_mid_lot_charges_exactly_what_ran(
    redis_server: RedisServer, service: Callable[..., Service], at: int
) -> None:
    """`rqworkers run` at prefetch 50 takes 40 messages (twins, failures) as one lot; the
    worker is SIGKILLed in its first, 25th or last. With `max_attempts = 1` a charge is a
    dead letter: those before it that succeeded but were not yet acked, and the one killed,
    are charged (dead, `killed by signal 9`); the failures are dead with their own reason;
    those after it are run once by the next worker; nothing is lost."""
    client = redis_server.client()
    payloads = _mixed(b"kill:x", at)
    client.lpush("jobs", *payloads)
    pair = {"queue": "jobs", "handler": "testapp:handle", "prefetch": 50, "max_attempts": 1}
    svc = service([pair])
    charged = Counter(p for p in payloads[:at] if not p.startswith(b"raise")) + Counter([b"kill:x"])
    failed = Counter(p for p in payloads if p.startswith(b"raise"))
    ran = [p for p in payloads if not p.startswith((b"raise", b"kill"))]
    wait_for(
        lambda: (
            client.llen("jobs:dead") == (charged + failed).total()
            and client.llen("done") == len(ran)
        ),
        timeout=30,
        what="every message run or dead-lettered",
    )
    started = cast(list[bytes], client.lrange("started", 0, -1))
    assert started == payloads, "each started once, in order"
    dead = Counter(cast(list[bytes], client.lrange("jobs:dead", 0, -1)))
    assert dead == charged + failed
    assert cast(list[bytes], client.lrange("done", 0, -1)) == ran
    wait_for(
        lambda: not [k for k in client.keys("jobs:processing:*") if client.llen(k)],
        timeout=10,
        what="the private lists to empty",
    )
    assert client.llen("jobs") == 0 and client.zcard("jobs:retry") == 0
    assert "killed by signal 9" in str(client.hgetall("jobs:dead:reasons"))
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


@pytest.mark.slow
@pytest.mark.service
def test_the_service_stopped_mid_lot_gives_back_the_rest_and_charges_nothing(
    redis_server: RedisServer, service: Callable[..., Service]
) -> None:
    """SIGTERM to `rqworkers run` while the 21st of a 40-message lot sleeps in its
    handler: it finishes and is acked, the 19 after it go back to the queue in order, and
    a second run handles exactly those. With `max_attempts = 1`, any charge would be a dead
    letter: only the failures are dead."""
    client = redis_server.client()
    payloads = _mixed(b"sleep:0.5:x", 20)
    client.lpush("jobs", *payloads)
    pair = {"queue": "jobs", "handler": "testapp:handle", "prefetch": 50, "max_attempts": 1}
    svc = service([pair])
    wait_for(lambda: b"sleep:0.5:x" in client.lrange("started", 0, -1), timeout=30)
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0
    assert cast(list[bytes], client.lrange("started", 0, -1)) == payloads[:21]
    assert cast(list[bytes], client.lrange("jobs", 0, -1))[::-1] == payloads[21:]
    assert not [k for k in client.keys("jobs:processing:*") if client.llen(k)]
    second = service([pair])
    wait_for(lambda: client.llen("started") == 40 and client.llen("jobs") == 0, timeout=30)
    failed = [p for p in payloads if p.startswith(b"raise")]
    wait_for(lambda: client.llen("done") == 40 - len(failed), timeout=10)
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert cast(list[bytes], client.lrange("started", 0, -1)) == payloads
    assert sorted(cast(list[bytes], client.lrange("jobs:dead", 0, -1))) == sorted(failed)
    assert not [k for k in client.keys("jobs:processing:*") if client.llen(k)]
