"""The real `rqworkers run` against a real redis-server: what operators rely on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from rqworkers.client.producer import Producer
from rqworkers.store.keys import Keys
from rqworkers.store.queue import Delivery, read_private_list
from tests.support import (
    APPS,
    REPO,
    RedisServer,
    Service,
    dead_info,
    internal_tracebacks,
    wait_for,
    write_config,
)

StartService = Callable[..., Service]


@pytest.fixture(params=[1, 100], ids=["prefetch1", "prefetch100"])
def prefetch(request: pytest.FixtureRequest) -> int:
    """The key reliability tests hold one message at a time and a batch of 100 alike."""
    return int(request.param)


HANDLER = "testapp:handle"


def lrange(server: RedisServer, key: str) -> list[bytes]:
    return list(server.client().lrange(key, 0, -1))


def pids_of(server: RedisServer, key: str) -> list[int]:
    return [int(p) for p in lrange(server, f"{key}:pids")]


def wait_done(server: RedisServer, count: int, timeout: float = 20.0) -> list[bytes]:
    return wait_for(
        lambda: done if len(done := lrange(server, "done")) >= count else None,
        timeout=timeout,
        what=f"{count} messages done",
    )


def in_flight(server: RedisServer, private: str) -> list[Delivery]:
    """A private list's deliveries, oldest first."""
    return read_private_list(server.client().lrange(private, 0, -1))


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and _not_zombie(p) for p in pids)


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_every_message_of_two_queues_is_handled_exactly_once(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [{"queue": "q1", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}],
        defaults={"prefetch": prefetch},
    )
    svc.wait_workers(2)
    client = redis_server.client()
    expected = []
    for i in range(300):
        for queue in ("q1", "q2"):
            payload = f"{queue}-{i}".encode()
            client.lpush(queue, payload)
            expected.append(payload)
    done = wait_done(redis_server, len(expected))
    assert sorted(done) == sorted(expected)
    assert Counter(done).most_common(1)[0][1] == 1
    assert sorted(lrange(redis_server, "started")) == sorted(done), "nothing ran twice"
    q1_order = [p for p in done if p.startswith(b"q1-")]
    assert q1_order == [f"q1-{i}".encode() for i in range(300)], "one worker keeps FIFO order"
    # Acks follow `done` closely; Redis deletes a list once it is empty.
    wait_for(lambda: client.keys("q*:processing:*") == [], what="empty private lists")
    assert client.llen("q1") == 0 and client.llen("q2") == 0
    assert re.search(r"q1-1 \d+ started", svc.output())


@pytest.mark.service
def test_a_host_url_s_text_encoding_is_its_workers_too(
    tmp_path: Path, redis_server: RedisServer, prefetch: int
) -> None:
    """`?encoding=latin-1` in a host URL (redis-py's own query argument) and a queue named
    beyond ASCII: its keys are Latin-1 to a producer on that URL, and so to the worker's
    scripts and fast path, which take and ack what it pushed."""
    url = f"{redis_server.url}?encoding=latin-1"
    workers = [{"queue": "caf\u00e9", "handler": HANDLER}]
    manager = {"check_interval": 0.2, "shutdown_timeout": 10.0}
    path = write_config(
        tmp_path / "rqworkers.toml", url, workers, defaults={"prefetch": prefetch}, manager=manager
    )
    env = dict(os.environ, TESTAPP_REDIS_URL=redis_server.url)
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
    svc = Service(path, tmp_path, env).start()
    try:
        svc.wait_workers(1)
        Producer(url).push("caf\u00e9", b"one", b"two")
        assert sorted(wait_done(redis_server, 2)) == [b"one", b"two"]
        client = redis_server.client()
        wait_for(lambda: client.keys(b"caf\xe9:processing:*") == [], what="acks")
        assert client.keys("caf\u00e9*".encode()) == [], "no key in UTF-8"
    finally:
        svc.cleanup()


def test_odd_payloads_reach_the_handler_byte_for_byte(
    service: StartService, redis_server: RedisServer
) -> None:
    service([{"queue": "odd", "handler": HANDLER}]).wait_workers(1)
    payloads = [
        bytes(range(256)),
        b"",
        b"\x00\xff\xfe not utf-8 \xc3\x28",
        os.urandom(3 * 1024 * 1024),
    ]
    client = redis_server.client()
    for payload in payloads:
        client.lpush("odd", payload)
    assert wait_done(redis_server, len(payloads)) == payloads


def test_a_worker_killed_mid_message_has_it_replayed_after_the_respawn(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 3}], defaults={"prefetch": prefetch}
    )
    [worker] = svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"sleep:30")
    wait_for(lambda: lrange(redis_server, "started") == [b"sleep:30"], what="message started")
    private = Keys("jobs", f"{_node()}:1").processing
    assert [d.payload for d in in_flight(redis_server, private)] == [b"sleep:30"]
    worker.kill()
    wait_for(lambda: len(lrange(redis_server, "started")) == 2, what="replay after respawn")
    first, second = pids_of(redis_server, "started")
    assert first == worker.pid and second != worker.pid
    [again] = in_flight(redis_server, private)
    assert (again.payload, again.attempts) == (b"sleep:30", 1), "the crash was charged"
    assert "killed by signal 9" in svc.output()


def test_max_requests_recycles_the_worker(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_requests": 5}], defaults={"prefetch": prefetch}
    )
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", *[f"m{i}".encode() for i in range(20)])
    wait_done(redis_server, 20)
    pids = pids_of(redis_server, "done")
    assert len(set(pids)) == 4
    assert all(count == 5 for count in Counter(pids).values())
    wait_for(lambda: svc.output().count("exited: max requests") >= 4, what="recycle log lines")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"sleep:30", "exited: timeout"),  # interrupted inside the worker
        (b"swallow:30", "exited: timeout"),  # `except Exception` cannot keep it running
        (b"stuck:30", "timeout (killed"),  # signals blocked: the manager SIGKILLs it
    ],
)
def test_a_message_past_its_timeout_recycles_the_worker(
    service: StartService, redis_server: RedisServer, payload: bytes, reason: str
) -> None:
    svc = service(
        [
            {
                "queue": "jobs",
                "handler": HANDLER,
                "timeout": 1.0,
                "timeout_grace": 1.0,
                "max_attempts": 1,
            }
        ]
    )
    [worker] = svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", payload)
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, timeout=15, what="timed-out message dead")
    assert client.lrange(Keys("jobs").dead, 0, -1) == [payload]
    info = dead_info(redis_server, "jobs", payload)
    assert "timeout" in str(info["reason"])
    wait_for(lambda: reason in svc.output(), what=reason)
    [replacement] = svc.wait_workers(1)
    assert replacement.pid != worker.pid
    client.lpush("jobs", b"after")
    wait_for(lambda: b"after" in lrange(redis_server, "done"), what="the new worker to work")


def test_soft_memory_limit_lets_the_message_finish(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [
            {
                "queue": "jobs",
                "handler": HANDLER,
                "soft_memory_limit": "120MiB",
                "hard_memory_limit": "1GiB",
            }
        ],
        manager={"check_interval": 0.1, "shutdown_timeout": 10.0},
    )
    [worker] = svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"alloc:200:1.5")
    wait_for(lambda: "soft memory limit" in svc.output(), what="soft limit hit")
    wait_done(redis_server, 1)  # finished and acked despite the SIGTERM
    wait_for(
        lambda: not psutil.pid_exists(worker.pid) or not _not_zombie(worker.pid),
        what="old worker gone",
    )
    [replacement] = svc.wait_workers(1)
    assert replacement.pid != worker.pid
    assert redis_server.client().llen(Keys("jobs", f"{_node()}:1").processing) == 0
    assert lrange(redis_server, "started") == [b"alloc:200:1.5"], "not replayed"


def test_hard_memory_limit_kills_at_once_and_the_message_is_replayed_and_counted(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [
            {
                "queue": "jobs",
                "handler": HANDLER,
                "soft_memory_limit": "100MiB",
                "hard_memory_limit": "150MiB",
                "max_attempts": 2,
            }
        ],
        manager={"check_interval": 0.1, "shutdown_timeout": 10.0},
        defaults={"prefetch": prefetch},
    )
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"alloc:300:30")
    dead = Keys("jobs").dead
    wait_for(lambda: client.llen(dead) == 1, timeout=20, what="memory hog dead-lettered")
    assert len(lrange(redis_server, "started")) == 2
    assert "hard memory limit" in str(dead_info(redis_server, "jobs", b"alloc:300:30")["reason"])
    assert svc.output().count("exited: hard memory limit") == 2


def test_a_poison_message_is_dead_lettered_after_exactly_max_attempts_while_others_flow(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 3, "retry_delay": 0.2}],
        defaults={"prefetch": prefetch},
    )
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"raise", *[f"ok{i}".encode() for i in range(50)])
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, what="poison dead-lettered")
    assert lrange(redis_server, "started").count(b"raise") == 3
    info = dead_info(redis_server, "jobs", b"raise")
    assert info["attempts"] == 3 and "ValueError: boom from testapp" in str(info["reason"])
    assert len(wait_done(redis_server, 50)) == 50
    assert client.zcard(Keys("jobs").retry) == 0 and client.keys(Keys("jobs", "*").processing) == []


def test_a_message_that_kills_its_worker_ends_in_the_dead_list(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 3}], defaults={"prefetch": prefetch}
    )
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"kill", b"after")
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, timeout=20, what="killer dead-lettered")
    assert lrange(redis_server, "started").count(b"kill") == 3
    info = dead_info(redis_server, "jobs", b"kill")
    assert info["attempts"] == 3 and "signal 9" in str(info["reason"])
    wait_for(lambda: lrange(redis_server, "done") == [b"after"], what="next message handled")


def test_a_retry_keeps_its_attempt_number_across_a_worker_crash(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    """Raised (attempt 1), killed its worker (2), raised again (3 = max_attempts): dead. Had
    the crash lost the retry's count, the fourth start would have succeeded."""
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 3, "retry_delay": 0.1}],
        defaults={"prefetch": prefetch},
    )
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"steps:rkr:1", *[b"twin"] * 20)
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, timeout=30, what="dead-lettered")
    assert lrange(redis_server, "started").count(b"steps:rkr:1") == 3
    info = dead_info(redis_server, "jobs", b"steps:rkr:1")
    assert info["attempts"] == 3 and "step 3 of" in str(info["reason"])
    assert wait_done(redis_server, 20).count(b"twin") >= 20
    assert client.lrange(Keys("jobs").dead, 0, -1) == [b"steps:rkr:1"]


def test_a_queue_key_of_the_wrong_type_ends_the_worker_with_a_clear_error_not_a_wait(
    service: StartService, redis_server: RedisServer
) -> None:
    """WRONGTYPE will fail the same way every time: the worker says which key is at fault
    and exits (the manager backs the slot off), and work resumes once the key is fixed."""
    client = redis_server.client()
    client.set("jobs", b"not a list")
    svc = service([{"queue": "jobs", "handler": HANDLER}])
    wait_for(lambda: "; restarting in" in svc.output(), what="the slot backing off")
    out = svc.output()
    assert "ERROR jobs-1" in out and "redis refused an operation on jobs: " in out
    assert "WRONGTYPE" in out and "(jobs is a string, not a list); exiting" in out
    assert "exited: redis refused an operation" in out
    assert internal_tracebacks(out) == []
    client.delete("jobs")
    client.lpush("jobs", b"after")
    wait_for(lambda: lrange(redis_server, "done") == [b"after"], timeout=30, what="work resumed")


def test_class_handler_callbacks_that_raise_never_stall_the_worker(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": "testapp:Lifecycle", "max_attempts": 1}])
    [worker] = svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"a", b"raise", b"b")
    wait_for(lambda: lrange(redis_server, "done") == [b"a", b"b"], what="both handled")
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, what="failure dead-lettered")
    svc.signal(signal.SIGTERM)
    assert svc.wait(20) == 0
    events = [e.decode() for e in lrange(redis_server, "lifecycle")]
    assert events[0] == f"setup:{worker.pid}" and events[-1] == f"teardown:{worker.pid}"
    assert "success:A" in events and "success:B" in events
    assert "failure:class handler failure" in events
    assert "on_success() raised; ignored" in svc.output()


def test_manager_sigterm_finishes_in_flight_work_and_leaves_no_process(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [{"queue": "q1", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}],
        defaults={"prefetch": prefetch},
    )
    workers = svc.wait_workers(2)
    client = redis_server.client()
    client.lpush("q1", b"sleep:1.5")
    client.lpush("q2", *[f"m{i}".encode() for i in range(100)])
    wait_for(lambda: b"sleep:1.5" in lrange(redis_server, "started"), what="slow message started")
    svc.signal(signal.SIGTERM)
    assert svc.wait(20) == 0
    assert gone([w.pid for w in workers])
    done = lrange(redis_server, "done")
    assert b"sleep:1.5" in done, "the in-flight message finished before the worker exited"
    left = client.lrange("q2", 0, -1) + client.lrange(Keys("q2", f"{_node()}:1").processing, 0, -1)
    assert sorted(done + left) == sorted([b"sleep:1.5"] + [f"m{i}".encode() for i in range(100)])


def test_manager_sigkill_leaves_no_orphan_and_the_next_start_replays(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service(
        [{"queue": "q1", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}],
        defaults={"prefetch": prefetch},
    )
    workers = svc.wait_workers(2)
    redis_server.client().lpush("q1", b"sleep:1")
    wait_for(lambda: lrange(redis_server, "started") == [b"sleep:1"], what="message started")
    svc.signal(signal.SIGKILL)
    wait_for(lambda: gone([w.pid for w in workers]), timeout=5, what="workers to exit")
    svc2 = service([{"queue": "q1", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}])
    svc2.wait_workers(2)
    wait_done(redis_server, 1)
    assert redis_server.client().llen("q1") == 0


def test_a_redis_restart_mid_stream_loses_nothing(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER}], defaults={"prefetch": prefetch})
    svc.wait_workers(1)
    client = redis_server.client()
    expected = [f"m{i}".encode() for i in range(400)]
    client.lpush("jobs", *[b"sleep:0.005:" + p for p in expected])
    wait_for(lambda: len(lrange(redis_server, "done")) > 50, what="some progress")
    redis_server.stop()
    redis_server.start()  # same port and data dir: the AOF brings every key back

    def all_done() -> bool:
        return {d.rsplit(b":", 1)[1] for d in lrange(redis_server, "done")} == set(expected)

    wait_for(all_done, timeout=60, what="every message handled")
    # At-least-once: the handler's own Redis writes may have failed mid-restart, so a few
    # messages may run twice; none may be missing, and every key must drain.
    wait_for(lambda: client.llen("jobs") + client.zcard(Keys("jobs").retry) == 0, what="drained")
    output = svc.output()
    assert output.count("retrying with backoff") >= 1
    assert "is back after" in output
    assert psutil.pid_exists(svc.pid)


def test_a_worker_that_keeps_dying_at_start_backs_off_and_spares_the_others(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [
            {"queue": "bad", "handler": "testapp:FailingSetup"},
            {"queue": "good", "handler": HANDLER},
        ],
        manager={"check_interval": 0.2, "shutdown_timeout": 5.0, "restart_backoff_max": 1.0},
    )
    wait_for(lambda: svc.output().count("bad-1") >= 8, timeout=15, what="several bad restarts")
    delays = [
        float(d)
        for d in re.findall(
            r"bad-1 \d+ exited: startup failed .*restarting in ([\d.]+)s", svc.output()
        )
    ]
    assert delays[:2] == sorted(delays[:2]) and max(delays) <= 1.2, delays
    assert len(re.findall(r"bad-1 \d+ started", svc.output())) < 15, "no tight restart loop"
    redis_server.client().lpush("good", *[f"g{i}".encode() for i in range(20)])
    assert len(wait_done(redis_server, 20)) == 20
    assert psutil.pid_exists(svc.pid)


@pytest.mark.service
def test_bad_config_gives_a_clear_error_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[workers]]\nhost = "redis://127.0.0.1:1"\nqueue = "q"\nhandler = "m:f"\n'
        "max_requests = -3\nmax_request = 1\n"
    )
    result = _cli("run", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "workers[0].max_requests" in result.stderr and "workers[0].max_request" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.service
def test_bad_handler_is_reported_when_run_starts(tmp_path: Path, redis_server: RedisServer) -> None:
    path = write_config(
        tmp_path / "c.toml", redis_server.url, [{"queue": "q", "handler": "badimport:handle"}]
    )
    result = _cli("run", "--config", str(path))
    assert result.returncode == 2
    assert "badimport" in result.stderr and "cannot import" in result.stderr
    assert "Traceback" not in result.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]))
    return subprocess.run(
        [sys.executable, "-m", "rqworkers", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def _node() -> str:
    return os.environ.get("RQWORKERS_NODE") or __import__("socket").gethostname()


def test_a_crash_in_a_prefetched_batch_does_not_count_against_its_neighbours(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER, "max_attempts": 2, "prefetch": 100}])
    svc.wait_workers(1)
    client = redis_server.client()
    innocents = [f"ok{i}".encode() for i in range(50)]
    client.lpush("jobs", b"kill", *innocents)  # all fit in the first batch, `kill` first
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, timeout=20, what="killer dead-lettered")
    assert sorted(wait_done(redis_server, 50)) == sorted(innocents)
    started = lrange(redis_server, "started")
    assert started.count(b"kill") == 2
    assert all(started.count(m) == 1 for m in innocents), "each innocent ran exactly once"
    assert client.lrange(Keys("jobs").dead, 0, -1) == [b"kill"]


def test_a_poison_mid_batch_makes_the_twins_before_it_run_again_once_not_per_crash(
    service: StartService, redis_server: RedisServer
) -> None:
    """The twins finished before the crash had their acks waiting in the outbox: the first
    crash loses them (documented duplicate case 1), but the replayed batch settles them
    before it runs the charged message again, so later crashes repeat nothing."""
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 3}], defaults={"prefetch": 100}
    )
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", *[b"twin"] * 10, b"kill", *[b"twin"] * 10)
    dead = Keys("jobs").dead
    wait_for(lambda: client.llen(dead) == 1, timeout=30, what="the killer dead-lettered")
    assert wait_done(redis_server, 20).count(b"twin") >= 20
    started = lrange(redis_server, "started")
    assert started.count(b"kill") == 3
    assert started.count(b"twin") <= 30, "the first ten ran once per crash"
    assert client.llen(dead) == 1 and client.lrange(dead, 0, -1) == [b"kill"]


def test_sigterm_gives_unstarted_prefetched_messages_back_to_the_head_in_order(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER, "prefetch": 100}])
    svc.wait_workers(1)
    client = redis_server.client()
    messages = [f"sleep:0.05:{i:03d}".encode() for i in range(100)]
    client.lpush("jobs", *messages)
    wait_for(lambda: len(lrange(redis_server, "done")) >= 3, what="a few handled")
    svc.signal(signal.SIGTERM)
    assert svc.wait(20) == 0
    done = lrange(redis_server, "done")
    back = list(reversed(client.lrange("jobs", 0, -1)))  # oldest first
    assert done + back == messages, "handled ones, then the rest in their original order"
    assert client.keys(Keys("jobs", "*").processing) == []
    assert client.zcard(Keys("jobs").retry) == 0, "untried messages carry no count"
    assert "gave" in svc.output() and "unstarted message(s) back to jobs" in svc.output()


def test_a_worker_growing_after_its_soft_limit_sigterm_is_still_hard_killed(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "soft_memory_limit": "100MiB",
          "hard_memory_limit": "200MiB", "max_attempts": 1}],
        manager={"check_interval": 0.1, "shutdown_timeout": 10.0},
    )  # fmt: skip
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"grow")
    wait_for(lambda: "soft memory limit" in svc.output(), what="soft limit")
    wait_for(lambda: "exited: hard memory limit" in svc.output(), timeout=10, what="hard kill")
    dead = Keys("jobs").dead
    wait_for(lambda: redis_server.client().llen(dead) == 1, what="dead-lettered on replay")


def test_a_message_that_takes_its_whole_node_down_still_ends_in_the_dead_list(
    service: StartService, redis_server: RedisServer
) -> None:
    """A new manager does not know what its predecessor's workers had started: it counts."""
    client = redis_server.client()
    client.lpush("jobs", b"killnode")
    for life in range(3):
        svc = service([{"queue": "jobs", "handler": HANDLER, "max_attempts": 2}])
        if life < 2:
            assert svc.wait(20) != 0, "the manager died with its worker"
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, what="dead-lettered by the third life")
    assert lrange(redis_server, "started").count(b"killnode") == 2
    assert "killed by" not in str(dead_info(redis_server, "jobs", b"killnode")["reason"])


def test_a_callback_stuck_in_c_code_is_killed_like_a_stuck_handler(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": "testapp:StuckCallback", "timeout": 1.0,
          "timeout_grace": 1.0}]
    )  # fmt: skip
    [worker] = svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"m")
    wait_for(lambda: "timeout (killed" in svc.output(), timeout=10, what="hard kill")
    # The kill is logged before it lands: wait for the replacement, not the dying worker.
    wait_for(lambda: [w for w in svc.workers() if w.pid != worker.pid], what="a replacement")
