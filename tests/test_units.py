"""Small pieces in isolation: backoff, handler loading, exit descriptions, the slot's restart
policy and the shared-memory scoreboard."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.common.process import StopFlag, describe_exit
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode, HandlerError
from rqworkers.manager.slots import HEALTHY_AFTER, Slot
from rqworkers.worker import handlers
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import interruptible
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import APPS

# -- backoff -----------------------------------------------------------------------------------


def test_backoff_doubles_from_base() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=100.0)
    assert [backoff.compute(n) for n in range(0, 6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_free_failures_cost_nothing() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=100.0, free=1)
    assert [backoff.compute(n) for n in range(-1, 5)] == [0.0, 0.0, 0.0, 0.5, 1.0, 2.0]
    three_free = ExponentialBackoff(base=1.0, cap=100.0, free=3)
    assert [three_free.compute(n) for n in range(0, 6)] == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]


def test_backoff_is_capped_even_after_very_many_failures() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=30.0, free=1)
    assert backoff.compute(7) == 16.0
    assert backoff.compute(8) == 30.0
    assert backoff.compute(1000) == 30.0
    assert backoff.compute(10**9) == 30.0  # no OverflowError from 2**huge


def test_jitter_takes_off_at_most_its_fraction_and_never_passes_the_cap() -> None:
    backoff = ExponentialBackoff(base=1.0, cap=8.0, jitter=0.25)
    for failures, plain in ((1, 1.0), (3, 4.0), (10, 8.0)):
        samples = [backoff.compute(failures) for _ in range(300)]
        assert all(plain * 0.75 <= s <= plain for s in samples), (failures, min(samples))
        assert len(set(samples)) > 1, "jitter must actually vary the delay"
        assert min(samples) < plain * 0.9  # the range is used, not only its top
    assert backoff.compute(0) == 0.0  # no jitter on nothing


# -- handlers ----------------------------------------------------------------------------------

_module_names = (f"rqw_unit_mod_{n}" for n in itertools.count())


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module with a fresh name into tmp_path; return the name. Unloaded afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = next(_module_names)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_a_function_handler(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        calls = []

        def handle(message):
            calls.append(message)
            return message[::-1]
        """
    )
    handler = Handler(f"{mod}:handle")
    assert handler.path == f"{mod}:handle"
    assert handler.handle(b"abc") == b"cba"
    assert sys.modules[mod].calls == [b"abc"]
    # Lifecycle calls are no-ops for a function.
    handler.setup()
    handler.on_success(b"abc", b"cba")
    handler.on_failure(b"abc", ValueError("x"))
    handler.teardown()
    assert sys.modules[mod].calls == [b"abc"]


def test_a_dotted_attribute_resolves(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        class Namespace:
            @staticmethod
            def handle(message):
                return len(message)
        """
    )
    assert Handler(f"{mod}:Namespace.handle").handle(b"four") == 4


_CLASS_HANDLER = """
events = []
instances = []

class Job:
    def __init__(self):
        instances.append(self)

    def setup(self):
        events.append(("setup",))

    def handle(self, message):
        events.append(("handle", message))
        if message == b"bad":
            raise ValueError("bad message")
        return message.upper()

    def on_success(self, message, result):
        events.append(("on_success", message, result))

    def on_failure(self, message, error):
        events.append(("on_failure", message, str(error)))

    def teardown(self):
        events.append(("teardown",))
"""


def test_a_class_handler_gets_every_callback(write_module: Callable[[str], str]) -> None:
    mod = write_module(_CLASS_HANDLER)
    handler = Handler(f"{mod}:Job")
    module = sys.modules[mod]
    assert len(module.instances) == 1  # one instance per Handler (per worker process)

    handler.setup()
    result = handler.handle(b"ok")
    handler.on_success(b"ok", result)
    with pytest.raises(ValueError, match="bad message"):
        handler.handle(b"bad")  # handle's failures are the caller's to judge
    handler.on_failure(b"bad", ValueError("bad message"))
    handler.teardown()

    assert module.events == [
        ("setup",),
        ("handle", b"ok"),
        ("on_success", b"ok", b"OK"),
        ("handle", b"bad"),
        ("on_failure", b"bad", "bad message"),
        ("teardown",),
    ]
    assert len(module.instances) == 1


def test_callbacks_that_raise_are_logged_and_swallowed(
    write_module: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    mod = write_module(
        """
        class Job:
            def handle(self, message):
                return 1

            def on_success(self, message, result):
                raise RuntimeError("success hook broke")

            def on_failure(self, message, error):
                raise KeyError("failure hook broke")

            def teardown(self):
                raise OSError("teardown broke")
        """
    )
    handler = Handler(f"{mod}:Job")
    with caplog.at_level(logging.ERROR, logger="rqworkers.worker.handlers"):
        handler.on_success(b"m", 1)
        handler.on_failure(b"m", ValueError("x"))
        handler.teardown()

    records = [r for r in caplog.records if r.name == "rqworkers.worker.handlers"]
    assert [r.getMessage() for r in records] == [
        f"handler {mod}:Job.on_success() raised; ignored",
        f"handler {mod}:Job.on_failure() raised; ignored",
        f"handler {mod}:Job.teardown() raised; ignored",
    ]
    assert all(r.levelno == logging.ERROR for r in records)
    assert [type(r.exc_info[1]) for r in records if r.exc_info] == [
        RuntimeError,
        KeyError,
        OSError,
    ]


def test_setup_failure_propagates(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        class Job:
            def setup(self):
                raise ConnectionError("database is down")

            def handle(self, message):
                return None
        """
    )
    handler = Handler(f"{mod}:Job")
    with pytest.raises(ConnectionError, match="database is down"):
        handler.setup()


def test_a_class_without_setup_is_fine(write_module: Callable[[str], str]) -> None:
    mod = write_module(
        """
        class Job:
            def handle(self, message):
                return 7
        """
    )
    handler = Handler(f"{mod}:Job")
    handler.setup()
    handler.on_success(b"m", 7)
    handler.teardown()
    assert handler.handle(b"m") == 7


@pytest.mark.parametrize(
    ("source", "attr", "message"),
    [
        ("LIMIT = 42\n", "LIMIT", "'{path}' is an int, not a function or class"),
        ("NAME = 'handle'\n", "NAME", "'{path}' is a str, not a function or class"),
        ("def handle(m):\n    pass\n", "nope", "module '{mod}' has no attribute 'nope'"),
        ("class Job:\n    pass\n", "Job.gone", "module '{mod}' has no attribute 'Job.gone'"),
        ("class Job:\n    pass\n", "Job", "class '{path}' has no handle(message) method"),
        ("class Job:\n    handle = 3\n", "Job", "class '{path}' has no handle(message) method"),
    ],
)
def test_bad_handler_targets(
    write_module: Callable[[str], str], source: str, attr: str, message: str
) -> None:
    mod = write_module(source)
    path = f"{mod}:{attr}"
    with pytest.raises(HandlerError) as info:
        Handler(path)
    assert str(info.value) == message.format(path=path, mod=mod)
    assert handlers.verify(path) == str(info.value)


def test_a_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HandlerError) as info:
        Handler("rqw_no_such_module_at_all:handle")
    assert str(info.value) == (
        "cannot import 'rqw_no_such_module_at_all': "
        "ModuleNotFoundError: No module named 'rqw_no_such_module_at_all'"
    )


def test_a_module_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))
    sys.modules.pop("badimport", None)
    try:
        with pytest.raises(HandlerError) as info:
            Handler("badimport:handle")
    finally:
        sys.modules.pop("badimport", None)
    assert str(info.value) == (
        "cannot import 'badimport': ImportError: this module cannot be imported (on purpose)"
    )
    assert isinstance(info.value.__cause__, ImportError)


def test_a_module_raising_any_exception_at_import_is_a_handler_error(
    write_module: Callable[[str], str],
) -> None:
    mod = write_module("1 / 0\n")
    problem = handlers.verify(f"{mod}:handle")
    assert problem == f"cannot import {mod!r}: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("path", ["no_colon", ":handle", "module:", ""])
def test_malformed_paths(path: str) -> None:
    with pytest.raises(HandlerError, match="is not of the form module:attribute"):
        Handler(path)


def test_verify_accepts_good_paths() -> None:
    assert handlers.verify("rqworkers.examples:log_message") is None
    assert handlers.verify("rqworkers.examples:Counter") is None


# -- describe_exit -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (0, "exit code 0"),
        (1 << 8, "exit code 1"),
        (70 << 8, "exit code 70"),
        (255 << 8, "exit code 255"),
        (signal.SIGKILL, "killed by signal 9 (SIGKILL)"),
        (signal.SIGTERM, "killed by signal 15 (SIGTERM)"),
        (signal.SIGSEGV | 0x80, "killed by signal 11 (SIGSEGV)"),  # with a core dump
        (40, "killed by signal 40 (unknown)"),  # a real-time signal without a name
    ],
)
def test_describe_exit(status: int, words: str) -> None:
    assert describe_exit(status) == words


def _fork_and_wait(child: Callable[[], int]) -> int:
    """Fork, run `child` there and leave through os._exit whatever happens; wait; status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def test_describe_exit_of_real_children() -> None:
    assert describe_exit(_fork_and_wait(lambda: 3)) == "exit code 3"

    def killed() -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    assert describe_exit(_fork_and_wait(killed)) == "killed by signal 9 (SIGKILL)"


# -- slots -------------------------------------------------------------------------------------

BACKOFF = ExponentialBackoff(base=0.5, cap=30.0, free=1)  # the manager's, without jitter
PAIR = PairSettings(host="local", queue="q", handler="app:handle", url="redis://h:6379/0")


def exited(code: int) -> int:
    return code << 8


@pytest.fixture
def slot() -> Slot:
    return Slot(PAIR, 1, "q-1", "node:1")


def test_a_max_requests_recycle_restarts_at_once(slot: Slot) -> None:
    slot.board.prepare()
    slot.spawned(os.getpid(), now=100.0)
    slot.board.busy(time.monotonic())
    slot.board.idle(False, 0.01)
    reason = slot.ended(exited(ExitCode.MAX_REQUESTS), now=101.0, backoff=BACKOFF)
    assert reason == "max requests"
    assert slot.failures == 0
    assert slot.next_start == 101.0
    assert slot.previous_exit is None
    assert (slot.pid, slot.process) == (None, None)
    assert slot.board.last_exit == "max requests"
    assert slot.board.totals()["recycled_max_requests"] == 1
    slot.board.prepare()
    assert slot.board.succeeded == 0, "the next worker's own count starts at zero"
    assert slot.board.totals()["succeeded"] == 1, "the slot's total survives the recycle"


def test_a_timeout_recycle_restarts_at_once(slot: Slot) -> None:
    slot.failures = 3
    slot.spawned(os.getpid(), now=100.0)
    assert slot.ended(exited(ExitCode.TIMEOUT), now=100.5, backoff=BACKOFF) == "timeout"
    assert slot.failures == 0
    assert slot.next_start == 100.5


def test_repeated_quick_crashes_back_off_more_and_more(slot: Slot) -> None:
    now = 1000.0
    delays = []
    for _ in range(6):
        slot.spawned(os.getpid(), now)
        now += 1.0  # dies one second after starting: well within HEALTHY_AFTER
        reason = slot.ended(signal.SIGKILL, now, BACKOFF)
        assert reason == "killed by signal 9 (SIGKILL)"
        assert slot.previous_exit == reason
        delays.append(slot.next_start - now)
        now = slot.next_start
    assert slot.failures == 6
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_startup_failures_count_as_crashes(slot: Slot) -> None:
    for expected in (1, 2, 3):
        slot.spawned(os.getpid(), now=0.0)
        assert slot.ended(exited(ExitCode.STARTUP_FAILED), now=0.1, backoff=BACKOFF) == (
            "startup failed"
        )
        assert slot.failures == expected
    assert slot.next_start == pytest.approx(0.1 + 1.0)
    assert slot.previous_exit == "startup failed"


def test_an_unexpected_exit_code_is_a_crash(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    assert slot.ended(exited(1), now=0.5, backoff=BACKOFF) == "exit code 1"
    assert slot.failures == 1
    assert slot.previous_exit == "exit code 1"


def test_a_crash_after_a_long_life_restarts_at_once(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    slot.ended(signal.SIGKILL, now=1.0, backoff=BACKOFF)
    slot.spawned(os.getpid(), now=1.0)
    slot.ended(signal.SIGKILL, now=2.0, backoff=BACKOFF)
    assert slot.failures == 2
    assert slot.next_start == 2.5

    slot.spawned(os.getpid(), now=3.0)
    slot.board.ready()  # its handler's setup() returned
    slot.ended(signal.SIGSEGV, now=3.0 + HEALTHY_AFTER, backoff=BACKOFF)
    assert slot.failures == 1  # the count starts over
    assert slot.next_start == 3.0 + HEALTHY_AFTER  # no delay


def test_a_quick_crash_after_progress_restarts_at_once_however_many_came_before(
    slot: Slot,
) -> None:
    """Issue 8, item 6: a poison message among healthy ones kills its worker one second
    after the start, again and again; each worker settled messages, so none waits."""
    now = 1000.0
    for _ in range(8):
        slot.board.prepare()
        slot.spawned(os.getpid(), now)
        slot.board.replayed()  # took over its private list, as every worker does first
        slot.board.busy(time.monotonic())
        slot.board.idle(False, 0.001)
        slot.board.settled(1)  # Redis confirmed its ack
        slot.board.busy(time.monotonic())
        now += 1.0
        slot.ended(signal.SIGKILL, now, BACKOFF)
        assert slot.failures == 1 and slot.next_start == now
    slot.board.prepare()
    slot.spawned(os.getpid(), now)
    slot.ended(signal.SIGKILL, now + 0.1, BACKOFF)  # then one that did nothing at all
    assert slot.failures == 2 and slot.next_start == pytest.approx(now + 0.1 + 0.5)


@pytest.mark.parametrize("code", [signal.SIGKILL, exited(ExitCode.REDIS_REFUSED)])
@pytest.mark.parametrize("finished", [False, True], ids=["in-handler", "handler-returned"])
def test_the_same_delivery_ending_its_worker_again_and_again_backs_off(
    slot: Slot, code: int, finished: bool
) -> None:
    """Issue 17: a worker that dies before settling anything, with a delivery in its
    handler or one that has left it unsettled (its ack refused: exit 74), is a crash loop
    like a failed start, however much it ran: 0, 0.5, 1, 2 s... ."""
    now, delays = 1000.0, []
    for _ in range(4):
        slot.board.prepare()
        slot.spawned(os.getpid(), now)
        slot.board.ready()
        slot.board.replayed()
        slot.board.mark_unstarted(b"")
        slot.board.busy(time.monotonic())
        if finished:
            slot.board.idle(False, 0.001)
        now += 1.0
        slot.ended(code, now, BACKOFF)
        delays.append(slot.next_start - now)
        now = slot.next_start
    assert delays == pytest.approx([0.0, 0.5, 1.0, 2.0])
    assert slot.board.get("failures") == 4, "published for /healthz and status"
    assert slot.board.state() == "backoff"


def test_a_setup_that_fails_slowly_is_still_a_crash_loop(slot: Slot) -> None:
    for start in range(3):
        slot.spawned(os.getpid(), now=100.0 * start)
        slot.ended(exited(ExitCode.STARTUP_FAILED), now=100.0 * start + 90, backoff=BACKOFF)
    assert slot.failures == 3, "never ready: a long life in setup() resets nothing"
    assert slot.board.get("failures") == 3, "published for /healthz"


def test_an_exit_mid_message_is_named_so_whatever_its_code(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    slot.board.ready()
    slot.board.busy(time.monotonic())
    reason = slot.ended(exited(ExitCode.OK), now=20.0, backoff=BACKOFF)
    assert reason == "exited mid-message (exit code 0)"
    assert slot.failures == 1 and slot.previous_exit == reason
    assert slot.board.totals()["recycled_crash"] == 1


def test_a_clean_stop_resets_failures_and_previous_exit(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    slot.ended(signal.SIGKILL, now=0.1, backoff=BACKOFF)
    assert slot.previous_exit is not None
    slot.spawned(os.getpid(), now=1.0)
    assert slot.ended(exited(ExitCode.OK), now=2.0, backoff=BACKOFF) == "stopped"
    assert slot.failures == 0
    assert slot.previous_exit is None


def test_the_managers_stop_reason_wins(slot: Slot) -> None:
    for _ in range(3):
        slot.spawned(os.getpid(), now=0.0)
        slot.ended(signal.SIGKILL, now=0.1, backoff=BACKOFF)
    assert slot.failures == 3

    slot.spawned(os.getpid(), now=10.0)
    assert slot.stop_reason is None  # started() clears it
    slot.stop_reason = "hard memory limit (400MB > 300MB)"
    reason = slot.ended(signal.SIGKILL, now=10.5, backoff=BACKOFF)
    assert reason == "hard memory limit (400MB > 300MB)"
    assert slot.failures == 0  # the manager's own kill is not the worker's crash
    assert slot.next_start == 10.5
    assert slot.previous_exit == reason  # handed to the next worker for its dead letters
    assert slot.stop_reason is None


def test_started_tolerates_a_pid_that_is_already_gone(slot: Slot) -> None:
    slot.spawned(2**22 + 12345, now=5.0)  # above the default pid_max: never a process
    assert slot.process is None
    assert slot.rss() == 0
    slot.spawned(os.getpid(), now=5.0)
    assert slot.rss() > 0


# -- scoreboard --------------------------------------------------------------------------------


def test_the_scoreboard_is_shared_across_fork() -> None:
    board = Scoreboard()
    assert (board.succeeded, board.failed, board.busy_for()) == (0, 0, 0.0)

    def worker() -> int:
        board.mark_unstarted(b"id-1")
        board.replayed()
        board.mark_unstarted(b"id-2")
        board.busy(time.monotonic())
        board.idle(False, 0.002)
        board.busy(time.monotonic())
        board.idle(True, 0.3)
        board.busy(time.monotonic())
        board.idle(False, 20.0)
        board.mark_unstarted(b"id-5")
        board.busy(time.monotonic())  # left mid-message
        board.settled(3)
        return 0

    started = time.monotonic()
    assert _fork_and_wait(worker) == 0
    assert board.succeeded == 2
    assert board.failed == 1
    assert board.first_unstarted == b"id-5", "what it died before starting is named"
    assert board.made_progress
    busy_for = board.busy_for()
    assert 0.0 < busy_for <= time.monotonic() - started + 0.01
    buckets = board.buckets()
    assert sum(buckets) == 3 and buckets[0] == 1 and buckets[-1] == 1
    assert board.totals()["duration_sum"] == pytest.approx(20.302)

    board.idle(False, 0.0)
    assert board.busy_for() == 0.0
    assert board.succeeded == 3
    board.prepare()
    assert board.first_unstarted is None, "unknown until the next worker has replayed"
    assert not board.made_progress
    board.replayed()
    assert board.first_unstarted == b"", "a new worker has started nothing"


def test_the_child_sees_what_the_parent_wrote() -> None:
    board = Scoreboard()
    for failed in (False, True, True, False, False):
        board.idle(failed, 0.0)
    status = _fork_and_wait(lambda: board.succeeded * 10 + board.failed)
    assert os.waitstatus_to_exitcode(status) == 32


def test_each_scoreboard_is_its_own_memory() -> None:
    one, two = Scoreboard(), Scoreboard()
    one.idle(True, 0.0)
    assert (one.succeeded, one.failed) == (0, 1)
    assert (two.succeeded, two.failed) == (0, 0)


def test_the_scoreboard_tells_the_state_of_its_slot() -> None:
    board = Scoreboard()
    board.prepare()
    board.set_pid(123)
    assert board.state() == "starting", "until its handler's setup() has returned"
    board.ready()
    assert board.state() == "idle"
    board.waiting("ConnectionError: refused")
    assert (board.state(), board.waiting_reason) == ("waiting", "ConnectionError: refused")
    board.waiting(None)
    assert (board.state(), board.waiting_reason) == ("idle", None)
    board.busy(time.monotonic())
    assert board.state() == "busy"
    board.stop_requested()
    assert board.state() == "stopping"
    board.worker_ended("killed by signal 9 (SIGKILL)", "crash", time.time() + 60)
    assert board.state() == "backoff"
    assert board.last_exit == "killed by signal 9 (SIGKILL)"
    assert board.totals()["recycled_crash"] == 1


# -- a stop signal while blocked -----------------------------------------------------------------


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
