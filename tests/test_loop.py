"""`worker.loop`: `interruptible`, which lets a stop signal cut a blocking call short."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from rqworkers.common.process import StopFlag
from rqworkers.worker.loop import interruptible


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
