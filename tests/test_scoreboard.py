"""`worker.scoreboard`: the shared-memory counters a worker writes and its manager reads."""

from __future__ import annotations

import os
import time

import pytest

from rqworkers.worker.scoreboard import Scoreboard
from tests.support import fork_and_wait


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
    assert fork_and_wait(worker) == 0
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
    status = fork_and_wait(lambda: board.succeeded * 10 + board.failed)
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


def test_a_replay_begun_and_not_finished_names_its_process_until_the_next_start() -> None:
    board = Scoreboard()
    board.prepare()
    assert board.replay_interrupted is None, "no replay begun"
    board.replay_begun(b"0123456789ab.")
    assert board.replay_interrupted == b"0123456789ab.", "begun, not finished: maybe charged"
    board.replayed()
    assert board.replay_interrupted is None, "finished: its mark says what it ran"
    board.prepare()
    board.replay_begun(b"ba9876543210.")
    board.prepare()  # the next worker of the slot
    assert board.replay_interrupted is None


def test_a_mark_moved_on_by_number_names_the_take_s_nth_delivery_even_after_a_kill() -> None:
    """The lean loop names the oldest unstarted delivery of a take by its number
    (`mark_in` once, then `start` per message): what a manager reads after the worker's
    death is that delivery's whole id, and a mark by id afterwards replaces it."""
    board = Scoreboard()
    board.replayed()

    def worker() -> int:
        board.mark_in(b"0123456789ab.41.", 1)
        for n in (2, 3, 10, 11):
            board.start(n, time.monotonic())
            board.succeeded_in(0.001)
        board.start(12, time.monotonic())  # killed in the 11th's handler
        return 0

    assert fork_and_wait(worker) == 0
    assert board.first_unstarted == b"0123456789ab.41.12"
    board.mark_unstarted(b"other.7.3")
    assert board.first_unstarted == b"other.7.3", "a mark by id holds no number"
    board.mark_in(b"other.8.", 5)
    assert board.first_unstarted == b"other.8.5"
    board.mark_unstarted(b"")
    assert board.first_unstarted == b"", "every delivery there has started"
    board.prepare()
    board.replayed()
    assert board.first_unstarted == b"", "a new worker has started nothing"


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.005, 0.0050001, 0.3, 10.0, 11.0, 1e9])
def test_the_lean_loop_counts_a_success_as_idle_does(seconds: float) -> None:
    lean, general = Scoreboard(), Scoreboard()
    lean.busy(1.0)
    lean.succeeded_in(seconds)
    general.busy(1.0)
    general.idle(False, seconds)
    assert lean.buckets() == general.buckets() and sum(lean.buckets()) == 1
    assert lean.totals() == general.totals() and lean.succeeded == 1
    assert lean.busy_for() == general.busy_for() == 0.0
