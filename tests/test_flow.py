"""Flow control with the real service: limits hold across managers, processes and threads;
pause and resume reach every worker; permits come back when their holder dies."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.windows import most_in_window
from rqworkers.store.keys import Keys
from tests.support import (
    APPS,
    REPO,
    RedisServer,
    Service,
    process_ended,
    run_cli,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.service

StartService = Callable[..., Service]
MANAGER = {"check_interval": 0.2, "shutdown_timeout": 10.0}


def measured(**settings: Any) -> dict[str, Any]:
    return {"queue": "jobs", "handler": "testapp:measure", **settings}


def push(server: RedisServer, seconds: float, count: int) -> None:
    server.client().lpush("jobs", *[f"{seconds}:{i}".encode() for i in range(count)])


def done(server: RedisServer) -> int:
    return int(server.client().llen("done"))


def starts(server: RedisServer) -> list[float]:
    return sorted(float(x) for x in server.client().lrange("flow:starts", 0, -1))


def test_max_running_holds_across_managers_processes_and_threads(
    service: StartService, redis_server: RedisServer
) -> None:
    pair = measured(max_running=4, processes=2, concurrency=3, prefetch=10)
    for node in ("node-a", "node-b"):
        service([pair], manager={**MANAGER, "node": node}).wait_workers(2)
    push(redis_server, 0.15, 40)
    wait_for(lambda: done(redis_server) == 40, timeout=30, what="all 40 handled")
    assert int(redis_server.client().get("flow:max") or 0) == 4, "never above, and reached"
    assert redis_server.client().hvals(Keys("jobs").permits) == [], "every permit back"


def test_a_rate_limit_holds_in_every_sliding_window(
    service: StartService, redis_server: RedisServer
) -> None:
    service([measured(rate_limit="5/s", processes=2, concurrency=2, prefetch=10)],
            manager=MANAGER).wait_workers(2)  # fmt: skip
    push(redis_server, 0, 16)
    wait_for(lambda: done(redis_server) == 16, timeout=30, what="all 16 handled")
    times = starts(redis_server)
    assert most_in_window(times, 1.0) <= 5
    assert times[-1] - times[0] >= 2.9, "16 starts at 5/s take at least three windows"


def test_pause_stops_new_starts_on_every_node_and_resume_starts_them_at_once(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([measured(processes=2)], manager=MANAGER)
    svc.wait_workers(2)
    redis_server.client().lpush("jobs", b"1.0:first")
    wait_for(lambda: starts(redis_server), what="the first message running")
    paused = run_cli("pause", "jobs", "-c", str(svc.config_path))
    assert paused.returncode == 0 and "paused jobs" in paused.stdout, paused.stderr
    push(redis_server, 0, 5)
    wait_for(lambda: done(redis_server) == 1, what="the message in flight to finish")
    time.sleep(1.5)  # the claim under test: nothing starts while paused
    assert len(starts(redis_server)) == 1 and redis_server.client().llen("jobs") == 5
    status = run_cli("status", "-c", str(svc.config_path))
    assert "PAUSED by rqworkers pause" in status.stdout, status.stdout
    resumed = run_cli("resume", "jobs", "-c", str(svc.config_path))
    assert resumed.returncode == 0 and "resumed jobs" in resumed.stdout
    began = time.monotonic()
    wait_for(lambda: done(redis_server) == 6, timeout=10, what="all handled after resume")
    assert time.monotonic() - began < 1.5, "resumed at once, not at the next poll"


def test_a_permit_holder_killed_gives_its_permit_back_at_once(
    service: StartService, redis_server: RedisServer
) -> None:
    """`steps:k:` kills its worker on its first start, holding the only permit: its
    replacement gives the permit back when it starts, and the killed message is taken
    again through the limit (it does not run beside another without a permit)."""
    pair = {"queue": "jobs", "handler": "testapp:handle", "max_running": 1, "processes": 2}
    svc = service([pair], manager=MANAGER)
    svc.wait_workers(2)
    began = time.monotonic()
    redis_server.client().lpush("jobs", b"steps:k:x", b"sleep:0.2:after")
    wait_for(lambda: done(redis_server) == 2, timeout=20, what="both handled")
    assert time.monotonic() - began < 10, "within seconds, not a lease period (30 s)"
    assert redis_server.client().hvals(Keys("jobs").permits) == []


def test_a_reload_with_a_new_limit_takes_effect(
    service: StartService, redis_server: RedisServer, tmp_path: Any
) -> None:
    svc = service([measured(max_running=1, processes=1, concurrency=4)], manager=MANAGER)
    svc.wait_workers(1)
    push(redis_server, 0.3, 6)
    wait_for(lambda: done(redis_server) == 6, timeout=20, what="first six")
    assert int(redis_server.client().get("flow:max") or 0) == 1
    text = svc.config_path.read_text().replace("max_running = 1", "max_running = 3")
    svc.config_path.write_text(text)
    svc.signal(signal.SIGHUP)
    wait_for(lambda: "reload" in svc.output().lower(), what="the reload")
    redis_server.client().delete("flow:max")
    time.sleep(1.0)  # the workers restart with the new settings
    push(redis_server, 0.3, 12)
    wait_for(lambda: done(redis_server) == 18, timeout=20, what="the next twelve")
    assert int(redis_server.client().get("flow:max") or 0) == 3


def test_a_holder_frozen_past_its_lease_does_not_run_on_beside_the_next(
    service: StartService, redis_server: RedisServer
) -> None:
    """Node a freezes mid-message holding the only permit; node b reclaims the message
    and runs it; node a, woken, must end its handler rather than run beside b's."""
    fast = {**MANAGER, "lease_ttl": 1.5, "reclaim_interval": 0.3}
    pair = measured(max_running=1, timeout=60)
    node_a = service([pair], manager={**fast, "node": "node-a"})
    node_a.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"4:only")
    wait_for(lambda: client.llen("flow:pids") == 1, what="node a running it")
    node_b = service([pair], manager={**fast, "node": "node-b"})
    node_b.wait_workers(1)
    frozen = int(client.lindex("flow:pids", 0) or 0)
    node_a.signal_session(signal.SIGSTOP)
    wait_for(lambda: client.llen("flow:pids") == 2, timeout=20, what="node b running it")
    node_a.signal_session(signal.SIGCONT)
    wait_for(lambda: process_ended(frozen), timeout=5, what="the woken holder to end")
    wait_for(lambda: done(redis_server) == 1, timeout=20, what="node b's run to finish")
    time.sleep(0.5)
    assert done(redis_server) == 1, "the frozen run never finished beside it"
    assert "frozen" in node_a.output()


def tenant(name: str, seconds: float, n: int) -> bytes:
    return json.dumps({"kwargs": {"tenant": name}, "seconds": seconds, "n": n}).encode()


def test_a_small_group_is_not_held_behind_a_flood_and_each_group_keeps_its_limit(
    service: StartService, redis_server: RedisServer
) -> None:
    pair = {"queue": "jobs", "handler": "testapp:measure_json", "group_by": "kwargs.tenant",
            "group_max_running": 2, "processes": 2, "concurrency": 2}  # fmt: skip
    svc = service([pair], manager=MANAGER)
    svc.wait_workers(2)
    client = redis_server.client()
    client.lpush("jobs", *[tenant("flood", 0.2, i) for i in range(300)])
    client.lpush("jobs", *[tenant("small", 0.2, i) for i in range(4)])

    def small_done() -> bool:
        return sum(b"small" in m for m in client.lrange("done", 0, -1)) == 4

    wait_for(small_done, timeout=20, what="the small group's four")
    assert client.llen("done") < 20, "the small group did not wait for the flood's 300"
    assert int(client.get("flow:max:flood") or 0) == 2, "each group keeps to its own limit"
    status = run_cli("status", "-c", str(svc.config_path))
    assert "group flood: waiting" in status.stdout, status.stdout


def test_limits_hold_through_a_redis_restart(redis_server: RedisServer, tmp_path: Path) -> None:
    """The permits are in Redis, written with every take (append-only, fsync always):
    after a restart in mid-run the holders' counts are still there, and no worker starts
    more than `max_running` allows while theirs run. The handlers count themselves in a
    second Redis, which stays up."""
    bookkeeper = RedisServer(tmp_path / "bookkeeper")
    bookkeeper.start()
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url,
                        [measured(max_running=2, processes=2, concurrency=3)],
                        manager=MANAGER)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)]),
           "TESTAPP_REDIS_URL": bookkeeper.url}  # fmt: skip
    svc = Service(path, tmp_path, env).start()
    try:
        svc.wait_workers(2)
        push(redis_server, 0.4, 16)
        wait_for(lambda: done(bookkeeper) >= 2, timeout=20, what="a first few handled")
        redis_server.stop()
        time.sleep(0.5)
        redis_server.start()
        wait_for(lambda: done(bookkeeper) >= 16, timeout=40, what="all 16 handled")
        assert int(bookkeeper.client().get("flow:max") or 0) == 2
    finally:
        svc.cleanup()
        bookkeeper.discard()


def test_a_handlers_group_method_groups_raw_payloads(
    service: StartService, redis_server: RedisServer
) -> None:
    pair = {"queue": "jobs", "handler": "testapp:Tenants", "group_max_running": 2,
            "processes": 2, "concurrency": 2}  # fmt: skip
    service([pair], manager=MANAGER).wait_workers(2)
    client = redis_server.client()
    client.lpush("jobs", *[f"flood:0.2:{i}".encode() for i in range(200)])
    client.lpush("jobs", *[f"small:0.2:{i}".encode() for i in range(4)])

    def small_done() -> bool:
        return sum(m.startswith(b"small") for m in client.lrange("done", 0, -1)) == 4

    wait_for(small_done, timeout=20, what="the small group's four")
    assert client.llen("done") < 20, "the small group did not wait for the flood's 200"
    assert int(client.get("flow:max:flood") or 0) == 2


def test_check_refuses_group_limits_without_groups(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    pair = {"queue": "jobs", "handler": "testapp:handle", "group_max_running": 2}
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url, [pair])
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2 and "group_max_running" in result.stderr
    assert "set group_by" in result.stderr and "Traceback" not in result.stderr
