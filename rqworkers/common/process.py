"""Forking children, tying their lives to the manager's, and reading how they ended."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

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
_Mask = set[int | signal.Signals]  # blocked signals, as `signal.pthread_sigmask` gives them
CALL_TIMEOUT = 30.0  # seconds `call_in_child` waits for its child's answer


class StopFlag:
    """A signal handler that only records the request; loops look at it between steps."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.set = True


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies. False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def fork(child: Callable[[], int], name: str = "child", own_group: bool = False) -> int:
    """Run `child()` in a forked process that exits with its return value; return the pid.

    The child never returns into the caller's stack: whatever happens it leaves through
    `os._exit`, so the manager's `finally` blocks and atexit hooks never run twice.

    With `own_group`, the child leads a process group of its own, so that `send(pid,
    SIGKILL, group=True)` also ends whatever subprocesses it started. It stays in the
    manager's session, and ignores SIGTTOU so that writing its logs to a terminal set to
    `tostop` never stops it. A terminal's Ctrl-C no longer reaches it directly: the
    manager, which gets the SIGINT, stops it with SIGTERM.
    """
    parent = os.getpid()
    pid, mask = _fork_holding_signals()
    if pid:
        if own_group:  # in both processes, so the group exists whichever runs first
            _join_own_group(pid)
        return pid
    code = int(ExitCode.FAILURE)
    try:
        attached = _enter_child(parent, mask)
        if own_group:
            _join_own_group(0)
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        code = child() if attached else int(ExitCode.ORPHANED)
    except SystemExit as exc:  # `sys.exit(n)` from user code: the exit code it asked for
        code = exit_code_of(exc)
        log.warning("%s called sys.exit(%r)", name, exc.code)
    except BaseException:
        log.exception("%s crashed", name)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork_holding_signals() -> tuple[int, _Mask]:
    """`os.fork()` with the manager's signals blocked across it; the pid, and the mask to
    put back, which the parent has put back already.

    The child starts with the manager's handlers, which only note a signal for the
    manager's loop, a loop the child never runs: a SIGTERM let in before `_enter_child`
    has dropped them would be lost, and a worker hanging in setup() would never end.
    Blocked, it waits in the child until the handlers are the default ones, then ends it.
    The parent loses nothing either: what came while blocked (a SIGCHLD) is only delayed.
    The mask is put back whatever happens, a failed fork included: a manager left with
    its signals blocked, and every process it starts after (a mask outlives exec), would
    never hear SIGTERM, SIGHUP or SIGCHLD again.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _MANAGER_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid, mask


def _enter_child(parent: int, mask: _Mask) -> bool:
    """First thing in a child of `_fork_holding_signals`: drop the manager's signal
    handling and wake-up fd, only then let its signals in (`mask`), and ask for SIGTERM
    when the manager dies. False if it died already: before prctl took effect, no signal
    will ever come."""
    signal.set_wakeup_fd(-1)
    for signum in _MANAGER_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    set_parent_death_signal(signal.SIGTERM)
    return os.getppid() == parent


def _join_own_group(pid: int) -> None:
    """Make `pid` (0: this process) the leader of a new process group."""
    with contextlib.suppress(OSError):  # the other process did it first, or has exited
        os.setpgid(pid, 0)


def call_in_child(fn: Callable[[], str], timeout: float = CALL_TIMEOUT) -> str:
    """Run `fn` in a short-lived child and return its text.

    Used to import user handlers without loading them into the manager, which must stay
    small and free of whatever threads or sockets user modules open. A child that has not
    answered within `timeout` seconds (an import that hangs) is killed, and `TimeoutError`
    raised; a failed fork raises its `OSError`.
    """
    parent = os.getpid()
    read_end, write_end = os.pipe()
    try:
        pid, mask = _fork_holding_signals()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:
        try:
            os.close(read_end)
            text = fn() if _enter_child(parent, mask) else "manager gone"
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}"
        try:
            with os.fdopen(write_end, "wb") as out:
                out.write(text.encode("utf-8", "replace"))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = _read_until_eof(read_end, time.monotonic() + timeout)
    finally:
        os.close(read_end)
    if data is None:
        send(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise TimeoutError(f"no answer from child {pid} within {timeout:g}s: killed")
    os.waitpid(pid, 0)
    return data.decode("utf-8", "replace")


def _read_until_eof(fd: int, deadline: float) -> bytes | None:
    """Everything `fd` yields until its end, or None if the deadline passes first."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def exit_code_of(exc: SystemExit) -> int:
    """The code a process exits with after `exc`, as Python's own exit would pick it."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else int(ExitCode.FAILURE)


def explain_exit(status: int) -> str:
    """Words for a wait status: `exit code 3`, `killed by signal 9 (SIGKILL)`."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-code} ({name})"


def send(pid: int, signum: int, group: bool = False) -> bool:
    """Signal `pid` (with `group`, the process group it leads); False if it is gone."""
    try:
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True
