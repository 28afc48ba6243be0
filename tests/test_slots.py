"""`manager.slots`: a slot's restart policy (when its next worker starts, and why the last
one ended) and what it publishes on its scoreboard."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode
from rqworkers.manager.slots import HEALTHY_AFTER, Slot

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
    assert slot.bad_exits == 0
    assert slot.next_start == 101.0
    assert slot.previous_exit is None
    assert (slot.pid, slot.process) == (None, None)
    assert slot.board.last_exit == "max requests"
    assert slot.board.totals()["recycled_max_requests"] == 1
    slot.board.prepare()
    assert slot.board.succeeded == 0, "the next worker's own count starts at zero"
    assert slot.board.totals()["succeeded"] == 1, "the slot's total survives the recycle"


def test_a_timeout_recycle_restarts_at_once(slot: Slot) -> None:
    slot.bad_exits = 3
    slot.spawned(os.getpid(), now=100.0)
    assert slot.ended(exited(ExitCode.TIMEOUT), now=100.5, backoff=BACKOFF) == "timeout"
    assert slot.bad_exits == 0
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
    assert slot.bad_exits == 6
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_startup_failures_count_as_crashes(slot: Slot) -> None:
    for expected in (1, 2, 3):
        slot.spawned(os.getpid(), now=0.0)
        assert slot.ended(exited(ExitCode.STARTUP_FAILED), now=0.1, backoff=BACKOFF) == (
            "startup failed"
        )
        assert slot.bad_exits == expected
    assert slot.next_start == pytest.approx(0.1 + 1.0)
    assert slot.previous_exit == "startup failed"


def test_an_unexpected_exit_code_is_a_crash(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    assert slot.ended(exited(1), now=0.5, backoff=BACKOFF) == "exit code 1"
    assert slot.bad_exits == 1
    assert slot.previous_exit == "exit code 1"


def test_a_crash_after_a_long_life_restarts_at_once(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    slot.ended(signal.SIGKILL, now=1.0, backoff=BACKOFF)
    slot.spawned(os.getpid(), now=1.0)
    slot.ended(signal.SIGKILL, now=2.0, backoff=BACKOFF)
    assert slot.bad_exits == 2
    assert slot.next_start == 2.5

    slot.spawned(os.getpid(), now=3.0)
    slot.board.ready()  # its handler's setup() returned
    slot.ended(signal.SIGSEGV, now=3.0 + HEALTHY_AFTER, backoff=BACKOFF)
    assert slot.bad_exits == 1  # the count starts over
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
        assert slot.bad_exits == 1 and slot.next_start == now
    slot.board.prepare()
    slot.spawned(os.getpid(), now)
    slot.ended(signal.SIGKILL, now + 0.1, BACKOFF)  # then one that did nothing at all
    assert slot.bad_exits == 2 and slot.next_start == pytest.approx(now + 0.1 + 0.5)


@pytest.mark.parametrize("code", [signal.SIGKILL, exited(ExitCode.REDIS_LASTING_ERROR)])
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
    assert slot.board.get("bad_exits") == 4, "published for /healthz and status"
    assert slot.board.state() == "backoff"


def test_a_setup_that_fails_slowly_is_still_a_crash_loop(slot: Slot) -> None:
    for start in range(3):
        slot.spawned(os.getpid(), now=100.0 * start)
        slot.ended(exited(ExitCode.STARTUP_FAILED), now=100.0 * start + 90, backoff=BACKOFF)
    assert slot.bad_exits == 3, "never ready: a long life in setup() resets nothing"
    assert slot.board.get("bad_exits") == 3, "published for /healthz"


def test_an_exit_mid_message_is_named_so_whatever_its_code(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    slot.board.ready()
    slot.board.busy(time.monotonic())
    reason = slot.ended(exited(ExitCode.OK), now=20.0, backoff=BACKOFF)
    assert reason == "exited mid-message (exit code 0)"
    assert slot.bad_exits == 1 and slot.previous_exit == reason
    assert slot.board.totals()["recycled_crash"] == 1


def test_a_clean_stop_resets_failures_and_previous_exit(slot: Slot) -> None:
    slot.spawned(os.getpid(), now=0.0)
    slot.ended(signal.SIGKILL, now=0.1, backoff=BACKOFF)
    assert slot.previous_exit is not None
    slot.spawned(os.getpid(), now=1.0)
    assert slot.ended(exited(ExitCode.OK), now=2.0, backoff=BACKOFF) == "stopped"
    assert slot.bad_exits == 0
    assert slot.previous_exit is None


def test_the_managers_stop_reason_wins(slot: Slot) -> None:
    for _ in range(3):
        slot.spawned(os.getpid(), now=0.0)
        slot.ended(signal.SIGKILL, now=0.1, backoff=BACKOFF)
    assert slot.bad_exits == 3

    slot.spawned(os.getpid(), now=10.0)
    assert slot.stop_reason is None  # started() clears it
    slot.stop_reason = "hard memory limit (400MB > 300MB)"
    reason = slot.ended(signal.SIGKILL, now=10.5, backoff=BACKOFF)
    assert reason == "hard memory limit (400MB > 300MB)"
    assert slot.bad_exits == 0  # the manager's own kill is not the worker's crash
    assert slot.next_start == 10.5
    assert slot.previous_exit == reason  # handed to the next worker for its dead letters
    assert slot.stop_reason is None


def test_started_tolerates_a_pid_that_is_already_gone(slot: Slot) -> None:
    slot.spawned(2**22 + 12345, now=5.0)  # above the default pid_max: never a process
    assert slot.process is None
    assert slot.rss() == 0
    slot.spawned(os.getpid(), now=5.0)
    assert slot.rss() > 0


def test_a_worker_that_never_replayed_leaves_its_keeper_the_mark_the_slot_knew(
    slot: Slot,
) -> None:
    """Its setup() failed: the slot keeps the mark of the worker before, and writes it back
    to the scoreboard, where its keeper reads it should it reclaim the list meanwhile."""
    slot.previous_unstarted = b"0123456789ab.7.3"
    slot.board.prepare()
    slot.spawned(os.getpid(), now=100.0)
    assert slot.board.first_unstarted is None, "the new worker has not replayed"
    slot.ended(exited(ExitCode.FAILURE), now=100.5, backoff=BACKOFF)
    assert slot.previous_unstarted == b"0123456789ab.7.3"
    assert slot.board.first_unstarted == b"0123456789ab.7.3" and slot.board.spared == ()
