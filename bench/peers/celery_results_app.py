"""Celery with the Redis broker and the Redis result backend, for round trips."""

from __future__ import annotations

from typing import Any

from celery import Celery

from bench.peers.common import URL

app = Celery("bench-rt", broker=URL, backend=URL)
app.conf.update(
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    task_default_queue="bench-rt",
    result_expires=3600,
)


@app.task(acks_late=True)
def echo(value: Any) -> Any:
    return value
