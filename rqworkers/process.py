"""Forking children, tying their lives to the manager's, and reading how they ended."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable

from rqworkers.errors import ExitCode

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MANAGER_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGQUIT,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies. False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def fork(child: Callable[[], int]) -> int:
    """Run `child()` in a forked process that exits with its return value; return the pid.

    The child never returns into the caller's stack: whatever happens it leaves through
    `os._exit`, so the manager's `finally` blocks and atexit hooks never run twice.
    """
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = int(ExitCode.FAILURE)
    try:
        signal.set_wakeup_fd(-1)
        for signum in _MANAGER_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        set_parent_death_signal(signal.SIGTERM)
        # If the parent died before prctl took effect, no signal will ever come.
        code = int(ExitCode.ORPHANED) if os.getppid() != parent else child()
    except BaseException:
        log.exception("worker crashed")
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def call_in_child(fn: Callable[[], str]) -> str:
    """Run `fn` in a short-lived child and return its text.

    Used to import user handlers once at start-up without loading them into the manager,
    which must stay small and free of whatever threads or sockets user modules open.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            text = fn()
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}"
        with os.fdopen(write_end, "wb") as out:
            out.write(text.encode("utf-8", "replace"))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    return data.decode("utf-8", "replace")


def describe_exit(status: int) -> str:
    """Words for a wait status: `exit code 3`, `killed by signal 9 (SIGKILL)`."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-code} ({name})"


def send(pid: int, signum: int) -> bool:
    """Signal `pid`; False if it is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True
