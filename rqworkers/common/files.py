"""Opening the files an operator names (config, pid file, log file) without being tricked.

Every path here may sit in a directory that others can write. So a file is opened without
blocking (a FIFO would hang `open` until someone writes to it), then checked to be a
regular file before a byte is read or written: a FIFO, a device (`/dev/zero`) or a socket
is refused with words that say what it is.
"""

from __future__ import annotations

import os
import stat

# What each kind of file is called in a refusal, by the `S_IS*` test that finds it.
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class NotRegularFileError(OSError):
    """A path that names something other than one regular file: refused, not opened."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return self.problem


def kind(mode: int) -> str:
    """`"a FIFO"`, `"a character device"`, ... for a `st_mode`; `"a regular file"`."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


def not_regular(path: str, mode: int) -> NotRegularFileError:
    return NotRegularFileError(path, f"is {kind(mode)}, not a regular file")


def open_regular(path: str, flags: int, *, follow: bool = True, ours: bool = False) -> int:
    """A descriptor of `path`, opened with `flags` plus no blocking and close-on-exec, and
    checked to be a regular file (`NotRegularFileError` if not; the `OSError` of `open` if it
    cannot be opened). The descriptor is left blocking, as files always are.

    `follow=False` refuses a symbolic link as the last part of the path (`O_NOFOLLOW`): a
    link planted where the file should be would make us write wherever it points.
    `ours` refuses a file that another user owns, or that has several hard links (a
    planted link to a file that is not ours).
    """
    extra = os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | extra, 0o644)
    except OSError:
        found = problem(path, follow=follow)  # ELOOP for a link, ENXIO for a FIFO unread
        if found:
            raise NotRegularFileError(path, found) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise not_regular(path, info.st_mode)
        foreign = _foreign(info) if ours else None
        if foreign:
            raise NotRegularFileError(path, foreign)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, limit: int, what: str) -> bytes:
    """The bytes of the regular file `path` (symbolic links followed), at most `limit` of
    them: `NotRegularFileError` for anything else, or for a file larger than that, which
    is then no `what` ("a config file")."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise NotRegularFileError(path, f"is larger than {limit // 1024} KiB: not {what}")
    return data


def problem(path: str, *, follow: bool = True, ours: bool = False) -> str | None:
    """Why `path` cannot be a file we write, found without opening it: it exists and is not
    a regular file. `follow` and `ours` as for `open_regular`."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link: refused, it could point anywhere"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory"
    if not stat.S_ISREG(info.st_mode):
        return f"is {kind(info.st_mode)}, not a regular file"
    return _foreign(info) if ours else None


def _foreign(info: os.stat_result) -> str | None:
    """Why a file is not ours to write, or None: another user owns it, or it has several
    hard links, as a link planted in a shared directory would."""
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}): refused"
    if info.st_nlink > 1:
        return f"has {info.st_nlink} hard links: refused, it may not be ours"
    return None
