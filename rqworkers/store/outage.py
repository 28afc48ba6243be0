"""Which Redis errors are worth waiting out, and how to name one for an operator.

Every call to Redis may raise one of `REDIS_ERRORS`. They split in two, and every caller
acts on the split the same way:
- an *outage* (`is_outage`): the connection failed or timed out, or Redis said "not now"
  (out of memory, read-only, loading, failing over, a permission an operator can grant).
  Wait it out: back off, retry, and log once per outage (`Outage`);
- a *lasting error*: any other error reply (WRONGTYPE, a Lua runtime error). The same call
  fails the same way every time, so it is never retried: the caller reports it, naming
  what it can, and gives up that one operation.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import redis
from redis.exceptions import RedisClusterException

from rqworkers.common.backoff import RETRY_CAP, ExponentialBackoff

log = logging.getLogger(__name__)

# What a call to Redis raises when Redis (or the way to it) is at fault rather than our
# code. RedisClusterException is what a cluster client raises when no node answers.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ResponseError,
    RedisClusterException,
)

# Error replies that mean "not now" rather than "never": the server is full, read-only,
# loading, failing over, or the user lacks a permission an operator can grant.
_OUTAGE_REPLIES = ("OOM", "READONLY", "NOPERM", "TRYAGAIN", "MASTERDOWN", "LOADING", "CLUSTERDOWN")
_WRAPPED_CODE = re.compile(r": -([A-Z]+) ")
_OUTAGE_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def is_outage(exc: BaseException) -> bool:
    """True if `exc` (one of `REDIS_ERRORS`) is worth waiting out; False for a lasting
    error, an error reply that retrying cannot cure."""
    if not isinstance(exc, redis.ResponseError) or isinstance(exc, _OUTAGE_CLASSES):
        return True
    return _error_code(str(exc)) in _OUTAGE_REPLIES


def _error_code(message: str) -> str:
    """An error reply's code: its first word. Before 7.0, Redis wraps an error that a
    command inside a script returned, `ERR Error running script (call to f_...):
    @user_script:9: -OOM command not allowed ...`: there it is the word after the dash."""
    code = message.split(" ", 1)[0]
    if code == "ERR" and "Error running script" in message:
        wrapped = _WRAPPED_CODE.search(message)
        if wrapped:
            return wrapped.group(1)
    return code


def explain(exc: Exception) -> str:
    """Name the cause of a Redis error for an operator, in one line: refused, timed out,
    or Redis's reply (the clients of `connections` put TLS causes in their messages)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return f"Redis out of memory (maxmemory reached, nothing evictable): {exc}"
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.NoPermissionError):
        return f"Redis refused the credentials or a permission ({type(exc).__name__}): {exc}"
    if isinstance(exc, redis.ResponseError):
        # The class names the cause redis-py parsed out of the reply (OutOfMemoryError,
        # ReadOnlyError, NoPermissionError...), which its message may leave out.
        return f"Redis replied with an error ({type(exc).__name__}): {exc}"
    text = " ".join(str(exc).split())  # one line, whatever redis-py put in it
    return f"{type(exc).__name__}: {text}"


class Outage:
    """Backoff while a Redis is failing, logged once per outage rather than once per retry.

    `report`, if set, is told the cause of every error and `None` once Redis answers
    again: a worker passes its scoreboard's `waiting`, so that the manager, `/healthz` and
    `status` know it waits out a Redis error, and why.
    """

    def __init__(
        self,
        what: str,
        backoff: ExponentialBackoff | None = None,
        report: Callable[[str | None], None] | None = None,
    ) -> None:
        self.what = what
        self.errors = 0  # in a row, since Redis last answered
        self.since = 0.0
        self.backoff = backoff or ExponentialBackoff(base=0.1, cap=RETRY_CAP, jitter=0.2)
        self.report = report

    def wait(self, exc: Exception, stopping: Callable[[], bool]) -> None:
        """Log the first error of an outage, then sleep the next backoff step.

        The sleep is cut short as soon as `stopping()` turns true, so a stop request is
        never held up by an outage.
        """
        self.record(exc)
        deadline = time.monotonic() + self.backoff.compute(self.errors)
        while not stopping() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def record(self, exc: Exception) -> None:
        """Count an error; the first of an outage is logged with its cause."""
        cause = explain(exc)
        if self.errors == 0:
            self.since = time.monotonic()
            log.warning("%s failed: %s; retrying with backoff", self.what, cause)
        self.errors += 1
        if self.report is not None:
            self.report(cause)

    def over(self) -> bool:
        """Call after a success; True if it ended an outage."""
        if not self.errors:
            return False
        log.info("%s is back after %.1fs", self.what, time.monotonic() - self.since)
        self.errors = 0
        if self.report is not None:
            self.report(None)
        return True
