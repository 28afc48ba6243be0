"""The time limit kept by a watchdog thread: every call gets exactly its own limit, however
many short calls came before, and no call is ever interrupted before its deadline."""

from __future__ import annotations

import ctypes
import signal
import time
from collections.abc import Iterator

import pytest

from rqworkers.errors import MessageTimeout
from rqworkers.worker.alarm import ALARM


@pytest.fixture(autouse=True)
def alarm() -> Iterator[None]:
    ALARM.install()
    try:
        yield
    finally:
        ALARM.disarm()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def spin(seconds: float) -> None:
    """Busy for `seconds`, so only a signal's exception can end it early."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_call_past_its_limit_is_interrupted_near_the_limit() -> None:
    started = time.monotonic()
    with pytest.raises(MessageTimeout):
        ALARM.call(0.05, spin, 5.0)
    assert 0.05 <= time.monotonic() - started < 1.0
    assert ALARM.left() is None


def test_many_short_calls_outlasting_the_limit_together_are_never_interrupted() -> None:
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 0.3:  # six times the limit, in calls of 10 ms
        ALARM.call(0.05, spin, 0.01)
        calls += 1
    assert calls >= 20


def test_a_stream_of_quick_calls_does_not_keep_waking_the_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker with quick handlers is mostly between calls, and gives the watchdog the GIL
    # at every take's socket read; had the watchdog, finding no call then, gone to sleep
    # for good, the next call would wake it again: a wake-up (and a thread taking the GIL
    # from the worker) per batch of messages. It sleeps on towards the deadline it saw.
    wakes = 0
    wake = ALARM._wake.set

    def counted() -> None:
        nonlocal wakes
        wakes += 1
        wake()

    ALARM.call(0.01, spin, 0.0)
    give_up = time.monotonic() + 5.0
    while ALARM.watching:  # the watchdog wakes at that deadline, finds nothing running...
        assert time.monotonic() < give_up
        time.sleep(0.005)
    monkeypatch.setattr(ALARM._wake, "set", counted)  # ...and sleeps until a call wakes it
    for _ in range(200):
        ALARM.call(30.0, spin, 0.0)
        time.sleep(0.0005)  # the GIL free, as in a socket read: the watchdog may look
    assert wakes == 1, "the first call wakes it; it then sleeps towards that call's deadline"


def test_each_call_gets_its_whole_limit_even_when_an_earlier_call_armed_the_timer() -> None:
    ALARM.call(0.2, spin, 0.0)  # armed to ring 0.2 s from now
    spin(0.15)
    started = time.monotonic()
    assert ALARM.call(0.2, spin, 0.1) is None, "rings at 0.2 s of the first; this one has 0.2"
    with pytest.raises(MessageTimeout):
        ALARM.call(0.2, spin, 5.0)
    assert time.monotonic() - started >= 0.3


def test_a_call_is_never_signalled_before_its_own_deadline() -> None:
    """A C function that returns on EINTR (as some extensions do) sees no signal while the
    deadline of an earlier call passes during it."""
    usleep = ctypes.CDLL(None, use_errno=True).usleep
    ALARM.call(0.05, spin, 0.0)  # a deadline 50 ms from now, passed during the next call
    started = time.monotonic()
    assert ALARM.call(1.0, usleep, 200_000) == 0, "slept its 0.2 s, uninterrupted"
    assert time.monotonic() - started >= 0.2


def test_a_call_blocked_in_c_is_interrupted_at_its_deadline() -> None:
    usleep = ctypes.CDLL(None, use_errno=True).usleep
    started = time.monotonic()
    with pytest.raises(MessageTimeout):
        ALARM.call(0.05, usleep, 2_000_000)
    assert time.monotonic() - started < 1.0


def test_a_shorter_nested_limit_interrupts_the_inner_call_only() -> None:
    def outer() -> float:
        with pytest.raises(MessageTimeout):
            ALARM.call(0.05, spin, 5.0)
        left = ALARM.left()
        assert left is not None
        return left

    left = ALARM.call(2.0, outer)
    assert 1.5 < left < 2.0


def test_a_longer_nested_limit_is_cut_to_the_enclosing_one() -> None:
    started = time.monotonic()
    with pytest.raises(MessageTimeout):
        ALARM.call(0.05, ALARM.call, 10.0, spin, 5.0)
    assert time.monotonic() - started < 1.0
