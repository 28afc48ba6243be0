"""The manager's pid file: written under a lock, and trusted by `reload` only while locked.

The file may sit in a directory that others can write, and the pid in it may be stale: a
manager killed with SIGKILL leaves its file behind, and the kernel gives its pid to another
process sooner or later. So:

- the manager never follows a symbolic link to its pid file, never writes a file with
  several hard links or another user's, nor a FIFO or a device: it refuses to start instead;
- it holds a POSIX lock (`lockf`) on the file for its whole life. Forked children do not
  inherit that lock, and the kernel drops it when the manager ends, however it ends;
- `reload` signals the pid in the file only if the file is locked (someone alive holds it),
  and the pid is a live process titled `rqworkers: manager` that has this very file open.
  Anything else is refused, and nothing is signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

import psutil

from rqworkers.common import files
from rqworkers.errors import RqworkersError

TITLE = "rqworkers: manager"  # the manager's process title, as `ps` shows it
# How long a starting manager retries a lock held for a moment by `reload`'s probe.
LOCK_PATIENCE = 0.5


class PidFileError(RqworkersError):
    """Why the pid file cannot be taken, or cannot be trusted: one line, the path included."""


def take(path: str, pid: int) -> int:
    """Open `path`, lock it and write `pid` in it; the locked descriptor, which the caller
    keeps open for as long as it runs. `PidFileError` if a running manager holds it, or if
    `path` is not a plain file of its own."""
    try:
        fd = files.open_regular(path, os.O_RDWR | os.O_CREAT, follow=False, ours=True)
    except OSError as exc:
        raise PidFileError(f"{path}: {_why(exc)}") from None
    if not _lock(fd, fcntl.LOCK_EX, LOCK_PATIENCE):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise PidFileError(
            f"{path} is locked by a running manager (pid {holder}); "
            "stop it first, or give this one another pid_file"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
    return fd


def release(path: str, fd: int) -> None:
    """Remove the file `take` wrote, unless another file has replaced it, and unlock it."""
    with contextlib.suppress(OSError):
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    os.close(fd)


def running_manager(path: str) -> int:
    """The pid of the live manager that holds `path`; `PidFileError` saying why there is
    none to signal. Never trusts the number in the file alone (see the module's docstring)."""
    try:
        fd = files.open_regular(path, os.O_RDONLY, follow=False)
    except OSError as exc:
        raise PidFileError(f"{path}: {_why(exc)}") from None
    try:
        locked = not _lock(fd, fcntl.LOCK_SH, 0.0)  # got it: no one holds it; closing frees it
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        ours = os.fstat(fd)
    finally:
        os.close(fd)
    if not locked:
        raise PidFileError(
            f"{path} is not locked: no manager holds it (one that died left it behind, pid "
            f"{text or 'none'}); nothing was signalled"
        )
    if not text.isdigit() or int(text) <= 0:
        raise PidFileError(f"{path} holds {text[:20]!r}, not a pid; nothing was signalled")
    pid = int(text)
    problem = _not_the_holder(pid, ours)
    if problem:
        raise PidFileError(f"{path}: pid {pid} {problem}; nothing was signalled")
    return pid


def _not_the_holder(pid: int, pid_file: os.stat_result) -> str | None:
    """Why `pid` is not the manager that holds the pid file, or None if it is."""
    try:
        proc = psutil.Process(pid)
        title = " ".join(proc.cmdline()).strip()
        if title != TITLE:
            return f"is not an rqworkers manager (it is {title[:60]!r})"
        held = any(_same_file(f.path, pid_file) for f in proc.open_files())
    except psutil.NoSuchProcess:
        return "is not running"
    except psutil.AccessDenied:
        return "belongs to another user: cannot tell whether it is the manager"
    except psutil.Error as exc:
        return f"cannot be inspected: {exc}"
    return None if held else "does not hold this pid file (another manager's?)"


def _same_file(path: str, pid_file: os.stat_result) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (pid_file.st_dev, pid_file.st_ino)


def _lock(fd: int, kind: int, patience: float) -> bool:
    """Take a POSIX lock on `fd` without blocking, trying again for `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        else:
            return True


def _why(exc: OSError) -> str:
    if isinstance(exc, files.NotRegularFileError):
        return str(exc)
    return f"cannot open: {exc.strerror}"
