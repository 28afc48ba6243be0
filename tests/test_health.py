"""What operators see when things go wrong: /healthz, status, the log and process titles,
with the real `rqworkers run` against a real redis-server.

Each test breaks one thing for real (Redis stopped, a permission taken away, a setup()
that fails or hangs, a handler that exits) and checks what the service says about it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import fakeredis
import psutil
import pytest
import redis

from rqworkers.common.backoff import RETRY_CAP
from rqworkers.ops.keeper import Endpoint, Keeper, KeeperSpec
from rqworkers.store.outage import Outage, explain
from rqworkers.store.queue import Keys
from tests.support import RedisServer, Service, free_port, wait_for
from tests.test_operate import cli, lrange, scrape

StartService = Callable[..., Service]
OPS = "opsapp:handle"


def manager_with_metrics(port: int, **extra: object) -> dict[str, object]:
    return {"check_interval": 0.2, "shutdown_timeout": 5.0,
            "metrics_address": f"127.0.0.1:{port}", **extra}  # fmt: skip


def healthz(port: int) -> tuple[int, dict[str, object]]:
    """The answer of /healthz; (0, {}) while the keeper does not serve it yet."""
    try:
        code, body = scrape(port, "/healthz")
    except urllib.error.URLError:
        return 0, {}
    return code, json.loads(body)


def wait_health(port: int, code: int, timeout: float = 15.0) -> dict[str, object]:
    return wait_for(
        lambda: (r := healthz(port))[0] == code and r[1], timeout=timeout, what=f"/healthz {code}"
    )


def title(process: psutil.Process) -> str:
    return " ".join(process.cmdline()).strip()


def test_a_redis_outage_is_told_by_healthz_and_workers_resume_within_two_seconds(
    service: StartService, redis_server: RedisServer
) -> None:
    port = free_port()
    svc = service([{"queue": "jobs", "handler": OPS}], manager=manager_with_metrics(port))
    svc.wait_workers(1)
    wait_health(port, 200)

    redis_server.stop()
    body = wait_health(port, 503)
    assert "jobs-1 is waiting out a Redis error: ConnectionError" in str(body["reason"])
    assert list(body["pairs"]) == ["local/jobs"]  # type: ignore[call-overload]
    # Long enough for the old 10 s backoff cap to have been reached.
    time.sleep(8)  # the outage itself: nothing to wait on but time

    # Down until now: any lease written after this was written once Redis answered again,
    # the keeper's too if it renewed while `start` still waited for the PING.
    restarting_at = time.time()
    redis_server.start()  # returns once it answers PING
    back = time.monotonic()
    redis_server.client().lpush("jobs", b"after")
    wait_for(lambda: lrange(redis_server, "done") == [b"after"], timeout=10, what="resumed")
    resumed = time.monotonic() - back
    lease = Keys.of("jobs", svc_worker_id(svc)).lease

    def lease_renewed() -> bool:
        raw = redis_server.client().get(lease)
        return raw is not None and json.loads(raw).get("at", 0) > restarting_at

    wait_for(lease_renewed, timeout=10, what="the keeper renewing again")
    keeper_back = time.monotonic() - back
    print(f"worker resumed {resumed:.2f}s, keeper {keeper_back:.2f}s after Redis answered")
    assert resumed < 2.0, f"worker resumed {resumed:.2f}s after Redis answered"
    assert keeper_back < 2.5, f"keeper renewed {keeper_back:.2f}s after Redis answered"
    wait_health(port, 200, timeout=5)
    assert "redis at redis://127.0.0.1" in svc.output() and "is back after" in svc.output()


def svc_worker_id(svc: Service) -> str:
    node = re.search(r"starting on node (\S+)", svc.output())
    assert node is not None
    return f"{node.group(1)}:1"


def refuse_the_password(server: RedisServer) -> str:
    server.client().execute_command("ACL", "SETUSER", "app", "on", ">right", "~*", "&*", "+@all")
    return f"redis://app:wrong@127.0.0.1:{server.port}/0"


def fill_the_memory(server: RedisServer) -> str:
    client = server.client()
    client.set("filler", b"x" * 2_000_000)
    client.config_set("maxmemory", "1mb")  # the server runs with noeviction
    return server.url


@pytest.mark.parametrize(
    ("break_redis", "reason"),
    [
        (
            refuse_the_password,
            "Redis refused the credentials or a permission (AuthenticationError)",
        ),
        (fill_the_memory, "Redis out of memory (maxmemory reached, nothing evictable)"),
    ],
)
def test_healthz_names_a_redis_that_answers_but_refuses(
    service: StartService,
    redis_server: RedisServer,
    break_redis: Callable[[RedisServer], str],
    reason: str,
) -> None:
    port = free_port()
    url = break_redis(redis_server)
    service([{"queue": "jobs", "handler": OPS, "host": url}], manager=manager_with_metrics(port))
    body = wait_health(port, 503)
    wait_for(lambda: reason in str(healthz(port)[1].get("reason")), what=reason)
    assert "jobs-1 is waiting out a Redis error" in str(healthz(port)[1]["reason"]), body


@pytest.mark.slow  # 10 to 17 s on 2 cores: with `-m slow`, for the default suite's budget
def test_a_missing_permission_shows_in_status_and_healthz_with_its_reason(
    service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-evalsha")
    admin.execute_command("ACL", "SETUSER", "app", "-eval")
    port = free_port()
    url = f"redis://app:pw@127.0.0.1:{redis_server.port}/0"
    svc = service(
        [{"queue": "jobs", "handler": OPS, "host": url}], manager=manager_with_metrics(port)
    )
    svc.wait_workers(1)
    body = wait_health(port, 503)
    reason = str(body["reason"])
    waiting = "jobs-1 is waiting out a Redis error: Redis refused the credentials or a permission"
    assert waiting in reason and "(NoPermissionError)" in reason

    def waiting_in_status() -> str | None:
        result = cli("status", "-c", str(svc.config_path))
        text = result.stdout.decode()
        return text if result.returncode == 0 and "waiting out a Redis error" in text else None

    text = wait_for(waiting_in_status, timeout=15, what="status to show the wait")
    row = next(line for line in text.splitlines() if "jobs-1" in line)
    assert " waiting " in row and "NoPermissionError" in row and "evalsha" in row.lower()

    admin.execute_command("ACL", "SETUSER", "app", "+evalsha", "+eval")
    wait_health(port, 200)
    admin.lpush("jobs", b"after")
    wait_for(lambda: lrange(redis_server, "done") == [b"after"], what="consuming again")


def test_a_setup_that_fails_every_time_is_a_503_and_a_traceback(
    service: StartService, redis_server: RedisServer
) -> None:
    port = free_port()
    svc = service(
        [{"queue": "jobs", "handler": "opsapp:FailingSetup"}],
        manager=manager_with_metrics(port, restart_backoff_max=1.0),
    )
    body = wait_health(port, 503)
    wait_for(lambda: "keeps failing" in str(healthz(port)[1]), what="a crash loop")
    body = healthz(port)[1]
    assert "jobs-1 keeps failing" in str(body["reason"])
    assert "last exit: startup failed" in str(body["reason"])
    out = svc.output()
    assert "cannot start handler opsapp:FailingSetup: KeyError: 'id'" in out
    assert "Traceback (most recent call last)" in out
    assert re.search(r'opsapp\.py", line \d+, in _read_settings', out)


def test_process_titles_name_each_role(service: StartService, redis_server: RedisServer) -> None:
    svc = service([{"queue": "jobs", "handler": OPS, "processes": 2}])
    workers = svc.wait_workers(2)
    manager = psutil.Process(svc.pid)
    assert title(manager) == "rqworkers: manager"
    expected = ["rqworkers: worker jobs-1", "rqworkers: worker jobs-2"]
    wait_for(lambda: sorted(title(w) for w in workers) == expected, what="workers' titles")
    keeper = wait_for(
        lambda: [c for c in manager.children() if title(c) == "rqworkers: keeper"],
        what="the keeper's title",
    )
    assert len(keeper) == 1


def test_a_setup_that_hangs_is_ended_at_setup_timeout_and_restarted_with_backoff(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": "opsapp:HangingSetup", "setup_timeout": 0.5}],
        manager={"check_interval": 0.1, "shutdown_timeout": 30.0, "restart_backoff_max": 2.0},
    )
    pattern = r"jobs-1 \d+ exited: setup ran past setup_timeout \(0\.5s\).*restarting in (\S+)s"
    wait_for(lambda: len(re.findall(pattern, svc.output())) >= 2, timeout=20, what="two ends")
    delays = [float(d) for d in re.findall(pattern, svc.output())]
    assert delays[1] > 0, f"the second failed start is restarted with backoff: {delays}"

    # SIGTERM during setup stops it at once, despite shutdown_timeout = 30 s.
    svc.wait_workers(1)
    asked = time.monotonic()
    svc.signal(signal.SIGTERM)
    assert svc.wait(timeout=10) == 0
    assert time.monotonic() - asked < 3.0


def test_exits_in_mid_message_are_named_with_their_true_code(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": OPS, "max_attempts": 1}])
    svc.wait_workers(1)
    exits = re.compile(r"jobs-1 \d+ exited: (.*) \(succeeded")
    client = redis_server.client()
    client.lpush("jobs", b"os_exit")
    wait_for(lambda: exits.findall(svc.output()), what="the os._exit(0)")
    svc.wait_workers(1)
    client.lpush("jobs", b"sys_exit")
    wait_for(lambda: len(exits.findall(svc.output())) == 2, what="the sys.exit(0)")
    assert exits.findall(svc.output()) == ["exited mid-message (exit code 0)"] * 2
    assert "jobs-1 called sys.exit(0)" in svc.output()
    # Each message counted as delivered once, and its worker's exit is its reason.
    wait_for(lambda: len(lrange(redis_server, Keys("jobs").dead)) == 2, what="both dead-lettered")
    assert "after 1 deliveries: exited mid-message (exit code 0)" in svc.output()


# -- the pieces, without processes ---------------------------------------------------------------


def test_an_outage_reports_each_cause_then_its_end_and_retries_at_least_every_second() -> None:
    reports: list[str | None] = []
    outage = Outage("redis at test", report=reports.append)
    refused = redis.exceptions.AuthenticationError("invalid username-password pair")
    outage.record(refused)
    outage.record(redis.exceptions.OutOfMemoryError("command not allowed when used memory"))
    assert outage.over() and not outage.over()
    assert reports == [
        "Redis refused the credentials or a permission (AuthenticationError): "
        "invalid username-password pair",
        "Redis out of memory (maxmemory reached, nothing evictable): "
        "command not allowed when used memory",
        None,
    ]
    assert max(outage.backoff.compute(n) for n in range(1, 200)) <= RETRY_CAP == 1.0


def test_a_long_redis_error_is_described_on_one_line() -> None:
    error = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1.\n  Connection refused.")
    assert (
        explain(error)
        == "ConnectionError: Error 111 connecting to 127.0.0.1:1. Connection refused."
    )


def status_row(svc: Service, name: str = "jobs-1") -> str:
    text = cli("status", "-c", str(svc.config_path)).stdout.decode()
    return next((line for line in text.splitlines() if f"{name} " in line), "")


def test_status_shows_a_stopped_managers_workers_as_stopped_not_idle(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": OPS}])
    svc.wait_workers(1)
    wait_for(lambda: " idle " in status_row(svc), timeout=15, what="status to show it idle")
    svc.signal(signal.SIGTERM)
    assert svc.wait(15) == 0
    row = status_row(svc)
    assert " stopped " in row and " idle " not in row, row


@pytest.mark.slow  # 10 to 17 s on 2 cores: with `-m slow`, for the default suite's budget
def test_status_shows_a_lost_managers_workers_as_stale(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": OPS}],
        manager={"check_interval": 0.2, "lease_ttl": 12.0},  # a status every 4 s
    )
    svc.wait_workers(1)
    wait_for(lambda: " idle " in status_row(svc), timeout=15, what="status to show it idle")
    svc.signal_session(signal.SIGKILL)  # the whole node: nobody says goodbye
    row = wait_for(lambda: " stale " in (r := status_row(svc)) and r, timeout=15, what="stale")
    assert "no news from its node for" in row and " idle " not in row, row


def test_the_keeper_logs_a_lasting_error_once_and_does_not_treat_it_as_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """WRONGTYPE is not waited out: no fast retry, no outage line, one error line however
    many passes meet it; an outage is still an outage."""
    keeper = Keeper(KeeperSpec("node", os.getpid(), 6.0, 3.0, ()))
    endpoint = Endpoint("redis://127.0.0.1:1/0", fakeredis.FakeRedis(), (), Outage("test"))
    far = time.monotonic() + 3600.0
    endpoint.next_renew = endpoint.next_reclaim = far

    def wrong_type(_: Endpoint) -> None:
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")

    with caplog.at_level(logging.WARNING):
        assert not keeper.guarded(endpoint, wrong_type)
        assert not keeper.guarded(endpoint, wrong_type)
    assert [r.levelname for r in caplog.records] == ["ERROR"] and "WRONGTYPE" in caplog.text
    assert endpoint.outage.errors == 0 and endpoint.next_renew == far

    def refused(_: Endpoint) -> None:
        raise redis.ConnectionError("Connection refused")

    assert not keeper.guarded(endpoint, refused)
    assert endpoint.outage.errors == 1 and endpoint.next_renew < far
