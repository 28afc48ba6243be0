"""Small backoff strategies, after redis-py's `backoff.py`: arithmetic kept out of loops."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Seconds between two attempts while a Redis fails, at most. It bounds both sides: a dead
# Redis gets at most one connection attempt a second from each process, and a Redis that
# answers again is used again within that second (plus the attempt), however long the
# outage lasted. A longer cap would only delay recovery: a refused or failed connection
# costs the Redis next to nothing.
RETRY_CAP = 1.0


@dataclass(frozen=True)
class ExponentialBackoff:
    """`base * 2**(in_a_row - 1)` seconds after `in_a_row` failures, capped; the first `free`
    cost nothing.

    `free=1` lets the first failure retry at once (a single crash respawns immediately),
    then doubles: a worker that keeps dying is never restarted in a tight loop.
    """

    base: float
    cap: float
    free: int = 0
    jitter: float = 0.0  # fraction of the delay taken off at random, to spread herds

    def compute(self, in_a_row: int) -> float:
        """Seconds to wait after `in_a_row` consecutive failures (0 for none)."""
        paid = in_a_row - self.free
        if paid <= 0:
            return 0.0
        delay: float = min(self.cap, self.base * 2 ** min(paid - 1, 62))
        if self.jitter:  # taken off, not added: the cap stays a true upper bound
            delay -= random.uniform(0, delay * self.jitter)
        return delay
