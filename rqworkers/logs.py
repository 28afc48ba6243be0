"""Logging set-up for the manager and its workers.

Every line names the process it came from (`manager`, `queue1-1`). The `json` format writes
one object per line (ts, level, worker, pid, queue, event, message) for log shippers.

Messages carry users' data (exception messages, payload previews): in the text format every
control character in them is escaped, so that one event starts one line and no message can
forge another line or drive a terminal. A traceback keeps its own lines, but each is marked
`  | ` and escaped: any of them may hold an exception's data (a SyntaxError's file name, a
note, a message), so none may look like a line of its own; a message or a note stays on one
line where it can be told apart. JSON escapes them by itself.

With a log file, only the manager rotates it: every process writes through a `LogFile`, which
reopens the file once the manager has renamed it, so several processes never rotate the same
file at once. No open of it blocks or follows a link planted there (see `LogFile`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import traceback
from typing import Any, TextIO

from rqworkers.common import files
from rqworkers.common.text import QUOTE_MARK, printable
from rqworkers.config import LoggingSettings

FORMAT = "%(asctime)s %(levelname)s %(identity)s[%(process)d]: %(message)s"


class _Identity(logging.Filter):
    def __init__(self, identity: str, queue: str | None) -> None:
        super().__init__()
        self.identity = identity
        self.queue = queue

    def filter(self, record: logging.LogRecord) -> bool:
        record.identity = self.identity
        if not hasattr(record, "queue"):
            record.queue = self.queue
        return True


class TextFormatter(logging.Formatter):
    """`FORMAT`, with users' data escaped (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the base's name
        return printable(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        """The record's line, then each line of its traceback (or stack) marked `  | ` and
        escaped: only the first line of a record starts with a timestamp, whatever a
        traceback holds (a SyntaxError's file name, a note, a message: all the exception's)."""
        first, *rest = super().format(record).split("\n")
        return "\n".join([first, *(f"{QUOTE_MARK}{printable(line)}" for line in rest)])

    def formatException(self, ei: Any) -> str:  # noqa: N802 - the base's name
        """The traceback with an exception's message or note kept on one line each, escaped,
        where that can be told apart (see `_escaped`); `format` marks every line anyway."""
        exc = ei[1]
        if not isinstance(exc, BaseException):
            return super().formatException(ei)
        chunks = traceback.TracebackException.from_exception(exc).format()
        return "".join(_escaped(chunk) for chunk in chunks).rstrip("\n")


# Chunks of `TracebackException.format()` that Python itself breaks into lines: the header,
# a stack frame (file, line, function and source line; a SyntaxError's own file name
# line too, which is why `format` must mark every line), the words between chained ones.
_TRUSTED_CHUNKS = ("Traceback (most recent call last):\n", "  File ")
_CHAINING = (
    "\nThe above exception was the direct cause of the following exception:\n\n",
    "\nDuring handling of the above exception, another exception occurred:\n\n",
)


def _escaped(chunk: str) -> str:
    """A traceback chunk with any line breaks that are not Python's own escaped: those of an
    exception's message or note (`ValueError: a\\nforged line`)."""
    if chunk.startswith(_TRUSTED_CHUNKS) or chunk in _CHAINING:
        return chunk
    body = chunk.removesuffix("\n")
    return printable(body) + chunk[len(body) :]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "worker": getattr(record, "identity", None),
            "pid": record.process,
            "queue": getattr(record, "queue", None),
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(
    settings: LoggingSettings, identity: str, rotate: bool = True, queue: str | None = None
) -> None:
    """Send every record to stderr and, if configured, the log file.

    `rotate` is True in the manager only; a worker passes False (see the module's docstring).
    The new handlers are made before the old ones go: in the manager, a log file that cannot
    be opened, or that is no regular file, raises `OSError` and leaves the logging as it
    was. A worker opens it at its first line, and writes to stderr only if it cannot.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
        if rotate:  # the manager decides, once per path, whether the path may be a link
            _FOLLOWED.setdefault(settings.file, os.path.islink(settings.file))
            log_file = LogFile(settings.file, _FOLLOWED[settings.file], settings)
            log_file.open()
        else:
            log_file = LogFile(settings.file, _FOLLOWED.get(settings.file, False))
        handlers.append(log_file)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    formatter = JsonFormatter() if settings.format == "json" else TextFormatter()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_Identity(identity, queue))
        root.addHandler(handler)
    root.setLevel(settings.level)


# Whether each log file's path was a symbolic link when the manager first opened it: then it
# is followed ever after (an operator's link to where logs go); otherwise a link found there
# later was planted, and is refused. Workers, forked from the manager, inherit the answer.
_FOLLOWED: dict[str, bool] = {}

_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT
log = logging.getLogger("rqworkers.logs")


class LogFile(logging.Handler):
    """The log file, reopened whenever the file at its path is another one: renamed away by
    the manager's rotation, removed, or swapped by someone who can write its directory.

    Every open goes through `files.open_regular`, without blocking and, unless the path was
    a link at start (`_FOLLOWED`), without following a link: a FIFO swapped in cannot hang
    the process, nor a link make it append to another file. A file refused so is said once,
    in a line that goes to stderr, which keeps every line meanwhile; the open is tried again
    when the path changes (the manager's next rotation, or the operator's fix).
    """

    def __init__(self, path: str, follow: bool, rotation: LoggingSettings | None = None) -> None:
        super().__init__()
        self.path, self.follow = path, follow
        self.max_bytes = rotation.max_bytes if rotation else 0
        self.backup_count = rotation.backup_count if rotation else 0
        self.file: TextIO | None = None
        self.seen: tuple[int, int] | None = None  # the file at `path` last opened or refused
        self.unusable: str | None = None

    def open(self) -> None:
        """Open the file at the path now, in place of any open one; `OSError` if refused."""
        if self.file is not None:
            self.file.close()
            self.file = None
        fd = files.open_regular(self.path, _LOG_FLAGS, follow=self.follow)
        info = os.fstat(fd)
        self.file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
        self.seen, self.unusable = (info.st_dev, info.st_ino), None

    def reopen_if_moved(self) -> None:
        found = self._found()
        if found is not None and found == self.seen:
            return
        try:
            self.open()
        except OSError as exc:
            self._refuse(found, str(exc))

    def _found(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path) if self.follow else os.lstat(self.path)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def _refuse(self, found: tuple[int, int] | None, why: str) -> None:
        self.seen = found
        if why != self.unusable:
            self.unusable = why  # first: the line below comes back here, and is not repeated
            log.error("log file %s: %s; its lines go to stderr only until that is fixed",
                      self.path, why)  # fmt: skip

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reopen_if_moved()
            if self.file is not None:
                self.file.write(self.format(record) + "\n")
                self.file.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def rotate_if_full(self) -> None:
        """In the manager: roll the file over (`path` to `path.1`, ... up to `backup_count`)
        once it holds `max_bytes`, measured on disk: this process cannot know what workers
        appended. Each worker then reopens the new file at its next line."""
        if self.max_bytes <= 0 or self.backup_count <= 0:
            return
        with self.lock or contextlib.nullcontext():
            try:
                info = os.stat(self.path) if self.follow else os.lstat(self.path)
                if info.st_size < self.max_bytes:
                    return
                for number in range(self.backup_count - 1, 0, -1):
                    older = f"{self.path}.{number}"
                    if os.path.lexists(older):
                        os.replace(older, f"{self.path}.{number + 1}")
                os.replace(self.path, f"{self.path}.1")
            except OSError as exc:
                self._refuse(self._found(), f"cannot rotate it: {exc}")
                return
            self.reopen_if_moved()

    def close(self) -> None:
        with self.lock or contextlib.nullcontext():
            if self.file is not None:
                self.file.close()
                self.file = None
        super().close()


def rotate_if_due() -> None:
    """Roll the log file over if workers' lines have filled it since the manager last looked."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogFile):
            handler.rotate_if_full()
