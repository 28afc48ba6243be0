"""The command line as operators use it, against a real redis-server and real processes:
where options go, what `check` finds beyond PING, and what stops `run` before it starts."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from rqworkers.common.text import a, plural
from rqworkers.config import max_processes
from rqworkers.store.keys import Keys
from tests.servers import Cluster, Processes, server_version
from tests.support import (
    APPS,
    REPO,
    RedisServer,
    Service,
    free_port,
    wait_for,
    write_config,
)

HANDLER = "testapp:handle"


@pytest.fixture
def env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]))
    env.pop("RQWORKERS_CONFIG", None)
    env.pop("RQWORKERS_LOG_LEVEL", None)
    return env


def rqworkers(
    env: dict[str, str], *args: str, stdin: int | None = subprocess.DEVNULL, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m rqworkers ARGS`, to its end; stdin is not a terminal unless given one."""
    return subprocess.run(
        [sys.executable, "-m", "rqworkers", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result


def config(tmp_path: Path, url: str, queues: list[str], **sections: Any) -> Path:
    workers = [{"queue": q, "handler": HANDLER} for q in queues]
    return write_config(tmp_path / "rqworkers.toml", url, workers, **sections)


@pytest.fixture
def services(tmp_path: Path, env: dict[str, str]) -> Iterator[list[Service]]:
    """`rqworkers run` processes a test starts; all killed by pid at teardown."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for svc in started:
            svc.cleanup()


def start(services: list[Service], path: Path, env: dict[str, str], *extra: str) -> Service:
    svc = Service(path, path.parent, dict(env, TESTAPP_REDIS_URL="")).start(*extra)
    services.append(svc)
    return svc


# -- where options go --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after", "environment", "both (the later one wins)"])
@pytest.mark.service
def test_config_option_goes_before_or_after_the_subcommand(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, where: str
) -> None:
    path = str(config(tmp_path, redis_server.url, ["jobs"]))
    args = {
        "before": ["-c", path, "check"],
        "after": ["check", "--config", path],
        "environment": ["check"],
        "both (the later one wins)": ["-c", "absent.toml", "check", "-c", path],
    }[where]
    if where == "environment":
        env["RQWORKERS_CONFIG"] = path
    result = rqworkers(env, *args)
    assert result.returncode == 0, result
    # Counts agree with their nouns.
    assert result.stdout.strip() == f"{path}: ok (1 queue, 1 host reachable)"


@pytest.mark.service
def test_a_missing_config_option_is_a_usage_error(env: dict[str, str]) -> None:
    result = rqworkers(env, "check")
    assert result.returncode == 2
    assert "-c/--config PATH is required (or set RQWORKERS_CONFIG)" in result.stderr
    no_traceback(result)


@pytest.mark.parametrize(
    ("args", "usage", "listed"),
    [
        (["dead"], "usage: rqworkers dead", ["list", "show", "requeue", "purge"]),
        (["-c", "x.toml", "dead"], "usage: rqworkers dead", ["requeue"]),
        ([], "usage: rqworkers", ["run", "check", "status", "dead", "reload"]),
    ],
)
@pytest.mark.service
def test_a_command_without_its_action_prints_its_help(
    env: dict[str, str], args: list[str], usage: str, listed: list[str]
) -> None:
    result = rqworkers(env, *args)
    assert result.returncode == 2
    assert result.stdout.startswith(usage)
    assert all(f"    {name}" in result.stdout for name in listed), result.stdout
    assert "required" not in result.stdout + result.stderr
    no_traceback(result)


@pytest.mark.parametrize(
    ("handler", "problem"),
    [("sys:maxsize", "'sys:maxsize' is an int, not"), ("math:pi", "'math:pi' is a float, not")],
)
@pytest.mark.service
def test_check_names_a_handler_that_is_not_callable_in_good_english(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, handler: str, problem: str
) -> None:
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url,
                        [{"queue": "jobs", "handler": handler}])  # fmt: skip
    result = rqworkers(env, "check", "-c", str(path))
    assert result.returncode == 2, result
    assert f"{path}: handler {handler!r} of queue 'jobs': {problem} a function or class" in (
        result.stderr
    )


def test_plural_and_article() -> None:
    assert [plural(n, "host") for n in (0, 1, 2)] == ["0 hosts", "1 host", "2 hosts"]
    assert [plural(n, "delivery") for n in (1, 3)] == ["1 delivery", "3 deliveries"]
    assert [a("int"), a("str"), a("Item"), a("zset")] == ["an int", "a str", "an Item", "a zset"]


# -- dead purge --------------------------------------------------------------------------------


@pytest.mark.service
def test_dead_purge_without_a_terminal_refuses_and_names_yes(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    path = str(config(tmp_path, redis_server.url, ["jobs"]))
    client = redis_server.client()
    client.lpush(Keys("jobs").dead, b"a", b"b")
    for stdin in (subprocess.DEVNULL, subprocess.PIPE):  # end of input, or an empty pipe
        result = rqworkers(env, "dead", "purge", "-c", path, stdin=stdin)
        assert result.returncode == 2, result
        assert "pass --yes to delete without asking" in result.stderr
        no_traceback(result)
    assert client.llen(Keys("jobs").dead) == 2
    result = rqworkers(env, "dead", "purge", "--yes", "-c", path)
    assert result.returncode == 0, result
    assert result.stdout.strip() == "deleted 2 dead letters from jobs:dead"
    assert client.llen(Keys("jobs").dead) == 0


@pytest.mark.parametrize(("answer", "left"), [(b"y\n", 0), (b"n\n", 1), (b"\x04", 1)])
@pytest.mark.service
def test_dead_purge_asks_on_a_terminal(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, answer: bytes, left: int
) -> None:
    path = str(config(tmp_path, redis_server.url, ["jobs"]))
    client = redis_server.client()
    client.lpush(Keys("jobs").dead, b"a")
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer)  # typed ahead; ^D is end of input at a terminal
        result = rqworkers(env, "dead", "purge", "-c", path, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    no_traceback(result)
    assert "delete all of 1 dead letter in jobs:dead? [y/N]" in result.stdout
    assert client.llen(Keys("jobs").dead) == left
    assert result.returncode == (0 if left == 0 else 1)
    assert ("deleted 1 dead letter from jobs:dead" in result.stdout) == (left == 0)


# -- check: more than PING ---------------------------------------------------------------------


@pytest.mark.service
def test_check_reports_queue_keys_of_the_wrong_type(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    path = str(config(tmp_path, redis_server.url, ["jobs", "mail"]))
    client = redis_server.client()
    client.set("jobs", "a string")
    client.hset(Keys("jobs").dead, "a", "hash")
    client.lpush(Keys("mail").retry, "a list")
    client.lpush("mail", "fine: a list")
    result = rqworkers(env, "check", "-c", path)
    assert result.returncode == 1, result
    prefix = f"{path}: queue 'jobs' on {redis_server.url}: "
    lines = result.stderr.splitlines()
    assert f"{prefix}key 'jobs' is a string, not a list: workers would fail on it with " \
        "WRONGTYPE; rename or delete it, or choose another queue name" in lines  # fmt: skip
    assert any(ln.startswith(f"{prefix}key 'jobs:dead' is a hash, not a list") for ln in lines)
    assert any("key 'mail:retry' is a list, not a zset" in ln for ln in lines)
    assert len(lines) == 3, result.stderr
    no_traceback(result)


def _acl_user(server: RedisServer, name: str, *rules: str) -> str:
    server.client().execute_command("ACL", "SETUSER", name, "on", ">pw", *rules)
    return f"redis://{name}:pw@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize(
    ("rules", "asked_with"),
    [
        # Without @dangerous the user may not run ACL DRYRUN: check probes instead.
        (["~jobs", "~jobs:*", "+@all", "-@dangerous", "-evalsha"], "probes"),
        (["~jobs", "~jobs:*", "+@all", "-evalsha"], "ACL DRYRUN"),
    ],
)
@pytest.mark.service
def test_check_names_a_command_the_acl_user_may_not_run(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, rules: list[str],
    asked_with: str,
) -> None:  # fmt: skip
    url = _acl_user(redis_server, "worker", *rules)
    path = str(config(tmp_path, url, ["jobs"]))
    result = rqworkers(env, "check", "-c", path)
    assert result.returncode == 1, result
    redacted = url.replace(":pw@", ":***@")
    assert result.stderr.splitlines() == [
        f"{path}: queue 'jobs' on {redacted}: the Redis user may not run EVALSHA as workers "
        "do: this user has no permissions to run the 'evalsha' command"
    ] if asked_with == "probes" else [
        f"{path}: queue 'jobs' on {redacted}: the Redis user may not run EVALSHA as workers "
        "do: This user has no permissions to run the 'evalsha' command"
    ]  # fmt: skip
    assert "pw@" not in result.stdout + result.stderr


@pytest.mark.parametrize("dangerous", ["-@dangerous", "+@dangerous"])
@pytest.mark.service
def test_check_names_keys_the_acl_user_may_not_touch(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, dangerous: str
) -> None:
    url = _acl_user(redis_server, "narrow", "~jobs", "+@all", dangerous)
    path = str(config(tmp_path, url, ["jobs"]))
    result = rqworkers(env, "check", "-c", path)
    assert result.returncode == 1, result
    assert "may not run EVALSHA" in result.stderr
    assert "no permissions to access" in result.stderr
    no_traceback(result)


@pytest.mark.parametrize("dangerous", ["-@dangerous", "+@dangerous"])
@pytest.mark.service
def test_check_names_a_user_who_may_not_touch_the_owner_key(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, dangerous: str
) -> None:
    """TAKE reads and writes `<queue>:owner:<worker-id>`: a user allowed every other key of
    the queue would wait forever at run time, so `check` names it."""
    patterns = [f"~{key.of('jobs', '*')}" for key in Keys.declared() if key is not Keys.owner]
    url = _acl_user(redis_server, "no-owner", *patterns, "+@all", dangerous)
    path = str(config(tmp_path, url, ["jobs"]))
    result = rqworkers(env, "check", "-c", path)
    assert result.returncode == 1, result
    assert "may not run EVALSHA" in result.stderr
    if dangerous == "+@dangerous":  # ACL DRYRUN names the key: `jobs:owner:<worker-id>`
        assert f"'{Keys('jobs').owner}" in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    no_traceback(result)


@pytest.mark.service
def test_check_passes_the_acl_user_readme_recommends(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    url = _acl_user(redis_server, "worker", "~jobs", "~jobs:*", "+@all", "-@dangerous")
    path = str(config(tmp_path, url, ["jobs"]))
    result = rqworkers(env, "check", "-c", path)
    assert result.returncode == 0, result
    assert redis_server.client().keys("jobs*") == [], "check wrote nothing"


@pytest.mark.service
def test_check_asks_every_node_of_a_cluster_as_workers_would(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """On a Redis Cluster the keys of a queue share one slot: the probes and ACL DRYRUN go
    where the workers' commands go, and a missing EVALSHA is named the same way."""
    if server_version() < (7, 0):
        pytest.skip("the cluster fixture needs redis-server 7.0 or later")
    started = Processes()
    try:
        cluster = Cluster(started, tmp_path / "cluster").start()
        path = write_config(tmp_path / "rqworkers.toml", cluster.url,
                            [{"queue": "{jobs}", "handler": HANDLER}])  # fmt: skip
        result = rqworkers(env, "check", "-c", str(path))
        assert result.returncode == 0, result
        # Two URLs naming different nodes of one cluster are one host: `{jobs}:dead` there
        # would take the dead letters of `{jobs}`.
        first, second = (f"redis+cluster://127.0.0.1:{node.port}" for node in cluster.nodes[:2])
        two = write_config(tmp_path / "two.toml", cluster.url, [
            {"host": first, "queue": "{jobs}", "handler": HANDLER},
            {"host": second, "queue": "{jobs}:dead", "handler": HANDLER},
        ])  # fmt: skip
        result = rqworkers(env, "check", "-c", str(two))
        assert result.returncode == 2, result
        assert "workers[1].queue: '{jobs}:dead' could be a key of queue '{jobs}'" in result.stderr
        client = cluster.client()
        client.execute_command("ACL", "SETUSER", "worker", "on", ">pw", "~{jobs}", "~{jobs}:*",
                               "+@all", "-@dangerous", "-evalsha",
                               target_nodes=client.ALL_NODES)  # fmt: skip
        user_url = cluster.url.replace("redis+cluster://", "redis+cluster://worker:pw@")
        path.write_text(path.read_text().replace(cluster.url, user_url))
        result = rqworkers(env, "check", "-c", str(path))
        assert result.returncode == 1, result
        assert "the Redis user may not run EVALSHA as workers do" in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    finally:
        started.kill_all()


@pytest.mark.service
def test_check_refuses_a_user_without_writes_even_when_it_can_only_probe(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    url = _acl_user(redis_server, "reader", "~jobs", "~jobs:*", "+@all", "-@dangerous", "-@write")
    path = str(config(tmp_path, url, ["jobs"]))
    result = rqworkers(env, "check", "-c", path)
    assert result.returncode == 1, result
    for command in ("DEL", "SET", "BLMOVE"):
        assert f"may not run {command} as workers do" in result.stderr
    assert redis_server.client().keys("jobs*") == [], "the probes changed nothing"


# -- run: start problems are reported as check reports them -----------------------------------


@pytest.mark.service
def test_run_refuses_a_metrics_address_in_use(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        manager = {"metrics_address": f"127.0.0.1:{port}", "shutdown_timeout": 5.0}
        path = str(config(tmp_path, redis_server.url, ["jobs"], manager=manager))
        result = rqworkers(env, "run", "-c", path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("rqworkers: cannot start\n")
    assert (
        f"{path}: manager.metrics_address: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ) in result.stderr
    assert " started" not in result.stderr, "no worker may start"
    no_traceback(result)


@pytest.mark.service
def test_run_refuses_a_pid_file_naming_a_directory(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    path = str(config(tmp_path, redis_server.url, ["jobs"], manager={"pid_file": str(tmp_path)}))
    result = rqworkers(env, "run", "-c", path)
    assert result.returncode == 2, result
    assert f"{path}: manager.pid_file: {str(tmp_path)!r} is a directory" in result.stderr
    no_traceback(result)


@pytest.mark.parametrize(
    ("section", "setting", "problem"),
    [
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: binding fails locally, and
        # nothing is sent anywhere.
        ("manager", {"metrics_address": "192.0.2.1:9108"},
         "manager.metrics_address: cannot listen on 192.0.2.1:9108: Cannot assign requested"),
        ("manager", {"pid_file": "{tmp}/missing-dir/rqworkers.pid"},
         "manager.pid_file: {tmp}/missing-dir/rqworkers.pid: directory '{tmp}/missing-dir' "
         "does not exist"),
        ("logging", {"file": "{tmp}/missing-dir/rqworkers.log"},
         "logging.file: {tmp}/missing-dir/rqworkers.log: directory '{tmp}/missing-dir' "
         "does not exist"),
        ("logging", {"file": "{tmp}"}, "logging.file: {tmp}: is a directory"),
    ],
)  # fmt: skip
@pytest.mark.service
def test_check_refuses_what_run_would_refuse_at_start_and_run_says_the_same(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, section: str,
    setting: dict[str, str], problem: str,
) -> None:  # fmt: skip
    values = {k: v.format(tmp=tmp_path) for k, v in setting.items()}
    path = str(config(tmp_path, redis_server.url, ["jobs"], **{section: values}))
    for command in ("check", "run"):
        result = rqworkers(env, command, "-c", path)
        assert result.returncode == 2, result
        assert f"{path}: {problem.format(tmp=tmp_path)}" in result.stderr
        no_traceback(result)


@pytest.mark.service
def test_check_and_run_refuse_more_processes_than_the_machine_runs_usefully(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    ceiling = max_processes()
    workers = [{"queue": "jobs", "handler": HANDLER, "processes": ceiling + 1}]
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url, workers)
    for command in ("check", "run"):
        result = rqworkers(env, command, "-c", str(path))
        assert result.returncode == 2, result
        assert (
            f"{path}: workers: queue 'jobs' on {redis_server.url}: processes = {ceiling + 1} is "
            f"more than this machine can run usefully (at most {ceiling}: 32 per CPU core)"
        ) in result.stderr
        no_traceback(result)
    # `status` reads the same file from any machine, and does not refuse it.
    assert rqworkers(env, "status", "-c", str(path)).returncode == 0


def test_check_passes_a_metrics_port_held_by_the_running_manager(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    """`check` is run next to a live manager: the port that manager holds is no problem."""
    manager = {"metrics_address": f"127.0.0.1:{free_port()}", "check_interval": 0.2,
               "pid_file": str(tmp_path / "rqworkers.pid")}  # fmt: skip
    path = config(tmp_path, redis_server.url, ["jobs"], manager=manager)
    svc = start(services, path, env)
    svc.wait_workers(1)
    wait_for(lambda: "serving /metrics" in svc.output(), what="the keeper serving metrics")
    result = rqworkers(env, "check", "-c", str(path))
    assert result.returncode == 0, result


def test_a_second_manager_with_the_same_pid_file_refuses_and_leaves_it_alone(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    pid_file = tmp_path / "rqworkers.pid"
    manager = {"pid_file": str(pid_file), "check_interval": 0.2, "shutdown_timeout": 10.0}
    path = config(tmp_path, redis_server.url, ["jobs"], manager=manager)
    first = start(services, path, env)
    first.wait_workers(1)
    assert pid_file.read_text() == f"{first.pid}\n"

    second = rqworkers(env, "run", "-c", str(path), timeout=30)
    assert second.returncode == 2, second
    assert (
        f"{path}: manager.pid_file: {pid_file} is locked by a running manager "
        f"(pid {first.pid}); stop it first, or give this one another pid_file"
    ) in second.stderr
    no_traceback(second)
    assert pid_file.read_text() == f"{first.pid}\n", "the file is left alone"

    # `reload` still reaches the first manager, and only it.
    assert rqworkers(env, "reload", "-c", str(path)).returncode == 0
    wait_for(lambda: "SIGHUP received" in first.output(), what="the first manager reloading")

    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    assert not pid_file.exists(), "removed by the manager that held it"


def test_a_stale_pid_file_is_taken_over(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    pid_file = tmp_path / "rqworkers.pid"
    pid_file.write_text("999999999\n")  # a manager that died without removing it
    manager = {"pid_file": str(pid_file), "check_interval": 0.2, "shutdown_timeout": 10.0}
    svc = start(services, config(tmp_path, redis_server.url, ["jobs"], manager=manager), env)
    svc.wait_workers(1)
    assert pid_file.read_text() == f"{svc.pid}\n"


def test_run_log_level_overrides_the_config_and_survives_a_reload(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    manager = {"check_interval": 0.2, "shutdown_timeout": 10.0}
    path = config(
        tmp_path, redis_server.url, ["jobs"], manager=manager, logging={"level": "WARNING"}
    )
    svc = start(services, path, env, "--log-level", "info")
    svc.wait_workers(1)  # found by the INFO lines `<name> <pid> started`
    svc.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP received" in svc.output(), what="reload")
    svc.signal(signal.SIGTTIN)  # logged at INFO once the reload has applied the level again
    wait_for(lambda: "SIGTTIN: +1 process" in svc.output(), what="an INFO line after reload")
    svc.wait_workers(2)


@pytest.mark.service
def test_run_log_level_is_checked(tmp_path: Path, env: dict[str, str]) -> None:
    result = rqworkers(env, "run", "--log-level", "LOUD", "-c", str(tmp_path / "x.toml"))
    assert result.returncode == 2
    assert "invalid choice: 'LOUD'" in result.stderr


# -- The dead-letter walkthrough of docs/operating.md, as written, with config/rqworkers.toml ---

_STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ")


def _walkthrough() -> list[tuple[str, list[str]]]:
    """The commands of the dead-letter walkthrough (docs/operating.md), each with the output
    it shows."""
    text = (REPO / "docs" / "operating.md").read_text()
    block = text.split("## Dead letters\n", 1)[1].split("```\n")[1]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def test_the_dead_letter_walkthrough_of_the_docs_works_as_written(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("the walkthrough pushes with redis-cli")
    (tmp_path / "config").symlink_to(REPO / "config")
    env.update(
        REDIS_URL=redis_server.url,
        RQWORKERS_METRICS=f"127.0.0.1:{free_port()}",
        RQWORKERS_PID_FILE=str(tmp_path / "rqworkers.pid"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
    )
    svc = Service(tmp_path / "config" / "rqworkers.toml", tmp_path, env).start()
    services.append(svc)
    svc.wait_workers(2)
    client = redis_server.client()
    steps = _walkthrough()
    assert [cmd.split()[:3] for cmd, _ in steps][2:] == [
        ["rqworkers", "dead", "list"], ["rqworkers", "dead", "show"],
        ["rqworkers", "dead", "requeue"], ["rqworkers", "dead", "purge"],
    ]  # fmt: skip
    for command, shown in steps:
        if command.startswith("rqworkers"):
            wait_for(lambda: client.llen(Keys("queue2").dead) == 2, what="two dead letters")
        # The only change: redis-cli is pointed at the test's redis-server.
        command = command.replace("redis-cli", f"redis-cli -p {redis_server.port}")
        controller, terminal = pty.openpty()
        try:
            os.write(controller, b"y\n")  # purge's question, answered as shown
            result = subprocess.run(
                ["bash", "-c", command], stdin=terminal, capture_output=True, text=True,
                env=env, cwd=tmp_path, timeout=60,
            )  # fmt: skip
        finally:
            os.close(terminal)
            os.close(controller)
        assert result.returncode == 0, (command, result)
        if "redis-cli" in command:
            continue  # prints the list's length, which the page leaves out
        got = _STAMP.sub("<time>", result.stdout).replace("[y/N] ", "[y/N] y\n").splitlines()
        assert got == [_STAMP.sub("<time>", line) for line in shown], command
    assert (tmp_path / "payload.bin").read_bytes() == b"bad\x00\xff binary"
    assert client.llen(Keys("queue2").dead) == 0


# -- scripts/run-local -------------------------------------------------------------------------


def _run_local_in_background(tmp_path: Path, env: dict[str, str], port: int) -> Popen[bytes]:
    """`scripts/run-local &` in a non-interactive script, as a CI job or a Makefile starts
    it: the shell starts it with SIGINT ignored. The script prints run-local's pid first."""
    log = open(tmp_path / f"run-local-{port}.log", "wb")  # noqa: SIM115 - the process's
    script = f'"{REPO}/scripts/run-local" & echo "pid $!"; wait $!; echo "status $?"'
    return subprocess.Popen(
        ["bash", "-c", script],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(
            env,
            REDIS_PORT=str(port),
            RQWORKERS_METRICS=f"127.0.0.1:{free_port()}",
            RQWORKERS_PID_FILE=str(tmp_path / f"rqworkers-{port}.pid"),
        ),
        start_new_session=True,
    )


def _run_local_until_sigint(tmp_path: Path, env: dict[str, str]) -> str:
    """Start run-local in the background of a script, SIGINT it once its workers run, and
    return its output. Its processes and Redis data are removed whatever happens."""
    port = free_port()
    job = _run_local_in_background(tmp_path, env, port)
    log = tmp_path / f"run-local-{port}.log"
    try:
        wait_for(lambda: re.search(r"queue2-1 \d+ started", log.read_text()), timeout=120,
                 what="run-local's workers")  # fmt: skip
        pid = int(re.findall(r"^pid (\d+)$", log.read_text(), re.M)[0])
        os.kill(pid, signal.SIGINT)
        assert job.wait(60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(10)
        shutil.rmtree(REPO / ".run" / f"redis-{port}", ignore_errors=True)
    return log.read_text()


@pytest.mark.slow
@pytest.mark.service
def test_run_local_skips_the_reinstall_and_stops_on_sigint_from_a_background_job(
    tmp_path: Path, env: dict[str, str]
) -> None:
    env.pop("RQWORKERS_REINSTALL", None)
    _run_local_until_sigint(tmp_path, env)  # installs if it must
    output = _run_local_until_sigint(tmp_path, env)
    assert "pyproject.toml is unchanged: not reinstalling" in output
    assert "pip install" not in output
    assert "rqworkers exited with status 0" in output and "redis-server stopped" in output
    assert output.rstrip().endswith("status 0")


# -- pid files and reload: never turned on the operator ----------------------------------------


@pytest.fixture
def bystander() -> Iterator[Popen[bytes]]:
    """An unrelated process of the same user, which a wrong SIGHUP would kill."""
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _managed(tmp_path: Path, url: str) -> tuple[Path, Path]:
    pid_file = tmp_path / "rqworkers.pid"
    manager = {"pid_file": str(pid_file), "check_interval": 0.2, "shutdown_timeout": 10.0}
    return config(tmp_path, url, ["jobs"], manager=manager), pid_file


def test_reload_refuses_the_pid_file_of_a_killed_manager_whose_pid_was_reused(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service],
    bystander: Popen[bytes],
) -> None:  # fmt: skip
    path, pid_file = _managed(tmp_path, redis_server.url)
    svc = start(services, path, env)
    svc.wait_workers(1)
    svc.signal_session(signal.SIGKILL)  # no chance to remove its pid file
    svc.wait(10)
    assert pid_file.exists()
    pid_file.write_text(f"{bystander.pid}\n")  # the kernel gave the pid to another process

    result = rqworkers(env, "reload", "-c", str(path))
    assert result.returncode == 1, result
    assert result.stderr == (
        f"rqworkers: {pid_file} is not locked: no manager holds it (one that died left it "
        f"behind, pid {bystander.pid}); nothing was signalled\n"
    )
    assert bystander.poll() is None, "the unrelated process got no SIGHUP"


_LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, (sys.argv[2] or str(os.getpid())).encode())
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("written", ["the bystander's pid", "the locker's own pid"])
@pytest.mark.service
def test_reload_refuses_a_locked_pid_file_whose_pid_is_no_rqworkers_manager(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, bystander: Popen[bytes],
    written: str,
) -> None:  # fmt: skip
    """Held, but not by a manager: the lock alone is not trusted either."""
    path, pid_file = _managed(tmp_path, redis_server.url)
    pid = str(bystander.pid) if written == "the bystander's pid" else ""
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(pid_file), pid],
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
        result = rqworkers(env, "reload", "-c", str(path))
        assert result.returncode == 1, result
        target = pid or str(locker.pid)
        assert re.fullmatch(
            rf"rqworkers: {re.escape(str(pid_file))}: pid {target} is not an rqworkers manager "
            r"\(it is '.*'\); nothing was signalled\n",
            result.stderr,
        ), result.stderr
        assert bystander.poll() is None and locker.poll() is None, "no one got a SIGHUP"
    finally:
        locker.kill()
        locker.wait(10)


@pytest.mark.parametrize("planted", ["symbolic link", "hard link", "another user's file"])
def test_the_pid_file_never_writes_through_a_link_planted_in_its_place(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service],
    planted: str,
) -> None:  # fmt: skip
    """As in a world-writable directory: another user plants a link where the pid file goes,
    to a file the operator can write and the planter cannot."""
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    path, pid_file = _managed(tmp_path, redis_server.url)
    if planted == "symbolic link":
        pid_file.symlink_to(victim)
        problem = "is a symbolic link: refused, it could point anywhere"
    elif planted == "hard link":
        os.link(victim, pid_file)
        problem = "has 2 hard links: refused, it may not be ours"
    else:  # a file the planter owns: they could write another pid in it at any time
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        pid_file.write_text("")
        os.chown(pid_file, 65534, 65534)
        problem = "is owned by uid 65534, not by this user (uid 0): refused"
    for command in ("check", "run"):
        result = rqworkers(env, command, "-c", str(path), timeout=30)
        assert result.returncode == 2, result
        assert f"{path}: manager.pid_file: {pid_file}: " in result.stderr
        no_traceback(result)
        assert " started" not in result.stderr
        assert problem in result.stderr
    assert victim.read_text() == "precious\n"


def test_the_example_config_keeps_its_pid_file_out_of_shared_directories(tmp_path: Path) -> None:
    from rqworkers.config import load

    cfg = load(REPO / "config" / "rqworkers.toml", environ={})
    assert cfg.manager.pid_file is not None
    directory = Path(os.path.abspath(cfg.manager.pid_file)).parent  # run from the checkout
    assert not directory.stat().st_mode & 0o002, f"{directory} is writable by every user"


# -- what `check` refuses, `run` refuses: one line each, exit 2 --------------------------------


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize(
    ("section", "setting", "problem"),
    [
        ("logging", "file", "logging.file: {value}: is a FIFO, not a regular file"),
        ("manager", "pid_file", "manager.pid_file: {value}: is a FIFO, not a regular file"),
        ("manager", "pid_file", "manager.pid_file: /dev/null: is a character device, not a "
                                "regular file"),
        ("logging", "file", "logging.file: {value!r} holds a NUL character: no file has that "
                            "name"),
        ("manager", "pid_file", "manager.pid_file: {value!r} holds a NUL character: no file has "
                                "that name"),
        ("manager", "restart_backoff_max", "manager.restart_backoff_max: Input should be "
                                           "greater than or equal to 1"),
    ],
    ids=["log-fifo", "pid-fifo", "pid-device", "log-nul", "pid-nul", "backoff-1e-300"],
)  # fmt: skip
@pytest.mark.service
def test_check_and_run_refuse_files_that_are_no_files_and_a_backoff_that_forks_in_a_loop(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, request: pytest.FixtureRequest,
    section: str, setting: str, problem: str,
) -> None:  # fmt: skip
    case = request.node.callspec.id
    value: object = _fifo(tmp_path) if case.endswith("fifo") else {
        "pid-device": "/dev/null", "log-nul": f"{tmp_path}/a\0b.log",
        "pid-nul": f"{tmp_path}/a\0b.pid", "backoff-1e-300": 1e-300,
    }[case]  # fmt: skip
    path = config(tmp_path, redis_server.url, ["jobs"], **{section: {setting: value}})
    path.write_text(path.read_text().replace("\0", "\\u0000"))  # TOML's escape for NUL
    for command in ("check", "run"):
        result = rqworkers(env, command, "-c", str(path), timeout=30)  # a hang fails too
        assert result.returncode == 2, result
        headers = ("rqworkers: invalid configuration", "rqworkers: cannot start")
        lines = [line for line in result.stderr.splitlines() if line not in headers]
        assert lines == [f"{path}: {problem.format(value=value)}"], result.stderr
        no_traceback(result)


@pytest.mark.parametrize("kind", ["/dev/zero", "a FIFO", "a 2 MB file"])
@pytest.mark.service
def test_a_config_file_that_is_no_config_file_is_refused_in_one_line(
    tmp_path: Path, env: dict[str, str], kind: str
) -> None:
    if kind == "/dev/zero":
        path, problem = "/dev/zero", "is a character device, not a regular file"
    elif kind == "a FIFO":
        path, problem = _fifo(tmp_path), "is a FIFO, not a regular file"
    else:
        path, problem = str(tmp_path / "big.toml"), "is larger than 1024 KiB: not a config file"
        Path(path).write_text("# padding\n" * 200_000)
    for command in ("check", "run", "status"):
        result = rqworkers(env, command, "-c", path, timeout=30)
        assert result.returncode == 2, result
        assert result.stderr == (
            f"rqworkers: invalid configuration\n{path}: cannot read: {problem}\n"
        ), result.stderr


@pytest.mark.service
def test_check_compares_servers_by_identity_not_by_the_spelling_of_their_url(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    """`jobs:dead` next to `jobs` on the same server and database would consume the dead
    letters of `jobs`, whether the URLs say 127.0.0.1 or 127.1 (which no text rule knows)."""
    port = redis_server.port
    workers = [
        {"host": f"redis://127.0.0.1:{port}/1", "queue": "jobs", "handler": HANDLER},
        {"host": f"redis://127.1:{port}/1", "queue": "jobs:dead", "handler": HANDLER},
    ]
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url, workers)
    result = rqworkers(env, "check", "-c", str(path))
    assert result.returncode == 2, result
    assert result.stderr == (
        f"{path}: workers[1].queue: 'jobs:dead' could be a key of queue 'jobs' (workers[0]) "
        "on the same host: every key jobs:... belongs to that queue; rename one of them\n"
    )
    # Another database of the same server is another keyspace: no collision there.
    workers[1]["host"] = f"redis://127.1:{port}/2"
    write_config(tmp_path / "rqworkers.toml", redis_server.url, workers)
    result = rqworkers(env, "check", "-c", str(path))
    assert result.returncode == 0, result


def _two_spellings(tmp_path: Path, port: int, second: str) -> Path:
    """`jobs` on 127.0.0.1 and `second` on 127.1: one server, which no text rule can tell."""
    workers = [
        {"host": f"redis://127.0.0.1:{port}/5", "queue": "jobs", "handler": HANDLER},
        {"host": f"redis://127.1:{port}/5", "queue": second, "handler": HANDLER},
    ]
    return write_config(tmp_path / "rqworkers.toml", f"redis://127.0.0.1:{port}/5", workers,
                        manager={"check_interval": 0.2, "shutdown_timeout": 10.0})  # fmt: skip


@pytest.mark.parametrize(
    ("second", "problem"),
    [
        ("jobs:dead", "workers[1].queue: 'jobs:dead' could be a key of queue 'jobs' (workers[0])"),
        ("jobs", "workers[1].queue: queue 'jobs' is already declared on the same host in"),
    ],
)  # fmt: skip
@pytest.mark.service
def test_run_refuses_queues_that_collide_under_two_spellings_of_one_server(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, second: str, problem: str
) -> None:
    """`check` refused these, `run` started them: the second pair then consumed the dead
    letters of the first (or took its replies, with `tasks:replies:x`)."""
    path = _two_spellings(tmp_path, redis_server.port, second)
    for command in ("check", "run"):
        result = rqworkers(env, command, "-c", str(path), timeout=60)
        assert result.returncode == 2, (command, result)
        assert problem in result.stderr, (command, result.stderr)
        assert " started" not in result.stderr, "no worker may start"
        no_traceback(result)


def test_a_reload_that_would_collide_under_another_spelling_is_refused(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    path = config(tmp_path, f"redis://127.0.0.1:{redis_server.port}/5", ["jobs"],
                  manager={"check_interval": 0.2, "shutdown_timeout": 10.0})  # fmt: skip
    svc = start(services, path, env)
    svc.wait_workers(1, timeout=30)
    _two_spellings(tmp_path, redis_server.port, "jobs:dead")
    svc.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in svc.output(), timeout=30, what="the refusal")
    assert "'jobs:dead' could be a key of queue 'jobs'" in svc.output(), svc.output()
    time.sleep(1.0)  # five manager ticks: a worker for jobs:dead would have started
    assert len(svc.workers()) == 1 and "jobs:dead-1" not in svc.output()


def test_run_starts_during_an_outage_and_says_it_compared_spellings_only(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    """Identity needs an answer: a server down at start must not keep the service down."""
    down = free_port()
    workers = [
        {"host": redis_server.url, "queue": "jobs", "handler": HANDLER},
        {"host": f"redis://127.0.0.1:{down}/0", "queue": "jobs", "handler": HANDLER},
    ]
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url, workers,
                        manager={"check_interval": 0.2, "shutdown_timeout": 10.0})  # fmt: skip
    svc = start(services, path, env)
    svc.wait_workers(2, timeout=30)
    lines = [line for line in svc.output().splitlines() if "cannot tell which server" in line]
    assert len(lines) == 1 and f"127.0.0.1:{down}/0" in lines[0], svc.output()
    assert "WARNING" in lines[0]


@pytest.mark.service
def test_a_reference_inside_a_default_is_refused_naming_the_field(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    """`${A:-${B}}` used to expand to the text `${B}` plus a stray `}`: a token made so
    worked for the page's login."""
    token = "${RQ_TEST_UNSET:-${RQ_TEST_TOKEN}}"
    path = config(tmp_path, redis_server.url, ["jobs"], manager={"dashboard_token": token})
    env.update(RQ_TEST_TOKEN="a-good-long-token-of-32-characters")
    env.pop("RQ_TEST_UNSET", None)
    for command in ("check", "run"):
        result = rqworkers(env, command, "-c", str(path), timeout=30)
        assert result.returncode == 2, result
        assert result.stderr == (
            f"rqworkers: invalid configuration\n{path}: manager.dashboard_token: "
            "${RQ_TEST_UNSET:-${...}}: a reference inside a default is not supported; write "
            "the default itself, or set RQ_TEST_UNSET\n"
        ), result.stderr


# -- bad input to push and submit ----------------------------------------------------------------


@pytest.mark.service
def test_push_sends_stdin_and_arguments_as_the_bytes_they_are(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer
) -> None:
    path = str(config(tmp_path, redis_server.url, ["jobs"]))
    stdin = tmp_path / "payloads"
    stdin.write_bytes(b"\xff\xfe not utf-8\r\nplain\n\x00nul\xc3")  # "\r" is the payload's
    with open(stdin, "rb") as lines:
        result = subprocess.run(
            [sys.executable, "-m", "rqworkers", "push", "-c", path], stdin=lines,
            capture_output=True, env=env, timeout=60,
        )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stdout == b"pushed to jobs (3 waiting)\n"
    client = redis_server.client()
    assert client.lrange("jobs", 0, -1)[::-1] == [b"\xff\xfe not utf-8\r", b"plain", b"\x00nul\xc3"]
    client.delete("jobs")
    result = subprocess.run(
        [sys.executable.encode(), b"-m", b"rqworkers", b"push", b"-c", path.encode(), b"\xe9t\xe9"],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result
    assert client.lrange("jobs", 0, -1) == [b"\xe9t\xe9"]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--wait", "0"], "--wait: '0' is not a number of seconds from 0.001 to 604800"),
        (["--wait", "nan"], "--wait: 'nan' is not a number of seconds from 0.001 to"),
        (["--wait", "-1"], "--wait: '-1' is not a number of seconds from 0.001 to"),
        (["--wait", "inf"], "--wait: 'inf' is not a number of seconds from 0.001 to"),
        (["--wait", "soon"], "--wait: 'soon' is not a number of seconds from 0.001 to"),
        (["--timeout", "nan"], "--timeout: 'nan' is not a number of seconds from 0.001 to"),
        (["--timeout", "-1"], "--timeout: '-1' is not a number of seconds from 0.001 to"),
        (["--wait", "1e-300"], "--wait: '1e-300' is not a number of seconds from 0.001 to"),
        (["--timeout", "0.0009"], "--timeout: '0.0009' is not a number of seconds from 0.001"),
        (["--task", "taskapp"], "TASK: 'taskapp' is not of the form 'module:function'"),
        (["--task", "taskapp:add.__globals__"], "TASK: 'taskapp:add.__globals__' is not of"),
    ],
)  # fmt: skip
@pytest.mark.service
def test_submit_refuses_bad_values_in_one_line_and_sends_nothing(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, args: list[str], problem: str
) -> None:
    workers = [{"queue": "tasks", "tasks": ["taskapp:*"]}]
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url, workers)
    task = args[1] if args[0] == "--task" else "taskapp:add"
    options = [] if args[0] == "--task" else args
    result = rqworkers(env, "submit", "-c", str(path), task, "--args", "[1, 2]", *options,
                       timeout=20)  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"rqworkers submit: {problem}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert redis_server.client().llen("tasks") == 0, "nothing was submitted"


def test_submit_wait_escapes_control_characters_in_the_failure_it_prints(
    tmp_path: Path, env: dict[str, str], redis_server: RedisServer, services: list[Service]
) -> None:
    workers = [{"queue": "tasks", "tasks": ["taskapp:*"], "max_attempts": 1}]
    manager = {"check_interval": 0.2, "shutdown_timeout": 10.0}
    path = write_config(tmp_path / "rqworkers.toml", redis_server.url, workers, manager=manager)
    svc = Service(path, tmp_path, dict(env, TESTAPP_REDIS_URL=redis_server.url)).start()
    services.append(svc)
    svc.wait_workers(1, timeout=30)  # the machine may be busy
    text = "from the cli\nrqworkers: task 0 succeeded\x1b[2J\x07"
    result = rqworkers(env, "submit", "-c", str(path), "taskapp:fail", "--args",
                       json.dumps([text]), "--wait", "30")  # fmt: skip
    assert result.returncode == 1, result
    assert "failed (raised): ValueError: from the cli\\nrqworkers: task 0 succeeded\\x1b[2J" in (
        result.stderr
    )
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    # (a real task id is random hex, so it may itself begin with 0: match the forged words)
    assert not any(
        line.startswith("rqworkers: task 0 succeeded") for line in result.stderr.splitlines()
    )
