"""A one-second cache that lets any number of browsers share one Redis read.

Each key is computed by one thread at a time: the others that want it meanwhile wait for
that result instead of reading Redis too, so N open pages cost one read per key per
`ttl` seconds, not N.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedReads(Generic[T]):
    def __init__(self, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl  # seconds a result is served before it is read again
        self.clock = clock
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._results: dict[Hashable, tuple[float, T]] = {}
        self.reads = 0  # how many times `read` really ran: what the cost tests count

    def get(self, key: Hashable, read: Callable[[], T]) -> T:
        """The result of `read()` for `key`, at most `ttl` seconds old."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            now = self.clock()
            cached = self._results.get(key)
            if cached is not None and now - cached[0] < self.ttl:
                return cached[1]
            value = read()
            with self._lock:
                self.reads += 1
                self._drop_expired(now)
                self._results[key] = (self.clock(), value)
            return value

    def forget(self) -> None:
        """Drop every result: the next `get` reads again (after an action changed Redis)."""
        with self._lock:
            self._results.clear()

    def _drop_expired(self, now: float) -> None:
        # Keys come from requests (queue, page): keep only the fresh ones, so a client that
        # walks through every page cannot grow this without bound.
        for key in [k for k, (at, _) in self._results.items() if now - at >= self.ttl]:
            del self._results[key]
        for key in [k for k, lock in self._key_locks.items() if not lock.locked()]:
            if key not in self._results:
                del self._key_locks[key]
