"""The handler's time limit: `MessageTimeout` raised in the main thread once a call runs past
its deadline, with no system call per message.

Arming an interval timer around every call costs two `setitimer` system calls a message, a
large part of a short message's whole cost at a high prefetch. So a call only writes its
deadline where a watchdog thread can read it. The watchdog sleeps until the deadline it last saw;
when it wakes, the deadline of whatever runs *now* decides: past it, the main thread gets
SIGALRM (`pthread_kill`), whose handler raises `MessageTimeout`; not yet, it sleeps again
until then; nothing running, it sleeps until a call wakes it. A stream of short messages so
costs one wake-up of the watchdog per `timeout` seconds, and a call is only ever
interrupted once its own deadline has passed: never early, and never between calls.

The watchdog needs the GIL for a moment to look, which a thread holding it in C code does
not give; the manager's `timeout_grace` kill covers that.

A handler must not use SIGALRM itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from rqworkers.errors import MessageTimeout

T = TypeVar("T")

_RETRY_KILL = 0.01  # seconds between signals while the main thread has not yet raised


class Alarm:
    """One per process (SIGALRM is): `ALARM`.

    Two threads share two floats, each written by one side: `deadline` by the main thread,
    `watching` by whichever finds it must wake the watchdog. Under the GIL their writes
    and reads are in program order, which is all the handshake in `until` and `_watch`
    needs: a call either sees the watchdog idle and wakes it, or the watchdog, after
    going idle, sees the call's deadline.
    """

    def __init__(self) -> None:
        self.deadline = 0.0  # monotonic seconds; 0: nothing is under a time limit
        self.watching = 0.0  # the deadline the watchdog sleeps towards; 0: none
        self._wake = threading.Event()
        self._main = 0  # ident of the thread to interrupt
        self._pid = 0  # the process whose watchdog runs (a fork has none)

    def install(self) -> None:
        """Take SIGALRM and start the watchdog; from the main thread, the only one a signal
        interrupts. The watchdog starts once per process."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGALRM, self._ring)
        if self._pid != os.getpid():
            self._main = threading.main_thread().ident or 0
            self._pid = os.getpid()
            threading.Thread(target=self._watch, name="rqworkers-alarm", daemon=True).start()

    def call(self, seconds: float, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, interrupted by `MessageTimeout` once it runs `seconds`."""
        return self.until(time.monotonic() + seconds, fn, *args)

    def until(self, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, interrupted by `MessageTimeout` at `deadline` (monotonic seconds),
        or at the enclosing call's deadline if that is sooner (a task's own timeout runs
        inside the pair's)."""
        outer = self.deadline
        if outer and outer < deadline:
            deadline = outer
        self.deadline = deadline
        watching = self.watching
        if not watching or watching > deadline:
            self.watching = deadline
            self._wake.set()
        try:
            return fn(*args)
        finally:
            self.deadline = outer

    def left(self) -> float | None:
        """Seconds until the running call's deadline; None outside any call."""
        return self.deadline - time.monotonic() if self.deadline else None

    def disarm(self) -> None:
        """Nothing of this worker runs under a limit any more."""
        self.deadline = 0.0

    def _watch(self) -> None:
        while True:
            target = self.watching
            self._wake.wait(max(0.0, target - time.monotonic()) if target else None)
            self._wake.clear()
            deadline = self.deadline
            now = time.monotonic()
            if not deadline:
                # Nothing runs. Between two calls, which is where a worker with quick
                # handlers mostly is, keep sleeping towards the old target: the next call's
                # deadline is later, so it need not wake this thread (one wake per batch of
                # messages took the GIL from the worker). Once past it, sleep till a call wakes.
                target = self.watching if self.watching > now else 0.0
            elif now < deadline:
                target = deadline  # woken early, or by a later call: sleep till it is due
            else:
                signal.pthread_kill(self._main, signal.SIGALRM)
                target = now + _RETRY_KILL  # look again should the main thread not act
            self.watching = target
            if self.deadline != deadline:  # a call began or ended meanwhile: look again
                self._wake.set()

    def _ring(self, signum: int, frame: FrameType | None) -> None:
        deadline = self.deadline
        if not deadline or time.monotonic() < deadline:
            return  # that call ended, and another began: its own deadline holds
        self.deadline = 0.0  # raised once; the call's `until` restores what encloses it
        raise MessageTimeout()


ALARM = Alarm()
