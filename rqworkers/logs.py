"""Logging set-up for the manager and its workers.

Every line names the process it came from (`manager`, `queue1-1`). The `json` format writes
one object per line (ts, level, worker, pid, queue, event, message) for log shippers.

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
    The new handlers are made before the old ones go: a log file that cannot be opened
    raises `OSError` and leaves the logging as it was.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
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
    formatter = JsonFormatter() if settings.format == "json" else logging.Formatter(FORMAT)
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
