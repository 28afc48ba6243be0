"""Being on time without polling: due retries arrive promptly, idle workers cost Redis
little, and a stop signal ends a blocking wait at once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from rqworkers.store.keys import Keys
from tests.support import APPS, REPO, RedisServer, Service, wait_for, write_config

StartService = Callable[..., Service]
HANDLER = "testapp:handle"


def starts(server: RedisServer) -> int:
    return int(server.client().llen("started"))


def test_a_due_retry_is_delivered_on_time_by_an_idle_worker(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER, "max_attempts": 2, "retry_delay": 0.3}])
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"raise")
    wait_for(lambda: starts(redis_server) == 1, what="first delivery")
    failed_at = time.monotonic()
    wait_for(lambda: starts(redis_server) == 2, timeout=5, what="the retry")
    late = time.monotonic() - failed_at - 0.3
    # Not a performance figure: the schedule itself. The old promotion tick made it ~1 s.
    assert late < 0.25, f"the retry came {late:.3f}s after it was due"


@pytest.mark.slow  # 10 to 17 s on 2 cores: with `-m slow`, for the default suite's budget
def test_an_idle_pair_costs_redis_at_most_about_one_command_a_second(
    service: StartService, redis_server: RedisServer
) -> None:
    pairs = [{"queue": f"idle{i}", "handler": HANDLER} for i in range(5)]
    svc = service(pairs)
    svc.wait_workers(5)
    client = redis_server.client()

    def commands() -> int:
        return int(client.info("stats")["total_commands_processed"])

    time.sleep(3.0)  # let start-up traffic (leases, registration, replay) pass
    before, started = commands(), time.monotonic()
    time.sleep(10.0)  # a measurement window, not a wait for a condition
    rate = (commands() - before - 1) / (time.monotonic() - started) / len(pairs)
    assert rate <= 1.0, f"{rate:.2f} commands a second per idle pair"


def test_sigterm_ends_an_idle_worker_s_blocking_wait_at_once(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER}])
    [worker] = svc.wait_workers(1)
    time.sleep(0.5)  # let it block in BLMOVE, which lasts several seconds when idle
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(10)
    assert time.monotonic() - started < 1.0, "a stop signal cuts the blocking wait short"
    # Its replacement still works, on a fresh connection.
    redis_server.client().lpush("jobs", b"after")
    wait_for(lambda: redis_server.client().lrange("done", 0, -1) == [b"after"], what="handled")


@pytest.mark.service
def test_a_full_redis_still_takes_acks_so_the_service_drains_what_it_holds(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`maxmemory` reached with `noeviction`: producers are refused, but the messages Redis
    holds are still handled and acked (an ack frees memory; the take that carries it may
    move the next message), so the queue empties instead of the workers spinning."""
    records = RedisServer(tmp_path / "records")  # the handler's own bookkeeping, not full
    records.start()
    config = write_config(
        tmp_path / "full.toml",
        redis_server.url,
        [{"queue": "jobs", "handler": HANDLER, "prefetch": 5}],
        manager={"check_interval": 0.2},
    )
    env = dict(os.environ, TESTAPP_REDIS_URL=records.url)
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
    svc = Service(config, tmp_path, env).start()
    client = redis_server.client()
    try:
        svc.wait_workers(1)
        messages = [f"sleep:0.02:{i}".encode() for i in range(100)]
        client.lpush("jobs", *messages)
        wait_for(lambda: records.client().llen("done") >= 5, what="handling under way")
        client.config_set("maxmemory", str(client.info("memory")["used_memory"]))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.lpush("jobs", b"refused")
        wait_for(lambda: records.client().llen("done") == 100, timeout=30, what="all drained")
        assert client.llen("jobs") == 0
        wait_for(
            lambda: sum(client.llen(k) for k in client.keys(Keys("jobs", "*").processing)) == 0,
            what="every ack through",
        )
        assert sorted(records.client().lrange("done", 0, -1)) == sorted(messages)
    finally:
        client.config_set("maxmemory", "0")
        svc.cleanup()
        records.stop()
