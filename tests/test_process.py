"""`common.process`: how a child's wait status is described, and what signals do to a child
at the instant it is forked."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator

import pytest

from rqworkers.common import process
from rqworkers.common.process import explain_exit
from tests.support import fork_and_wait, wait_for


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
def test_explain_exit(status: int, words: str) -> None:
    assert explain_exit(status) == words


def test_explain_exit_of_real_children() -> None:
    assert explain_exit(fork_and_wait(lambda: 3)) == "exit code 3"

    def killed() -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    assert explain_exit(fork_and_wait(killed)) == "killed by signal 9 (SIGKILL)"


@pytest.fixture
def noted() -> Iterator[list[int]]:
    """SIGTERM handled in this process as the manager handles it: only noted, for a loop."""
    signals: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    try:
        yield signals
    finally:
        signal.signal(signal.SIGTERM, previous)


def _hang() -> int:
    time.sleep(60)  # a setup() that never returns
    return 0


def _ended(pid: int) -> int | None:
    ended, status = os.waitpid(pid, os.WNOHANG)
    return status if ended else None


def test_a_sigterm_at_the_instant_of_the_fork_ends_the_child(noted: list[int]) -> None:
    # Sent before the child has run a line of its own, the signal must not reach the
    # handler it inherited, which would note it where no loop looks and let it hang.
    pids = []
    try:
        for _ in range(20):
            pid = process.fork(_hang, "hangs", own_group=True)
            pids.append(pid)
            os.kill(pid, signal.SIGTERM)
        statuses = [wait_for(lambda p=pid: _ended(p), timeout=5, what=f"{pid} to end")
                    for pid in pids]  # fmt: skip
    finally:
        for pid in pids:
            if process.send(pid, signal.SIGKILL):
                os.waitpid(pid, 0)
    assert {explain_exit(status) for status in statuses} == {"killed by signal 15 (SIGTERM)"}
    assert noted == [], "nothing reached this process"


def test_a_fork_leaves_the_signal_mask_as_it_found_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Signals are blocked across the fork: left blocked, the manager would never hear a
    # SIGTERM again, nor would any process it started later (a mask outlives exec).
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    in_child = process.call_in_child(lambda: repr(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    assert in_child == repr(before)
    pid = process.fork(lambda: 0 if signal.pthread_sigmask(signal.SIG_BLOCK, []) == before else 9)
    assert explain_exit(os.waitpid(pid, 0)[1]) == "exit code 0", "the child's mask"
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before

    def fork_fails() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, "fork", fork_fails)
    with pytest.raises(OSError):
        process.fork(lambda: 0)
    with pytest.raises(OSError):
        process.call_in_child(lambda: "")
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_a_signal_to_the_parent_during_the_fork_is_delayed_not_lost(
    noted: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What reaches the manager while its signals are held (a SIGCHLD, a stop) is handled once
    # they are let in again; the child, where it was never pending, does not get it.
    real_fork = os.fork

    def fork_signalled() -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # while the signals are held
        return real_fork()

    monkeypatch.setattr(os, "fork", fork_signalled)
    pid = process.fork(lambda: 0)
    assert explain_exit(os.waitpid(pid, 0)[1]) == "exit code 0"
    assert wait_for(lambda: noted, timeout=5, what="the parent's handler") == [signal.SIGTERM]
