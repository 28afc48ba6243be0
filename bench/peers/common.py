"""What every peer's no-op job does: count itself, and record first and last wall times.

The count lives in the worker process, so timing adds no Redis round trip per job: the
recorder writes once, when the expected number of jobs has run. RQ's default worker forks a
child per job, where nothing survives from one job to the next; there `hit_shared` writes
per job instead, through the job's own connection, one pipelined round trip (a few percent
of what a fork costs), and the reading says so.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis

URL = os.environ.get("BENCH_REDIS_URL", "")
EXPECT = int(os.environ.get("BENCH_EXPECT", "0"))
RESULT_KEY = "bench:peer"  # hash: first, last, count
PAYLOAD_SIZE = 100
WAIT = 0.05  # seconds an I/O-bound job waits (`wait50` in each peer's app)


def payloads(n: int) -> list[str]:
    """`n` distinct 100-character payloads (text: every peer's serializer takes it)."""
    return [f"P{i:09d}".ljust(PAYLOAD_SIZE, "x") for i in range(n)]


class Recorder:
    """Per-process count of jobs run; writes `RESULT_KEY` once, at the expected count.

    Thread-safe: peers that run jobs on threads (Dramatiq, Celery's threads pool) would
    otherwise lose increments and never reach the count. An uncontended lock costs well
    under a microsecond, nothing beside a job.
    """

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.lock = threading.Lock()

    def hit(self, started: float | None = None) -> None:
        """One job done; `started` (its start, wall clock) for jobs that take time, so that
        the span runs from the first job's start, as the rqworkers handlers time it."""
        now = time.time()
        with self.lock:
            if not self.count:
                self.first = now if started is None else started
            self.count += 1
            done = self.count == EXPECT
        if done:
            client = redis.Redis.from_url(URL)
            mapping = {"first": repr(self.first), "last": repr(now), "count": EXPECT}
            client.hset(RESULT_KEY, mapping=mapping)
            client.close()


RECORDER = Recorder()


def hit_shared(client: Any) -> None:
    """One job in a process that will not see the next one (RQ's forking worker)."""
    now = repr(time.time())
    pipe = client.pipeline(transaction=False)
    pipe.hsetnx(RESULT_KEY, "first", now)
    pipe.hset(RESULT_KEY, "last", now)
    pipe.hincrby(RESULT_KEY, "count", 1)
    pipe.execute()
