"""Small backoff strategies, after redis-py's `backoff.py`: arithmetic kept out of loops."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

# Seconds between two attempts while a Redis fails, at most. It bounds both sides: a dead
# Redis gets at most one connection attempt a second from each process, and a Redis that
# answers again is used again within that second (plus the attempt), however long the
# outage lasted. A longer cap would only delay recovery: a refused or failed connection
# costs the Redis next to nothing.
RETRY_CAP = 1.0


@dataclass(frozen=True)
class ExponentialBackoff:
    """`base * 2**(failures - 1)` seconds, capped; `free` failures cost nothing.

    `free=1` lets the first failure retry at once (a single crash respawns immediately),
    then doubles: a worker that keeps dying is never restarted in a tight loop.
    """

    base: float
    cap: float
    free: int = 0
    jitter: float = 0.0  # fraction of the delay taken off at random, to spread herds

    def compute(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (0 for none)."""
        paid = failures - self.free
        if paid <= 0:
            return 0.0
        delay: float = min(self.cap, self.base * 2 ** min(paid - 1, 62))
        if self.jitter:  # taken off, not added: the cap stays a true upper bound
            delay -= random.uniform(0, delay * self.jitter)
        return delay


class Outage:
    """Backoff while a Redis is failing, logged once per outage rather than once per retry.

    `report`, if set, is told the cause of every failure and `None` once Redis answers
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
        self.failures = 0
        self.since = 0.0
        self.backoff = backoff or ExponentialBackoff(base=0.1, cap=RETRY_CAP, jitter=0.2)
        self.report = report

    def wait(self, exc: Exception, stopping: Callable[[], bool]) -> None:
        """Log the first failure of an outage, then sleep the next backoff step.

        The sleep is cut short as soon as `stopping()` turns true, so a stop request is
        never held up by an outage.
        """
        self.record(exc)
        deadline = time.monotonic() + self.backoff.compute(self.failures)
        while not stopping() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def record(self, exc: Exception) -> None:
        """Count a failure; the first of an outage is logged with its cause."""
        cause = describe(exc)
        if self.failures == 0:
            self.since = time.monotonic()
            log.warning("%s failed: %s; retrying with backoff", self.what, cause)
        self.failures += 1
        if self.report is not None:
            self.report(cause)

    def over(self) -> bool:
        """Call after a success; True if it ended an outage."""
        if not self.failures:
            return False
        log.info("%s is back after %.1fs", self.what, time.monotonic() - self.since)
        self.failures = 0
        if self.report is not None:
            self.report(None)
        return True


def describe(exc: Exception) -> str:
    """Name the cause of a Redis failure for an operator, in one line: refused, timed out,
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
