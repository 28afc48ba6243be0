"""Celery with the Redis broker: late acks, no result backend, the solo pool (see bench)."""

from __future__ import annotations

from celery import Celery

from bench.peers.common import RECORDER, URL

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
