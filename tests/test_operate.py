"""Operating the service: status, dead letters, metrics and health, reload, scaling, logs.

Every command runs as the real CLI against a real redis-server and the real manager.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from rqworkers import config
from rqworkers.ops import status as status_report
from rqworkers.ops.metrics import Metrics, SlotView, health
from rqworkers.store import flow
from rqworkers.store.flow import BUSIEST, FlowState, GroupState
from rqworkers.store.keys import Keys
from rqworkers.store.queue import Snapshot
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import APPS, REPO, RedisServer, Service, free_port, wait_for, write_config

StartService = Callable[..., Service]
HANDLER = "testapp:handle"


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]))
    return subprocess.run(
        [sys.executable, "-m", "rqworkers", *args],
        input=stdin.encode(),
        capture_output=True,
        env=env,
        timeout=30,
    )


def lrange(server: RedisServer, key: str) -> list[bytes]:
    return list(server.client().lrange(key, 0, -1))


# -- status ------------------------------------------------------------------------------------


def test_status_shows_queues_and_live_workers_and_survives_an_unreachable_host(
    service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    svc = service(
        [
            {"queue": "q1", "handler": HANDLER, "processes": 2, "max_attempts": 1},
            {"queue": "q2", "handler": HANDLER},
        ],
        manager={"check_interval": 0.2, "shutdown_timeout": 5.0, "node": "node-a"},
    )
    workers = svc.wait_workers(3)
    client = redis_server.client()
    client.lpush("q1", b"raise", b"ok1", b"ok2")
    client.lpush("q2", b"sleep:30")
    wait_for(lambda: client.llen(Keys("q1").dead) == 1, what="poison dead-lettered")
    wait_for(lambda: b"sleep:30" in lrange(redis_server, "started"), what="q2 busy")

    def q2_busy() -> dict[str, object] | None:
        report = json.loads(cli("status", "-c", str(svc.config_path), "--json").stdout)
        q2 = next(r for r in report if r["queue"] == "q2")
        live = q2["snapshot"]["workers"]
        return report if live and live[0]["state"] == "busy" else None

    report = wait_for(q2_busy, timeout=10, what="status to show q2-1 busy")
    q1 = next(r for r in report if r["queue"] == "q1")
    q2 = next(r for r in report if r["queue"] == "q2")
    assert q1["snapshot"]["dead"] == 1 and q1["snapshot"]["waiting"] == 0
    assert q2["snapshot"]["in_flight"] == 1
    pids = {w.pid for w in workers}
    names = {w["name"]: w for r in report for w in r["snapshot"]["workers"]}
    assert set(names) == {"q1-1", "q1-2", "q2-1"}
    assert {w["pid"] for w in names.values()} == pids
    assert all(w["node"] == "node-a" and w["rss"] > 1_000_000 for w in names.values())
    assert names["q2-1"]["current_age"] > 0
    assert sum(int(names[n]["succeeded"]) for n in ("q1-1", "q1-2")) == 2
    assert sum(int(names[n]["failed"]) for n in ("q1-1", "q1-2")) == 1

    # A second host that is down: reported as such, the rest still shown, as a table.
    bad = write_config(
        tmp_path / "two-hosts.toml",
        redis_server.url,
        [{"queue": "q2", "handler": HANDLER},
         {"queue": "gone", "handler": HANDLER, "host": f"redis://127.0.0.1:{free_port()}/0"}],
    )  # fmt: skip
    result = cli("status", "-c", str(bad))
    text = result.stdout.decode()
    assert result.returncode == 1, "a host unreachable"
    assert cli("status", "-c", str(svc.config_path)).returncode == 0, "every host answers"
    assert "q2-1" in text and "busy" in text and "in-flight 1" in text
    assert "gone on redis://127.0.0.1:" in text and "unreachable" in text


# -- dead letters ------------------------------------------------------------------------------


def test_dead_letter_commands_on_really_dead_lettered_payloads(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER, "max_attempts": 1}])
    svc.wait_workers(1)
    client = redis_server.client()
    binary = b"raise:\x00\xff\xfebinary"
    payloads = [b"raise:first", binary, b"raise:" + b"x" * 500]
    client.lpush("jobs", *payloads)
    wait_for(lambda: client.llen(Keys("jobs").dead) == 3, what="three dead letters")
    svc.signal(signal.SIGTERM)
    assert svc.wait(20) == 0
    config = str(svc.config_path)

    listed = cli("dead", "list", "-c", config).stdout.decode()
    assert "jobs:dead: 3 message(s)" in listed
    assert "[0] 506 bytes" in listed and "[2] 11 bytes" in listed  # newest first
    assert "\\x00\\xff\\xfe" in listed, "binary shown escaped"
    assert listed.count("attempts 1") == 3 and "ValueError: boom from testapp" in listed
    assert "…" in listed, "long payloads are cut"
    assert "more (--limit" not in listed, "all three are shown"
    cut = cli("dead", "list", "--limit", "2", "-c", config).stdout.decode()
    assert "[1] " in cut and "[2] " not in cut
    assert cut.endswith("... and 1 more (--limit 3 lists them all)\n"), cut

    raw = cli("dead", "show", "1", "--raw", "-c", config)
    assert raw.returncode == 0 and raw.stdout == binary

    requeued = cli("dead", "requeue", "1", "-c", config)
    assert requeued.returncode == 0, requeued.stderr
    assert lrange(redis_server, "jobs") == [binary]
    assert client.zcard(Keys("jobs").retry) == 0, "requeued as a fresh message"
    assert client.llen(Keys("jobs").dead) == 2

    refused = cli("dead", "purge", "-c", config, stdin="n\n")
    assert refused.returncode != 0 and client.llen(Keys("jobs").dead) == 2
    purged = cli("dead", "purge", "--yes", "--limit", "1", "-c", config)
    assert purged.returncode == 0 and client.lrange(Keys("jobs").dead, 0, -1) == [payloads[2]]
    assert cli("dead", "purge", "--yes", "-c", config).returncode == 0
    assert client.llen(Keys("jobs").dead) == 0 and client.hlen(Keys("jobs").dead_reasons) == 0

    missing = cli("dead", "show", "7", "-c", config)
    assert missing.returncode == 1 and b"no dead letter at index 7" in missing.stderr


def test_requeue_all_puts_the_oldest_first_in_line(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER, "max_attempts": 1}])
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", *[f"raise:{i}".encode() for i in range(250)])
    wait_for(lambda: client.llen(Keys("jobs").dead) == 250, what="all dead")
    svc.signal(signal.SIGTERM)
    assert svc.wait(20) == 0
    assert cli("dead", "requeue", "-c", str(svc.config_path)).returncode == 0
    in_line = list(reversed(lrange(redis_server, "jobs")))  # next first
    assert in_line == [f"raise:{i}".encode() for i in range(250)]
    assert client.llen(Keys("jobs").dead) == 0 and client.hlen(Keys("jobs").dead_reasons) == 0


# -- metrics and health ------------------------------------------------------------------------


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def test_metrics_count_a_known_workload_across_recycles(
    service: StartService, redis_server: RedisServer
) -> None:
    port = free_port()
    manager = {"check_interval": 0.2, "shutdown_timeout": 5.0,
               "metrics_address": f"127.0.0.1:{port}"}  # fmt: skip
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_requests": 10, "max_attempts": 2,
          "retry_delay": 0.1}],
        manager=manager,
    )  # fmt: skip
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"raise", *[f"ok{i}".encode() for i in range(33)])
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, what="poison dead")
    wait_for(lambda: len(lrange(redis_server, "done")) == 33, what="all done")
    q = (("host", "local"), ("queue", "jobs"))

    def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        values = samples(scrape(port)[1])
        done = values.get(("rqworkers_messages_succeeded_total", q)) == 33
        return values if done and values.get(("rqworkers_queue_dead_messages", q)) == 1 else None

    values = wait_for(settled, timeout=15, what="metrics to catch up")
    assert values[("rqworkers_messages_failed_total", q)] == 2
    assert values[("rqworkers_messages_retried_total", q)] == 1
    assert values[("rqworkers_messages_dead_lettered_total", q)] == 1
    assert values[("rqworkers_handler_duration_seconds_count", q)] == 35
    recycled = values[("rqworkers_worker_recycles_total", (*q, ("reason", "max_requests")))]
    assert recycled == 3, "35 deliveries at 10 per worker: three recycles"
    assert values[("rqworkers_queue_waiting_messages", q)] == 0
    assert values[("rqworkers_manager_uptime_seconds", ())] > 0
    rss = [v for (name, _), v in values.items() if name == "rqworkers_worker_rss_bytes"]
    assert len(rss) == 1 and rss[0] > 1_000_000

    status, body = scrape(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert scrape(port, "/nope")[0] == 404


def test_metrics_show_the_pause_and_each_limit_in_use(
    service: StartService, redis_server: RedisServer
) -> None:
    """Permits in use against `max_running`, starts in the window against `rate_limit`,
    the messages held back, the pause: for the queues that have each, read from Redis by
    the keeper under its pairs' limits."""
    port = free_port()
    manager = {"check_interval": 0.2, "shutdown_timeout": 1.0, "lease_ttl": 3.0,
               "metrics_address": f"127.0.0.1:{port}"}  # fmt: skip
    limited = {"queue": "jobs", "handler": HANDLER, "concurrency": 3, "max_running": 2,
               "rate_limit": "100/m"}  # fmt: skip
    grouped = {"queue": "tenants", "handler": "testapp:measure_json", "concurrency": 2,
               "group_by": "kwargs.tenant", "group_max_running": 1}  # fmt: skip
    service([limited, {"queue": "free", "handler": HANDLER}, grouped],
            manager=manager).wait_workers(3)  # fmt: skip
    client = redis_server.client()
    client.lpush("jobs", *[f"sleep:30:{n}".encode() for n in range(5)])
    tenants = [("acme", n) for n in range(3)] + [("globex", n) for n in range(2)]
    client.lpush("tenants", *[json.dumps({"kwargs": {"tenant": t}, "seconds": 30, "n": n})
                              for t, n in tenants])  # fmt: skip
    jobs, free = (("host", "local"), ("queue", "jobs")), (("host", "local"), ("queue", "free"))

    def reading(name: str, labels: tuple[tuple[str, str], ...] = jobs) -> float | None:
        return samples(scrape(port)[1]).get((name, labels))

    wait_for(lambda: reading("rqworkers_queue_held_back_messages") == 3, timeout=15,
             what="3 of 5 messages held back by max_running 2")  # fmt: skip
    values = samples(scrape(port)[1])
    expected = {
        "rqworkers_queue_running_permits": 2,
        "rqworkers_queue_max_running": 2,
        "rqworkers_queue_rate_window_starts": 2,
        "rqworkers_queue_rate_limit_starts": 100,
        "rqworkers_queue_rate_limit_window_seconds": 60,
        "rqworkers_queue_waiting_messages": 3,
        "rqworkers_queue_paused": 0,
    }
    assert {name: values.get((name, jobs)) for name in expected} == expected
    # A queue without limits has no limit to show: no series, rather than a limit of 0.
    assert values[("rqworkers_queue_paused", free)] == 0
    assert values[("rqworkers_queue_held_back_messages", free)] == 0
    assert ("rqworkers_queue_max_running", free) not in values
    assert ("rqworkers_queue_rate_window_starts", free) not in values

    # Per group: acme runs 1 (its group_max_running) of 3, globex 1 of 2.
    def group(name: str, group: str) -> float | None:
        return reading(name, (("group", group), ("host", "local"), ("queue", "tenants")))

    wait_for(lambda: group("rqworkers_queue_group_waiting_messages", "acme") == 2, timeout=15,
             what="acme's groups in /metrics")  # fmt: skip
    assert group("rqworkers_queue_group_running_messages", "acme") == 1
    assert group("rqworkers_queue_group_waiting_messages", "globex") == 1
    assert group("rqworkers_queue_group_running_messages", "globex") == 1
    assert 0 <= (group("rqworkers_queue_group_oldest_waiting_seconds", "acme") or -1) < 30
    assert reading("rqworkers_queue_group_max_running", (("host", "local"),
                                                          ("queue", "tenants"))) == 1  # fmt: skip

    flow.pause(client, "free", by="test")
    client.lpush("free", b"held by the pause")
    wait_for(lambda: reading("rqworkers_queue_paused", free) == 1, timeout=15,
             what="the pause in /metrics")  # fmt: skip
    # The lengths are shared by one node a renewal period: the count follows within two.
    wait_for(lambda: reading("rqworkers_queue_held_back_messages", free) == 1, timeout=15,
             what="the message held back by the pause")  # fmt: skip
    flow.resume(client, "free")
    wait_for(lambda: reading("rqworkers_queue_paused", free) == 0, timeout=15,
             what="the resume in /metrics")  # fmt: skip


def test_metrics_show_the_busiest_groups_only_each_name_once() -> None:
    """A group per tenant must not make a series per tenant: the `BUSIEST` of each queue,
    never one series twice (`\\xff` is how the name of the bytes b'\\xff' reads), and no
    age where it is unknown."""
    groups = [GroupState(f"tenant-{n}", 100 - n, n % 3, 2.5 * n) for n in range(BUSIEST + 5)]
    groups[1:1] = [GroupState("\\xff", 99, 0, None), GroupState("\\xff", 98, 0, 1.0)]
    snap = Snapshot(200, 0, 0, 0, [], FlowState(groups=groups, group_max_running=3))
    plain = Snapshot(0, 0, 0, 0, [])
    collector = Metrics((), lambda: {("local", "jobs"): snap, ("local", "mail"): plain},
                        time.time(), lambda pid: 0)  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    values = samples(generate_latest(registry).decode())
    waiting = {
        dict(labels)["group"]: value
        for (name, labels), value in values.items()
        if name == "rqworkers_queue_group_waiting_messages"
    }
    assert list(waiting) == ["tenant-0", "\\xff", *[f"tenant-{n}" for n in range(1, 8)]]
    assert waiting["\\xff"] == 99 and waiting["tenant-7"] == 93
    label = (("group", "tenant-4"), ("host", "local"), ("queue", "jobs"))
    assert values[("rqworkers_queue_group_running_messages", label)] == 1
    assert values[("rqworkers_queue_group_oldest_waiting_seconds", label)] == 10.0
    unknown = (("group", "\\xff"), ("host", "local"), ("queue", "jobs"))
    assert ("rqworkers_queue_group_oldest_waiting_seconds", unknown) not in values
    jobs = (("host", "local"), ("queue", "jobs"))
    assert values[("rqworkers_queue_group_max_running", jobs)] == 3
    assert not [key for key in values if key[0].startswith("rqworkers_queue_group")
                and ("queue", "mail") in key[1]]  # fmt: skip


def consuming_board() -> Scoreboard:
    board = Scoreboard()
    board.prepare()
    board.set_pid(os.getpid())
    board.ready()
    return board


def test_healthz_is_ok_only_while_every_pair_has_a_worker_consuming() -> None:
    one, two, other = consuming_board(), consuming_board(), consuming_board()
    targets = (
        SlotView("local", "jobs", "jobs-1", one),
        SlotView("local", "jobs", "jobs-2", two),
        SlotView("local", "mail", "mail-1", other),
    )
    assert health(targets, os.getppid()) == (True, {"status": "ok", "workers": 3, "pairs": 2})

    one.waiting("Redis out of memory (maxmemory reached, nothing evictable): OOM")
    assert health(targets, os.getppid())[0], "jobs-2 still consumes for the pair"
    two.worker_ended("killed by signal 9 (SIGKILL)", "crash", time.time() + 30, bad_exits=2)
    ok, body = health(targets, os.getppid())
    assert not ok and set(body["pairs"]) == {"local/jobs"}  # type: ignore[arg-type]
    assert "jobs-1 is waiting out a Redis error: Redis out of memory" in str(body["reason"])
    assert "jobs-2 keeps failing (2 times in a row, last exit: killed by signal 9" in str(
        body["reason"]
    )
    assert "restart in 3" in str(body["reason"]) or "restart in 2" in str(body["reason"])

    one.waiting(None)
    assert health(targets, os.getppid())[0], "jobs-1 consumes again"

    other.worker_ended("max requests", "max_requests", time.time())
    assert health(targets, os.getppid())[0], "a recycle is given a moment to respawn"
    ok, body = health(targets, os.getppid(), now=time.time() + 60)
    assert not ok and "mail-1 has no worker consuming (starting, last exit: max requests)" in str(
        body["reason"]
    )
    other.prepare()
    other.set_pid(os.getpid())
    ok, body = health(targets, os.getppid(), now=time.time() + 60)
    assert not ok and "mail-1 has been in its handler's setup() for 60" in str(body["reason"])
    ok, body = health(targets, manager_pid=1)
    assert not ok and "manager 1 is gone" in str(body["reason"])


# -- reload and scaling ------------------------------------------------------------------------


def test_reload_adds_removes_and_changes_pairs_while_messages_flow(
    service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    pid_file = tmp_path / "manager.pid"
    manager = {"check_interval": 0.2, "shutdown_timeout": 10.0, "pid_file": str(pid_file)}
    svc = service(
        [{"queue": "q1", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}],
        manager=manager,
    )
    [first_q1, first_q2] = sorted(svc.wait_workers(2), key=lambda p: p.pid)
    client = redis_server.client()
    stream = [f"sleep:0.01:{i}".encode() for i in range(300)]
    client.lpush("q1", *stream)
    wait_for(lambda: len(lrange(redis_server, "done")) > 20, what="q1 flowing")

    write_config(
        svc.config_path,
        redis_server.url,
        [{"queue": "q1", "handler": HANDLER, "max_requests": 1000},
         {"queue": "q3", "handler": HANDLER}],
        manager=manager,
    )  # fmt: skip
    result = cli("reload", "-c", str(svc.config_path))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "q3-1" in svc.output() and "q2-1" in svc.output(), what="reload applied")
    wait_for(lambda: "exited: removed from the config" in svc.output(), what="q2 retired")
    wait_for(lambda: "exited: config changed" in svc.output(), what="q1 recycled")
    client.lpush("q3", b"new-pair")
    wait_for(lambda: b"new-pair" in lrange(redis_server, "done"), what="q3 handled")
    wait_for(lambda: set(stream) <= set(lrange(redis_server, "done")), timeout=30, what="no loss")
    assert not first_q1.is_running() and not first_q2.is_running()
    assert len(svc.workers()) == 2  # q1 and q3

    # An invalid file is refused; the running config stays.
    svc.config_path.write_text(svc.config_path.read_text() + "\nnot_a_section = 1\n")
    workers_before = {w.pid for w in svc.workers()}
    svc.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in svc.output(), what="refusal logged")
    assert "not_a_section" in svc.output()
    assert {w.pid for w in svc.workers()} == workers_before


def test_sigttin_and_sigttou_add_and_remove_a_process_per_pair(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "q1", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}])
    svc.wait_workers(2)
    svc.signal(signal.SIGTTIN)
    svc.wait_workers(4)
    assert "q1-2" in svc.output() and "q2-2" in svc.output()
    svc.signal(signal.SIGTTOU)
    svc.wait_workers(2)
    svc.signal(signal.SIGTTOU)  # never below one per pair
    time.sleep(0.5)  # give a wrong scale-down the time to show
    assert len(svc.workers()) == 2


# -- logs --------------------------------------------------------------------------------------


def test_json_logs_carry_worker_pid_queue_and_event(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 1}],
        logging={"format": "json", "sample_succeeded": 1.0},
    )
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"fine", b"raise")
    wait_for(lambda: '"dead_lettered"' in svc.output(), what="dead-letter line")
    entries = [json.loads(line) for line in svc.output().splitlines() if line.strip()]
    assert {"ts", "level", "worker", "pid", "queue", "event", "message"} <= set(entries[0])
    handled = [e for e in entries if e["event"] == "succeeded"]
    assert handled and handled[0]["worker"] == "jobs-1" and handled[0]["queue"] == "jobs"
    assert any(e["worker"] == "manager" and "started" in e["message"] for e in entries)


# A payload that the handler `opsapp:say` raises as its exception's message: a line break
# followed by what looks like a line of its own, and escape sequences that would set the
# terminal's title, ring its bell and clear the screen.
FORGED = "2026-01-01 00:00:00,000 INFO manager[1]: forged"
HOSTILE = f"evil\n{FORGED}\r\n[9] 3 bytes  b'forged'\x1b]0;owned\x07\x1b[2J\u202e".encode()


@pytest.mark.parametrize("format", ["text", "json"])
def test_a_message_from_user_data_cannot_forge_a_log_line(
    service: StartService, redis_server: RedisServer, format: str
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": "opsapp:say", "max_attempts": 2, "retry_delay": 0.0}],
        logging={"format": format},
    )
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", HOSTILE)
    wait_for(lambda: redis_server.client().llen(Keys("jobs").dead) == 1, what="the dead letter")
    wait_for(lambda: "dead-lettered" in svc.output(), what="its log line")
    output = svc.output()
    assert not any(line.startswith((FORGED, "[9]")) for line in output.splitlines()), output
    assert not set("\x1b\x07\r\u202e") & set(output), "no control character reaches the log"
    if format == "json":
        entries = [json.loads(line) for line in output.splitlines()]
        assert any(HOSTILE.decode() in str(e.get("exception")) for e in entries)
    else:
        assert f"  | ValueError: evil\\n{FORGED}\\r\\n[9]" in output  # one line, escaped
        assert "  | Traceback (most recent call last):" in output  # the traceback keeps its lines
        assert_one_event_per_line(output)


# A line the formatter writes: it starts with the time, the level and the process.
EVENT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.-]+\[\d+\]: ")


def assert_one_event_per_line(output: str) -> None:
    """Every line of a text log is an event of the formatter's, or marked as the rest of one."""
    for line in output.splitlines():
        assert EVENT_LINE.match(line) or line.startswith("  | "), f"{line!r} in\n{output}"


@pytest.mark.parametrize("format", ["text", "json"])
def test_no_line_of_a_traceback_can_pass_for_a_log_event(
    service: StartService, redis_server: RedisServer, format: str
) -> None:
    """A SyntaxError's file name is printed in its traceback as `  File "<name>", line 1`,
    and each line of a note as a line of its own: both used to forge whole log lines."""
    forged = f'x"\n{FORGED}\n  File "y'
    payload = json.dumps({"filename": forged, "text": "def (", "note": f"n\n{FORGED}"})
    svc = service(
        [{"queue": "jobs", "handler": "opsapp:parse", "max_attempts": 1}],
        logging={"format": format},
    )
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", payload.encode())
    wait_for(lambda: "dead-lettered" in svc.output(), what="the dead letter's log line")
    output = svc.output()
    assert "SyntaxError" in output, output
    assert not any(line.startswith(FORGED) for line in output.splitlines()), output
    if format == "json":
        entries = [json.loads(line) for line in output.splitlines()]
        assert any(FORGED in str(e.get("exception")) for e in entries)
    else:
        assert_one_event_per_line(output)
        assert f"  | {FORGED}" in output  # shown, as the rest of the event it belongs to


def test_the_log_file_rotates_and_keeps_every_process_lines(
    service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    log_file = tmp_path / "service.log"
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "processes": 2}],
        logging={
            "file": str(log_file),
            "max_bytes": 4000,
            "backup_count": 3,
            "sample_succeeded": 1.0,
        },
    )
    svc.wait_workers(2)
    # The manager checks the size once per tick, so a file may pass max_bytes by what the
    # workers write in one tick; spread the writes over several ticks.
    for batch in range(10):
        redis_server.client().lpush("jobs", *[f"m{batch}-{i}".encode() for i in range(60)])
        wait_for(lambda n=batch: len(lrange(redis_server, "done")) == 60 * (n + 1), what="batch")
        time.sleep(0.25)  # one manager tick: rotation is paced by it, not by the test
    wait_for(lambda: (tmp_path / "service.log.3").exists(), what="three rotations")
    assert not (tmp_path / "service.log.4").exists(), "backup_count is respected"
    text = "".join(p.read_text() for p in tmp_path.glob("service.log*"))
    assert "jobs-1[" in text and "jobs-2[" in text, "both workers write to the rotated file"
    assert all(p.stat().st_size < 20_000 for p in tmp_path.glob("service.log*"))


@pytest.mark.parametrize("swapped_for", ["a FIFO", "a symbolic link"])
def test_a_log_file_swapped_while_running_neither_blocks_nor_writes_elsewhere(
    service: StartService, redis_server: RedisServer, tmp_path: Path, swapped_for: str
) -> None:
    """Workers reopen the log file when its path names another file. They used to reopen it
    with a blocking open that follows links: a FIFO put there hung them for good (with
    `status` saying idle), a link made a root worker append to whatever it pointed at."""
    log_file, victim = tmp_path / "service.log", tmp_path / "victim"
    victim.write_text("precious\n")
    svc = service(
        [{"queue": "jobs", "handler": HANDLER}],
        logging={"file": str(log_file), "sample_succeeded": 1.0},
    )
    svc.wait_workers(1)
    redis_server.client().lpush("jobs", b"before")
    wait_for(lambda: "jobs-1[" in log_file.read_text(), what="the worker's line in the file")

    log_file.unlink()
    if swapped_for == "a FIFO":
        os.mkfifo(log_file)
        problem = "is a FIFO, not a regular file"
    else:
        log_file.symlink_to(victim)
        problem = "is a symbolic link: refused"
    payloads = [f"during-{i}".encode() for i in range(5)]
    for payload in payloads:  # one at a time: each is a line the worker writes
        redis_server.client().lpush("jobs", payload)
        wait_for(lambda p=payload: p in lrange(redis_server, "done"), what=f"{payload!r} handled")
    assert victim.read_text() == "precious\n", "nothing written through the link"
    refusals = [line for line in svc.output().splitlines() if problem in line]
    workers = [line for line in refusals if " jobs-1[" in line]
    assert len(workers) == 1, svc.output()  # said once, not at every line
    assert "stderr only" in workers[0] and str(log_file) in workers[0]
    assert "Traceback" not in svc.output() and "Logging error" not in svc.output()
    assert "succeeded" in svc.output().split(workers[0])[1], "its lines go on to stderr"

    log_file.unlink()  # the operator's fix: the next line opens a new file at the path
    redis_server.client().lpush("jobs", b"after")
    wait_for(lambda: log_file.is_file() and "jobs-1[" in log_file.read_text(), what="reopened")
    assert victim.read_text() == "precious\n"


@pytest.mark.service
def test_the_console_script_imports_handlers_from_the_current_directory(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "myjobs.py").write_text("def handle(message):\n    pass\n")
    path = write_config(
        tmp_path / "c.toml", redis_server.url, [{"queue": "q", "handler": "myjobs:handle"}]
    )
    script = Path(sys.executable).parent / "rqworkers"
    assert script.exists(), "the package is installed with its console script"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(script), "check", "-c", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.service
def test_an_unwritable_log_file_is_a_clear_config_error(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    path = write_config(
        tmp_path / "c.toml",
        redis_server.url,
        [{"queue": "q", "handler": HANDLER}],
        logging={"file": str(tmp_path / "missing-dir" / "x.log")},
    )
    result = cli("run", "-c", str(path))
    assert result.returncode == 2
    assert b"logging.file" in result.stderr and b"Traceback" not in result.stderr


def test_purge_all_takes_only_the_letters_there_were_when_it_started() -> None:
    import fakeredis

    from rqworkers.ops.dead import BATCH, Selection, act_on
    from rqworkers.store.queue import DeadLetter, DeadLetters

    client = fakeredis.FakeRedis()
    client.lpush(Keys("jobs").dead, *[f"old-{i:03d}".encode() for i in range(BATCH + 50)])
    dead = DeadLetters(client, "jobs")
    calls = 0

    def purge_and_meanwhile_a_new_one(letters: list[DeadLetter]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            client.lpush(Keys("jobs").dead, b"NEW-unseen")  # dead-lettered between two batches
        return dead.purge(letters)

    assert act_on(dead, Selection([], None), purge_and_meanwhile_a_new_one) == BATCH + 50
    assert client.lrange(Keys("jobs").dead, 0, -1) == [b"NEW-unseen"]


def test_dead_list_and_show_say_how_many_copies_and_show_the_traceback(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": HANDLER, "max_attempts": 1}])
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"raise", b"raise")
    wait_for(lambda: client.llen(Keys("jobs").dead) == 2, what="two dead twins")
    config = str(svc.config_path)
    listed = cli("dead", "list", "-c", config).stdout.decode()
    assert listed.count("one of 2 copies of this payload in the dead list") == 2
    shown = cli("dead", "show", "0", "-c", config).stdout.decode()
    assert "Traceback (most recent call last)" in shown and "testapp.py" in shown
    assert "one of 2 copies of this payload in the dead list" in shown
    older = cli("dead", "show", "1", "-c", config).stdout.decode()
    assert "one of 2 copies" in older and "attempts 1" in older


def test_dead_list_and_show_escape_control_characters_from_user_data(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "jobs", "handler": "opsapp:say", "max_attempts": 1}])
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", HOSTILE)
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, what="the dead letter")
    config = str(svc.config_path)
    for args in (["list"], ["show", "0"]):
        result = cli("dead", *args, "-c", config)
        assert result.returncode == 0, result
        text = result.stdout.decode()
        assert not set("\x1b\x07\r\u202e") & set(text), text
        assert not any(line.startswith(("[9]", FORGED)) for line in text.splitlines()), text
        assert f"ValueError: evil\\n{FORGED}\\r\\n[9] 3 bytes" in text, text
    # The traceback of `show` keeps its lines, each marked as the record's.
    assert f"\n  | {FORGED}\\r\n  | [9] 3 bytes" in text, text
    assert cli("dead", "show", "0", "--raw", "-c", config).stdout == HOSTILE  # bytes as they are


def test_status_escapes_what_any_redis_client_can_write_in_a_worker_entry() -> None:
    from rqworkers.ops.status import PairStatus, as_text
    from rqworkers.store.queue import Snapshot

    worker = {"name": "jobs-1\x1b[2J", "node": "n\nforged", "state": "idle",
              "waiting_for": "OOM \x1b]0;owned\x07"}  # fmt: skip
    snap = Snapshot(waiting=0, in_flight=0, retrying=0, dead=0, workers=[worker])
    text = as_text([PairStatus("redis://h/0", "jobs", snap, None)], now=0.0)
    assert "\x1b" not in text and "\x07" not in text and "\nforged" not in text, text
    assert "jobs-1\\x1b[2J" in text and "n\\nforged" in text
    text = as_text([PairStatus("redis://h/0", "jobs", None, "unreachable: \x1b[2J")])
    assert "unreachable: \\x1b[2J" in text
    numbers = {"name": "w", "state": "busy", "rss": float("inf"), "since": "yesterday",
               "current_age": float("nan"), "concurrency": 1e999, "in_flight": "many"}  # fmt: skip
    snap = Snapshot(waiting=0, in_flight=0, retrying=0, dead=0, workers=[numbers])
    text = as_text([PairStatus("redis://h/0", "jobs", snap, None)], now=0.0)
    assert "0MB" in text, "figures that are not finite numbers show as none, no crash"


@pytest.mark.parametrize("record", [b"{not json", b"42", b'"text"'])
def test_a_dead_record_that_is_not_ours_to_read_does_not_stop_a_requeue(
    record: bytes, redis_server: RedisServer
) -> None:
    """Written by hand or by something else: the letter still moves, the record is dropped."""
    import fakeredis

    from rqworkers.store.queue import DeadLetters, digest

    for client in (fakeredis.FakeRedis(), redis_server.client()):
        client.flushdb()
        client.lpush(Keys("jobs").dead, b"m", b"n")
        client.hset(Keys("jobs").dead_reasons, digest(b"m"), record)
        dead = DeadLetters(client, "jobs")
        assert [letter.payload for letter in dead.page()] == [b"n", b"m"]
        assert dead.requeue(dead.page()) == 2
        assert client.lrange("jobs", 0, -1) == [b"n", b"m"]  # the oldest, m, next in line
        assert client.llen(Keys("jobs").dead) == 0 and client.hlen(Keys("jobs").dead_reasons) == 0


def test_status_blames_a_key_of_the_wrong_type_on_its_queue_not_on_the_host(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A lasting error reply (WRONGTYPE) is this queue's problem: the other queue on the
    same Redis is still read, and the line says what Redis said, not "unreachable"."""
    path = write_config(
        tmp_path / "rqworkers.toml",
        redis_server.url,
        [{"queue": "broken", "handler": HANDLER}, {"queue": "fine", "handler": HANDLER}],
    )
    client = redis_server.client()
    client.set(Keys("broken").dead, b"not a list")
    client.lpush("fine", b"a", b"b")
    statuses = status_report.collect(config.load(path))
    assert status_report.exit_code(statuses) == 1
    report = {s.queue: s for s in statuses}
    fine = report["fine"]
    assert fine.error is None and fine.snapshot is not None and fine.snapshot.waiting == 2
    error = report["broken"].error
    assert error is not None and "WRONGTYPE" in error and "unreachable" not in error
