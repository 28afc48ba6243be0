"""`concurrency = N`: many messages at once in one worker, every guarantee kept.

Against a real redis-server and `rqworkers run`, with `async def` handlers on one event loop
and plain handlers on a pool of threads (tests/apps/concapp.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import pytest

from rqworkers.store.keys import Keys
from rqworkers.store.queue import Delivery, read_private_list
from tests.support import APPS, REPO, RedisServer, Service, free_port, wait_for

StartService = Callable[..., Service]
KINDS = {"async": "concapp:handle_async", "threads": "concapp:handle_threads"}


def lrange(server: RedisServer, key: str) -> list[bytes]:
    return list(server.client().lrange(key, 0, -1))


def pair(kind: str, **settings: object) -> dict[str, object]:
    return {
        "queue": "jobs",
        "handler": KINDS[kind],
        "concurrency": 100,
        "prefetch": 100,
        **settings,
    }


def in_flight(server: RedisServer) -> list[Delivery]:
    client = server.client()
    return [
        delivery
        for k in client.keys(Keys("jobs", "*").processing)
        for delivery in read_private_list(client.lrange(k, 0, -1))
    ]


@pytest.mark.parametrize("kind", ["async", "threads"])
def test_a_hundred_waiting_handlers_run_at_once_in_one_process(
    service: StartService, redis_server: RedisServer, kind: str
) -> None:
    svc = service([pair(kind)])
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", *[f"sleep:0.01:warm{i}".encode() for i in range(100)])  # threads, pools
    wait_for(lambda: client.llen("done") == 100, what="warm-up")
    client.delete("done", "started")
    started = time.monotonic()
    client.lpush("jobs", *[f"sleep:0.2:{i}".encode() for i in range(200)])
    wait_for(lambda: client.llen("done") == 200, timeout=10, what="200 handled")
    elapsed = time.monotonic() - started
    # Two waves of 0.2 s; one at a time it would take 40 s. Generous for a loaded machine.
    assert elapsed < 2.0, f"200 messages of 0.2 s took {elapsed:.2f}s at concurrency 100"
    assert Counter(lrange(redis_server, "done")) == Counter(
        f"sleep:0.2:{i}".encode() for i in range(200)
    )
    assert len(svc.workers()) == 1


@pytest.mark.parametrize("kind", ["async", "threads"])
def test_sigkill_mid_batch_replays_every_in_flight_message(
    service: StartService, redis_server: RedisServer, kind: str
) -> None:
    svc = service([pair(kind, max_attempts=3)])
    [worker] = svc.wait_workers(1)
    client = redis_server.client()
    messages = [f"sleep:1:{i}".encode() for i in range(50)]
    client.lpush("jobs", *messages)
    wait_for(lambda: client.llen("started") == 50, what="50 in flight")
    worker.kill()

    def placed() -> dict[str, int]:
        """Where the messages not yet done sit, for the evidence should one go missing."""
        jobs = Keys("jobs")
        keys = ["jobs", jobs.retry, jobs.dead, *client.keys("jobs:*ing:*")]
        return {str(k): client.llen(k) if k != jobs.retry else client.zcard(k) for k in keys}

    try:
        wait_for(lambda: set(lrange(redis_server, "done")) >= set(messages), timeout=40)
    except TimeoutError:
        pytest.fail(f"not all done: {placed()}\n{svc.output()[-3000:]}")
    assert client.llen(Keys("jobs").dead) == 0
    # Each had started, so each delivery was charged: all 50 ran twice, none dead.
    assert Counter(lrange(redis_server, "started")) == Counter(messages * 2)


def test_an_async_timeout_is_cancelled_without_a_recycle(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([pair("async", timeout=0.3, max_attempts=1)])
    [worker] = svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"sleep:30", *[f"sleep:0.01:{i}".encode() for i in range(20)])
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, timeout=10, what="timed-out one dead")
    wait_for(lambda: client.llen("done") == 20, what="the others done")
    assert svc.workers() == [worker], "a cancelled coroutine needs no recycle"
    assert "timeout after 0.3s" in svc.output()


def test_a_thread_past_its_timeout_recycles_the_worker_once_the_others_finish(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([pair("threads", timeout=0.5, timeout_grace=30, max_attempts=1)])
    [worker] = svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"sleep:3", *[f"sleep:0.2:{i}".encode() for i in range(10)])
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, timeout=10, what="the slow one dead")
    wait_for(lambda: not worker.is_running(), timeout=10, what="the worker recycled")
    wait_for(lambda: client.llen("done") >= 10, timeout=10, what="the others done")
    wait_for(lambda: "exited: timeout" in svc.output(), what="the exit logged as a timeout")


def test_a_coroutine_that_blocks_the_loop_is_killed_by_the_manager(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([pair("async", timeout=0.5, timeout_grace=0.5, max_attempts=1)])
    [worker] = svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"block:30")
    wait_for(lambda: not worker.is_running(), timeout=15, what="the manager's kill")
    assert "killed" in svc.output()
    wait_for(lambda: redis_server.client().llen(Keys("jobs").dead) == 1, timeout=15, what="dead")


@pytest.mark.parametrize("kind", ["async", "threads"])
def test_sigterm_with_fifty_in_flight_loses_nothing_and_runs_nothing_twice(
    service: StartService, redis_server: RedisServer, kind: str
) -> None:
    svc = service([pair(kind)])
    svc.wait_workers(1)
    client = redis_server.client()
    messages = [f"sleep:0.5:{i}".encode() for i in range(150)]
    client.lpush("jobs", *messages)
    wait_for(lambda: client.llen("started") >= 50, what="50 in flight")
    svc.signal(signal.SIGTERM)
    assert svc.wait(20) == 0
    done = lrange(redis_server, "done")
    waiting = list(client.lrange("jobs", 0, -1))
    assert sorted(done + waiting) == sorted(messages), "each once: done or back in the queue"
    assert Counter(lrange(redis_server, "started")) == Counter(done), "nothing ran twice"
    assert in_flight(redis_server) == []


@pytest.mark.parametrize("kind", ["async", "threads"])
def test_identical_payloads_in_flight_settle_out_of_order(
    service: StartService, redis_server: RedisServer, kind: str
) -> None:
    svc = service([pair(kind, max_attempts=2, retry_delay=0.05)])
    svc.wait_workers(1)
    client = redis_server.client()
    # Twins of different durations finish in any order; a failing twin retries alone.
    client.lpush(
        "jobs", *[b"sleep:0.3", b"sleep:0.01"] * 20, *[b"raise"] * 3, *[b"sleep:0.01"] * 20
    )
    wait_for(lambda: client.llen("done") == 60, timeout=15, what="sixty twins done")
    wait_for(lambda: client.llen(Keys("jobs").dead) == 3, timeout=15, what="three dead")
    assert lrange(redis_server, "started").count(b"raise") == 6, "two deliveries each"
    wait_for(lambda: in_flight(redis_server) == [], what="everything acked")


def test_status_and_metrics_show_busy_handlers_out_of_the_concurrency(
    service: StartService, redis_server: RedisServer
) -> None:
    port = free_port()
    manager = {"check_interval": 0.2, "metrics_address": f"127.0.0.1:{port}"}
    svc = service([pair("async")], manager=manager)
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", *[f"sleep:30:{i}".encode() for i in range(30)])
    wait_for(lambda: redis_server.client().llen("started") == 30, what="30 in the handler")

    def metric() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        found = re.search(r"rqworkers_worker_in_flight_messages\{[^}]*\} (\S+)", text)
        return found.group(1) if found and float(found.group(1)) == 30 else None

    wait_for(metric, timeout=15, what="in-flight gauge at 30")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]))

    def status() -> str | None:
        result = subprocess.run(
            [sys.executable, "-m", "rqworkers", "status", "-c", str(svc.config_path)],
            capture_output=True,
            env=env,
            timeout=30,
        )
        text = result.stdout.decode()
        return text if "busy 30/100" in text else None

    wait_for(status, timeout=15, interval=0.5, what="status showing busy 30/100")


@pytest.mark.parametrize("concurrency", [1, 20])
def test_async_tasks_run_on_the_loop_of_a_task_pair(
    service: StartService, redis_server: RedisServer, concurrency: int
) -> None:
    from rqworkers import Executor

    svc = service(
        [{"queue": "tasks", "tasks": ["taskapp:*"], "concurrency": concurrency, "prefetch": 20}]
    )
    svc.wait_workers(1)
    with Executor(redis_server.url, "tasks") as executor:
        started = time.monotonic()
        futures = [executor.submit("taskapp:asleep", 0.2, f"t{i}") for i in range(20)]
        assert [f.result(timeout=30) for f in futures] == [f"t{i}" for i in range(20)]
        elapsed = time.monotonic() - started
    if concurrency > 1:  # all at once, not one after another (4 s)
        assert elapsed < 2.0, f"20 async tasks of 0.2 s took {elapsed:.2f}s"
