"""Being on time without polling: due retries arrive promptly, idle workers cost Redis
little, and a stop signal ends a blocking wait at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tests.support import RedisServer, Service, wait_for

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
