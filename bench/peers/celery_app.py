"""Celery with the Redis broker: late acks, no result backend (the pool is chosen by the bench)."""

from __future__ import annotations

import time

from celery import Celery

from bench.peers.common import RECORDER, URL, WAIT

app = Celery("bench", broker=URL)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    task_default_queue="bench",
)


@app.task(acks_late=True)
def noop(payload: str) -> None:
    RECORDER.hit()


@app.task(acks_late=True)
def wait50(payload: str) -> None:
    """An I/O-bound job: sleeps 50 ms (run with `--pool threads`)."""
    started = time.time()
    time.sleep(WAIT)
    RECORDER.hit(started)
