"""rqworkers handlers for the benches: a no-op, a 1 ms sleep and 50 ms waits, all self-timing.

The bench needs the time of the first and last handled message without adding a Redis round
trip per message (that would measure the bench, not rqworkers). So a handler keeps its
figures in memory and writes them once, in `teardown`, which rqworkers runs when the worker
is stopped with SIGTERM. Two writes happen earlier on purpose: the wall time of a process's
very first call (the respawn measurement needs it while the process is still running).

Payloads tell the handler which phase they belong to, so one service run serves both:
- `T<phase>...` throughput messages: first/last times and a count are kept per phase (one
  service run drains several pre-filled batches in turn, one phase each);
- `L<unix time>|...` latency messages: the delay from the producer's stamp to the handler's
  start is kept.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from array import array

import redis

URL_ENV = "BENCH_REDIS_URL"
FIRST_KEY = "bench:first"  # hash: pid -> wall time of the process's first call
STATS_KEY = "bench:stats:"  # + pid, hash: <phase>:first, <phase>:last, <phase>:count
LATENCY_KEY = "bench:latency:"  # + pid, string: packed doubles, seconds
_LATENCY = ord("L")


class Noop:
    """Does nothing with the message; records timings in memory only."""

    def setup(self) -> None:
        self.client = redis.Redis.from_url(os.environ[URL_ENV])
        self.pid = os.getpid()
        self.calls = 0
        self.phase = -1
        self.phases: dict[int, list[float]] = {}  # phase -> [first, last, count]
        self.current = [0.0, 0.0, 0.0]
        self.latencies = array("d")

    def _record(self, message: bytes, started: float) -> None:
        if not self.calls:
            self.client.hset(FIRST_KEY, str(self.pid), repr(started))
        self.calls += 1
        if message[0] == _LATENCY:
            self.latencies.append(started - float(message[1:18]))
            return
        if message[1] != self.phase:  # phases never interleave: one byte compare per message
            self.phase = message[1]
            self.current = self.phases.setdefault(self.phase, [started, 0.0, 0.0])
        current = self.current
        current[1] = time.time()
        current[2] += 1

    def handle(self, message: bytes) -> None:
        now = time.time()
        if self.calls and message[1] == self.phase and message[0] != _LATENCY:
            # the throughput phases' path, kept short: the yardsticks' handler does nothing
            current = self.current
            current[1] = now
            current[2] += 1
            self.calls += 1
            return
        self._record(message, now)

    def teardown(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        key = f"{STATS_KEY}{self.pid}"
        for phase, (first, last, count) in self.phases.items():
            name = chr(phase)
            pipe.hset(key, f"{name}:first", repr(first))
            pipe.hset(key, f"{name}:last", repr(last))
            pipe.hset(key, f"{name}:count", int(count))
        if self.latencies:
            pipe.set(f"{LATENCY_KEY}{self.pid}", self.latencies.tobytes())
        pipe.execute()
        self.client.close()


class Sleep1ms(Noop):
    """Sleeps 1 ms per message: a handler that does some (I/O-like) work."""

    def handle(self, message: bytes) -> None:
        started = time.time()
        time.sleep(0.001)
        self._record(message, started)


class ThreadNoop(Noop):
    """Does nothing, for `concurrency` > 1: the worker's threads share `_record`'s counters,
    which they would lose without the lock (bench/cost.py's concurrency cases)."""

    def setup(self) -> None:
        super().setup()
        self.lock = threading.Lock()

    def handle(self, message: bytes) -> None:
        started = time.time()
        with self.lock:
            self._record(message, started)


WAIT = 0.05  # seconds an I/O-bound handler waits (bench/concurrency.py)


class AsyncWait50ms(Noop):
    """Awaits 50 ms per message: an `async def` handler that waits on I/O. Its coroutines
    all run on one event loop thread, so `_record` needs no lock."""

    async def handle(self, message: bytes) -> None:  # type: ignore[override]
        started = time.time()
        await asyncio.sleep(WAIT)
        self._record(message, started)


class ThreadWait50ms(Noop):
    """Sleeps 50 ms per message in a thread of the worker's pool. `_record`'s counters are
    read-modify-writes, which threads would lose without the lock."""

    def setup(self) -> None:
        super().setup()
        self.lock = threading.Lock()

    def handle(self, message: bytes) -> None:
        started = time.time()
        time.sleep(WAIT)
        with self.lock:
            self._record(message, started)


def noop(message: bytes) -> None:
    """A bare function that does nothing: `bench/profile_worker.py` times the worker's own
    path around it, so the handler must add no time of its own."""
