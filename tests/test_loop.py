"""`worker.loop`: `interruptible`, which lets a stop signal cut a blocking call short, and
rules of the loop driven in this process against fakeredis, in milliseconds. The real
service shows the same rules in tests/test_service.py, where only it can (crashes, signals).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode
from rqworkers.store.queue import ReliableQueue, digest
from rqworkers.worker.dispatch import ConcurrentWorker
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import Worker, WorkerSpec, interruptible
from rqworkers.worker.scoreboard import Scoreboard


def test_stop_signal_cuts_a_blocking_call_short() -> None:
    stop = StopFlag()
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    began = time.monotonic()
    try:
        assert interruptible(stop, time.sleep, 30) is None
    finally:
        timer.cancel()
    assert stop.set and time.monotonic() - began < 10
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # what was there before


def test_stop_signal_at_any_instant_never_escapes(restore_sigterm: None) -> None:
    """The manager's death SIGTERMs its workers at whatever instant: a signal landing while
    the handlers are swapped in or out must neither escape as an exception nor be lost."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    firing = threading.Event()
    firing.set()

    def fire() -> None:
        while firing.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.00002)

    shooter = threading.Thread(target=fire, daemon=True)
    calls = cut = 0
    escaped: list[BaseException] = []
    try:
        shooter.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            stop = StopFlag()
            try:
                result = interruptible(stop, sum, range(20))
            except BaseException as exc:  # what the worker would die of
                escaped.append(exc)
                continue
            calls += 1
            if result is None:
                cut += 1
                assert stop.set
            else:
                assert result == 190
    finally:
        firing.clear()
        shooter.join()
    assert not escaped
    assert calls > 1000 and cut > 0


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


# -- the loop's rules, in this process against fakeredis ------------------------------------------

STARTED: list[bytes] = []
DONE: list[bytes] = []


def handle(message: bytes) -> None:
    """As tests/apps/testapp.py's handler does for `raise` and a plain payload."""
    STARTED.append(message)
    if message == b"raise":
        raise ValueError("boom from testapp")
    DONE.append(message)


@pytest.mark.parametrize(
    ("kind", "concurrency"), [(Worker, 1), (ConcurrentWorker, 4)], ids=["one", "concurrent"]
)
@pytest.mark.parametrize("prefetch", [1, 10])
def test_a_poison_message_is_dead_lettered_after_exactly_max_attempts_while_others_flow(
    kind: type[Worker], concurrency: int, prefetch: int
) -> None:
    """The rule of test_service.py's test of the same name, without a process and in both
    loops: a message that raises runs `max_attempts` times, then lands in the dead list with
    its reason, while the others are each handled once."""
    STARTED.clear()
    DONE.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    pair = PairSettings(
        host="h", queue="jobs", handler="tests.test_loop:handle", prefetch=prefetch,
        concurrency=concurrency, max_attempts=3, retry_delay=0.0,
    )  # fmt: skip
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), None, b"", lease_ttl=30)
    worker = kind(spec, Handler(pair.handler), queue, Scoreboard(), StopFlag())
    client.lpush("jobs", b"raise", *[f"ok{i}".encode() for i in range(50)])
    try:
        for _ in range(1000):  # a step never blocks while work waits or is due
            assert worker.step() is None
            settled = not getattr(worker, "running", None)  # ConcurrentWorker: none in flight
            if client.llen(queue.keys.dead) == 1 and len(DONE) == 50 and settled:
                break
    finally:
        worker.finish()
    assert STARTED.count(b"raise") == 3
    raw = client.hget(queue.keys.dead_reasons, digest(b"raise"))
    assert raw is not None
    info = json.loads(raw)
    assert info["attempts"] == 3 and "ValueError: boom from testapp" in str(info["reason"])
    assert sorted(DONE) == sorted(f"ok{i}".encode() for i in range(50))
    assert client.zcard(queue.keys.retry) == 0 and client.llen(queue.keys.processing) == 0


LOOPS = pytest.mark.parametrize(
    ("kind", "concurrency"), [(Worker, 1), (ConcurrentWorker, 4)], ids=["one", "concurrent"]
)


def _worker(
    kind: type[Worker],
    client: fakeredis.FakeRedis,
    previous_unstarted: bytes | None = b"",
    sample_succeeded: float = 0.0,
    handler: str = "tests.test_loop:handle",
    **settings: Any,
) -> Worker:
    """A worker of `kind` on queue `jobs` of `client`, handled by `handler`."""
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    pair = PairSettings(host="h", queue="jobs", handler=handler, retry_delay=0.0, **settings)
    spec = WorkerSpec(
        pair, "jobs-1", "node:1", os.getppid(), "killed by signal 9 (SIGKILL)",
        previous_unstarted, lease_ttl=30, sample_succeeded=sample_succeeded,
    )  # fmt: skip
    return kind(spec, Handler(handler), queue, Scoreboard(), StopFlag())


def _run_to_exit(worker: Worker) -> int | None:
    """Step `worker` until it asks to exit (its code), at most 1000 steps; then finish it."""
    code = None
    try:
        for _ in range(1000):
            code = worker.step()
            if code is not None:
                break
    finally:
        worker.finish()
    return code


@LOOPS
def test_both_loops_recycle_at_max_requests_and_take_no_more(
    kind: type[Worker], concurrency: int
) -> None:
    """`max_requests` (jitter 0) finished messages end the worker with MAX_REQUESTS, and it
    never took one it would not live to start: the rest wait in the queue."""
    DONE.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(
        kind, client, concurrency=concurrency, prefetch=10, max_requests=3, max_requests_jitter=0
    )
    client.lpush("jobs", *[f"ok{i}".encode() for i in range(10)])
    assert _run_to_exit(worker) == ExitCode.MAX_REQUESTS
    assert len(DONE) == 3 and client.llen("jobs") == 7
    assert client.llen(worker.queue.keys.processing) == 0


@LOOPS
def test_both_loops_dead_letter_an_exhausted_delivery_unhandled(
    kind: type[Worker], concurrency: int
) -> None:
    """A delivery its dead workers used up `max_attempts` on never reaches a handler again:
    it is dead-lettered with how the last worker ended."""
    STARTED.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    client.lpush("jobs", b"doomed")
    first = _worker(Worker, client, max_attempts=1)
    first.resume()
    assert first.fill_batch()  # taken into the private list; then the worker "dies"
    worker = _worker(kind, client, previous_unstarted=None, concurrency=concurrency, max_attempts=1)
    try:
        for _ in range(100):
            worker.step()
            if client.llen(worker.queue.keys.dead) == 1:
                break
    finally:
        worker.finish()
    assert STARTED == []
    raw = client.hget(worker.queue.keys.dead_reasons, digest(b"doomed"))
    assert raw is not None
    assert json.loads(raw)["reason"] == "killed by signal 9 (SIGKILL)"


@LOOPS
def test_both_loops_log_sampled_successes(
    kind: type[Worker], concurrency: int, caplog: pytest.LogCaptureFixture
) -> None:
    """`sample_succeeded = 1` gives every succeeded message its log line, in either loop."""
    DONE.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(kind, client, sample_succeeded=1.0, concurrency=concurrency)
    client.lpush("jobs", b"ok1", b"ok2")
    caplog.set_level(logging.INFO)
    try:
        for _ in range(1000):
            worker.step()
            if len(DONE) == 2 and not getattr(worker, "running", None):
                break
    finally:
        worker.finish()
    lines = [r for r in caplog.records if getattr(r, "event", None) == "succeeded"]
    assert len(lines) == 2


class SlowCallback:
    """An async handler whose on_success never returns by itself."""

    async def handle(self, message: bytes) -> None:
        DONE.append(message)

    async def on_success(self, message: bytes, result: object) -> None:
        await asyncio.sleep(3600)


def test_an_async_callback_is_cancelled_at_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """Callbacks run under the same `timeout` as `handle` (docs/handlers.md): a coroutine
    callback past it is cancelled, and its delivery is acked as `handle` decided."""
    DONE.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(ConcurrentWorker, client, handler="tests.test_loop:SlowCallback", timeout=0.2)
    assert isinstance(worker, ConcurrentWorker)
    client.lpush("jobs", b"ok")
    began = time.monotonic()
    try:
        while time.monotonic() - began < 5:
            worker.step()
            if DONE and not worker.running:
                break
    finally:
        worker.finish()
        worker.handler.close()
    assert DONE == [b"ok"] and not worker.running
    assert "SlowCallback.on_success() ran past 0.2s; cancelled" in caplog.text
    keys = worker.queue.keys
    assert client.llen(keys.processing) == 0 and client.llen(keys.dead) == 0


class SlowThreadCallback:
    """A plain handler whose on_success outlasts the message's `timeout`."""

    def handle(self, message: bytes) -> None:
        DONE.append(message)

    def on_success(self, message: bytes, result: object) -> None:
        time.sleep(0.6)


def test_a_thread_callback_shares_its_message_timeout() -> None:
    """A thread cannot be interrupted (docs/concurrency.md): `handle` and its callback share
    the message's one `timeout`, and a callback past it makes the delivery a timeout
    failure, retried, and the worker recycle."""
    DONE.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    handler = "tests.test_loop:SlowThreadCallback"
    worker = _worker(ConcurrentWorker, client, handler=handler, timeout=0.2, concurrency=2)
    client.lpush("jobs", b"ok")
    assert _run_to_exit(worker) == ExitCode.TIMEOUT and DONE == [b"ok"]
    keys = worker.queue.keys
    assert client.zcard(keys.retry) == 1 and client.llen(keys.processing) == 0


# -- the lean loop (`Worker.run_lean`) against `deliver` ------------------------------------


class WithCallback:
    """`handle` of this module with an `on_success`: its worker takes the general path."""

    def handle(self, message: bytes) -> None:
        handle(message)

    def on_success(self, message: bytes, result: object) -> None:
        pass


def slow(message: bytes) -> None:
    """`handle`, 30 ms a message, sleeping: long enough for a short ack interval to pass."""
    time.sleep(0.03)
    handle(message)


class SlowWithCallback(WithCallback):
    """`slow` with an `on_success`: its worker takes the general path."""

    def handle(self, message: bytes) -> None:
        slow(message)


def test_a_plain_handler_runs_lean_and_anything_more_does_not() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    assert _worker(Worker, client).can_run_lean()
    assert not _worker(Worker, client, handler="tests.test_loop:WithCallback").can_run_lean()
    assert not _worker(Worker, client, sample_succeeded=0.5).can_run_lean()
    for limited in ({"max_running": 2}, {"rate_limit": "10/s"}):
        worker = _worker(Worker, client, **limited)
        worker.queue.limits = worker.pair.limits  # as worker.main builds its queue
        assert not worker.can_run_lean()


LEAN_OR_NOT = pytest.mark.parametrize(
    "handler", ["tests.test_loop:handle", "tests.test_loop:WithCallback"], ids=["lean", "general"]
)


@LEAN_OR_NOT
def test_both_paths_settle_a_mixed_batch_alike(handler: str) -> None:
    """Successes acked, a raise retried then dead-lettered, a retried delivery run after the
    finished ones are settled, and the scoreboard's counts: the same on either path."""
    STARTED.clear()
    DONE.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = _worker(Worker, client, handler=handler, prefetch=10, max_attempts=2)
    assert worker.can_run_lean() == handler.endswith(":handle")
    client.lpush("jobs", b"ok1", b"raise", b"ok2", b"ok3")
    try:
        for _ in range(1000):
            assert worker.step() is None
            if client.llen(worker.queue.keys.dead) == 1:
                break
        worker.outbox.flush()
    finally:
        worker.finish()
    assert STARTED == [b"ok1", b"raise", b"ok2", b"ok3", b"raise"]
    assert DONE == [b"ok1", b"ok2", b"ok3"]
    assert worker.board.succeeded == 3 and worker.board.failed == 2
    keys = worker.queue.keys
    assert client.llen(keys.processing) == 0 and client.zcard(keys.retry) == 0
    assert client.lrange(worker.queue.keys.dead, 0, -1) == [b"raise"]


@LEAN_OR_NOT
def test_both_paths_end_the_worker_at_a_timeout(handler: str) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    name = (
        "tests.test_loop:slow"
        if handler.endswith(":handle")
        else "tests.test_loop:SlowWithCallback"
    )
    worker = _worker(Worker, client, handler=name, prefetch=10, timeout=0.01)
    assert worker.can_run_lean() == handler.endswith(":handle")
    client.lpush("jobs", b"a", b"b")
    assert _run_to_exit(worker) == ExitCode.TIMEOUT
    assert worker.board.failed == 1
    assert client.zcard(worker.queue.keys.retry) == 1, "retried, not lost"
    assert client.llen("jobs") + client.llen(worker.queue.keys.processing) == 1


@LEAN_OR_NOT
def test_both_paths_send_acks_once_they_waited_the_ack_interval(
    handler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow batch does not hold finished work unacked: once the oldest pending ack has
    waited ACK_INTERVAL, the acks leave before the batch ends."""
    monkeypatch.setattr("rqworkers.worker.outbox.ACK_INTERVAL", 0.05)
    DONE.clear()
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    name = "tests.test_loop:slow" if handler.endswith(":handle") else handler
    worker = _worker(Worker, client, handler=name, prefetch=10)
    client.lpush("jobs", *[f"ok{i}".encode() for i in range(10)])
    worker.resume()
    assert worker.fill_batch() and len(worker.batch) == 10
    seen: list[int] = []
    real_handle = worker.handler.handle

    def watching(message: bytes) -> None:
        seen.append(client.llen(worker.queue.keys.processing))
        real_handle(message)
        time.sleep(0.03)

    worker.handler.handle = watching
    try:
        assert worker.run_batch() is None
    finally:
        worker.finish()
    assert len(DONE) == 10
    assert min(seen) < 10, f"acks were held back for the whole batch: {seen}"
