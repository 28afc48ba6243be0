"""The worker loop when Redis loses a reply: nothing settled runs again, nothing is lost.

These drive `Worker` in-process against a real redis-server, with a queue whose `take`
fails at a chosen moment: before Redis ran it, or after (the reply is lost).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.store.keys import Keys
from rqworkers.store.queue import ReliableQueue, Taken
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import Worker, WorkerSpec
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import RedisServer

HANDLED: list[bytes] = []


def record(message: bytes) -> None:
    HANDLED.append(message)


class FlakyQueue(ReliableQueue):
    """Fails the `fail_at`-th take, `after` Redis ran it (reply lost) or before."""

    def __init__(self, client: redis.Redis, fail_at: int, after: bool) -> None:
        super().__init__(client, "jobs", "node:1", keep_connection=True)
        self.takes = 0
        self.fail_at = fail_at
        self.after = after

    def take(self, *args: Any, **kwargs: Any) -> Taken:
        self.takes += 1
        if self.takes == self.fail_at and not self.after:
            raise redis.ConnectionError("connection reset before the command was sent")
        taken = super().take(*args, **kwargs)
        if self.takes == self.fail_at:
            raise redis.ConnectionError("connection reset before the reply arrived")
        return taken


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    HANDLED.clear()
    conn = redis_server.client()
    yield conn
    conn.close()


def run_worker(queue: ReliableQueue, prefetch: int, messages: int) -> Worker:
    pair = PairSettings(
        host="h", queue="jobs", handler="tests.test_worker_recovery:record", prefetch=prefetch
    )
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), None, b"", lease_ttl=30)
    worker = Worker(spec, Handler(pair.handler), queue, Scoreboard(), StopFlag())
    worker.outage.backoff = type(worker.outage.backoff)(base=0.0, cap=0.0)
    for _ in range(10 * messages):
        try:
            worker.step()
        except redis.ConnectionError as exc:
            worker.lose_track()
            worker.outage.record(exc)
        if len(HANDLED) >= messages and not worker.batch:
            break
    worker.finish()
    return worker


@pytest.mark.parametrize("after", [True, False], ids=["reply-lost", "never-sent"])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_identical_payloads_survive_a_lost_take(
    client: redis.Redis, after: bool, prefetch: int, tmp_path: Path
) -> None:
    # P, P: the second has the same bytes as the first, and is taken by the very round trip
    # that carries the first one's ack.
    client.lpush("jobs", b"P", b"P", b"X", b"Y")
    worker = run_worker(FlakyQueue(client, fail_at=2, after=after), prefetch, messages=4)
    assert sorted(HANDLED) == [b"P", b"P", b"X", b"Y"], "each once, none lost"
    assert client.llen("jobs") == 0
    assert client.llen(Keys("jobs", "node:1").processing) == 0
    assert client.zcard(Keys("jobs").retry) == 0 and client.llen(Keys("jobs").dead) == 0
    assert worker.board.in_flight() == 0
