"""arq: its defaults (max_jobs 10, poll_delay 0.5 s), or `BENCH_ARQ_POLL_DELAY` and
`BENCH_ARQ_MAX_JOBS` to tune.

Run as `python -m bench.peers.arq_app`: the same as the `arq` command, with its per-job
INFO lines turned off, as every other worker in the bench runs without per-message logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from arq import run_worker
from arq.connections import RedisSettings

from bench.peers.common import RECORDER, URL, WAIT

QUEUE = "bench"


async def noop(ctx: dict[str, Any], payload: str) -> None:
    RECORDER.hit()


async def wait50(ctx: dict[str, Any], payload: str) -> None:
    """An I/O-bound job: awaits 50 ms; `max_jobs` of them run at once."""
    started = time.time()
    await asyncio.sleep(WAIT)
    RECORDER.hit(started)


class WorkerSettings:
    functions = [noop, wait50]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = RedisSettings.from_dsn(URL) if URL else RedisSettings()
    queue_name = QUEUE
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.5"))
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "10"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)  # type: ignore[arg-type]
