"""Small backoff strategies, after redis-py's `backoff.py`: arithmetic kept out of loops."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ExponentialBackoff:
    """`base * 2**(failures - 1)` seconds, capped; `free` failures cost nothing.

    `free=1` lets the first failure retry at once (a single crash respawns immediately),
    then doubles: a worker that keeps dying is never restarted in a tight loop.
    """

    base: float
    cap: float
    free: int = 0
    jitter: float = 0.0  # fraction of the delay added at random, to spread herds

    def compute(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures (0 for none)."""
        paid = failures - self.free
        if paid <= 0:
            return 0.0
        delay: float = min(self.cap, self.base * 2 ** min(paid - 1, 62))
        if self.jitter:
            delay += random.uniform(0, delay * self.jitter)
        return delay
