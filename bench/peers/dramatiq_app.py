"""Dramatiq with its Redis broker and default middleware."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peers.common import RECORDER, URL

broker = RedisBroker(url=URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench")
def noop(payload: str) -> None:
    RECORDER.hit()
