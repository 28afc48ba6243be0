"""Logging set-up for the manager and its workers.

Every line names the process it came from (`manager`, `queue1-1`). The `json` format writes
one object per line (ts, level, worker, pid, queue, event, message) for log shippers.

Messages carry users' data (exception messages, payload previews): in the text format every
control character in them is escaped, so that one event starts one line and no message can
forge another line or drive a terminal. A traceback keeps its own lines, but each is marked
`  | ` and escaped: any of them may hold an exception's data (a SyntaxError's file name, a
note, a message), so none may look like a line of its own; a message or a note stays on one
line where it can be told apart. JSON escapes them by itself.

With a log file, only the manager rotates it: workers write through a `WatchedFileHandler`,
which reopens the file once the manager has renamed it, so several processes never rotate
the same file at once.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
import traceback
from typing import Any

from rqworkers import files
from rqworkers.config import LoggingSettings
from rqworkers.text import QUOTE_MARK, printable

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
    The new handlers are made before the old ones go: a log file that cannot be opened, or
    that is no regular file, raises `OSError` and leaves the logging as it was.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
        # Opened once without blocking first: a FIFO would hang the handler's own `open`.
        os.close(files.open_regular(settings.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
        if rotate:
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    settings.file, maxBytes=settings.max_bytes, backupCount=settings.backup_count
                )
            )
        else:
            handlers.append(logging.handlers.WatchedFileHandler(settings.file))
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


def rotate_if_due() -> None:
    """Roll the log file over if workers' lines have filled it since the manager last wrote.

    Measured on disk: the manager's own handler cannot know what workers appended.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.RotatingFileHandler) and handler.maxBytes > 0:
            try:
                full = os.path.getsize(handler.baseFilename) >= handler.maxBytes
            except OSError:
                continue
            if full:
                handler.doRollover()
