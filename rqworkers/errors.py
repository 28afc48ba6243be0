"""The exception tree and the exit codes that tie processes together.

Every error rqworkers raises on purpose derives from `RqworkersError`, so the CLI can turn
it into one clear line. `MessageTimeout` is the exception: it derives from `BaseException`
so that a handler's `except Exception:` cannot swallow the interruption.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class RqworkersError(Exception):
    """Root of every error rqworkers raises deliberately."""


class ConfigError(RqworkersError):
    """The configuration cannot be used. Carries every problem found, not only the first."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {p}" for p in self.problems]
        return "\n".join(lines)


class HandlerError(RqworkersError):
    """A handler path cannot be imported or does not name something callable."""


class Refused(RqworkersError):  # noqa: N818 (a verdict on a message, not a failure of ours)
    """A message that can never succeed (malformed, not allowed).

    Raised by a handler, it sends the message to the dead list at once, never retried.
    """


class Superseded(RqworkersError):  # noqa: N818 (a state, like Refused)
    """Another process has taken over this worker's private list (it replayed it since):
    two managers share a node name, or this worker outlived its replacement."""


class MessageTimeout(BaseException):
    """Raised inside a handler that ran past its `timeout`.

    A `BaseException`, like `KeyboardInterrupt`, so that user code catching `Exception`
    cannot keep a timed-out message running. `seconds` is the limit it enforced, when
    that was not the pair's `timeout` (a task message's own).
    """

    def __init__(self, seconds: float | None = None) -> None:
        super().__init__()
        self.seconds = seconds


class ReplyError(RqworkersError):
    """A task's reply could not be written (wrong type, no permission, out of memory):
    that delivery failed, and is retried or dead-lettered like any failure."""


class ExitCode(enum.IntEnum):
    """Process exit codes. The CLI's are for operators; the worker's tell the manager why."""

    OK = 0
    FAILURE = 1
    CONFIG = 2
    # Worker exits the manager understands (chosen away from shells' and Python's own).
    MAX_REQUESTS = 70
    TIMEOUT = 71
    STARTUP_FAILED = 72
    ORPHANED = 73
    REDIS_LASTING_ERROR = 74  # an error reply retrying cannot cure, e.g. WRONGTYPE on a queue key
    SUPERSEDED = 75  # another process replayed this worker id's private list since
