"""Dramatiq with its Redis broker and default middleware."""

from __future__ import annotations

import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peers.common import RECORDER, URL, WAIT

broker = RedisBroker(url=URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench")
def noop(payload: str) -> None:
    RECORDER.hit()


@dramatiq.actor(queue_name="bench")
def wait50(payload: str) -> None:
    """An I/O-bound job: sleeps 50 ms on one of the worker's threads (`--threads`)."""
    started = time.time()
    time.sleep(WAIT)
    RECORDER.hit(started)
