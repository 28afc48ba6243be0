"""A task message writes only its own reply: the reply namespace, the operator's
`reply_keys` and what `check` refuses, replies Redis will not take, and forged replies.

Tried as a hostile producer would: every `reply_to` that could reach another key, against
the real `rqworkers run` and a real redis-server (fakeredis nowhere here).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rqworkers import Executor, Producer
from rqworkers.common.globs import Glob
from rqworkers.config import PairSettings, load
from rqworkers.errors import ConfigError, ReplyError
from rqworkers.ops import checks
from rqworkers.store.keys import Keys
from rqworkers.worker.taskhandler import TaskHandler
from tests.support import (
    APPS,
    REPO,
    RedisServer,
    Service,
    dead_info,
    internal_tracebacks,
    run_cli,
    task_pair,
    wait_for,
    write_config,
)

StartService = Callable[..., Service]


@pytest.fixture(autouse=True)
def apps_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


def task(name: str, *args: Any, **fields: Any) -> bytes:
    return json.dumps({"task": name, "args": list(args), **fields}).encode()


def reply_of(server: RedisServer, key: str, timeout: float = 20.0) -> Any:
    client = server.client()  # its socket timeout is 5 s: block 1 s at a time
    popped = wait_for(lambda: client.brpop([key], timeout=1), timeout=timeout, what=key)
    return json.loads(popped[1])


# --- globs ---------------------------------------------------------------------------------

_PATTERNS = ["*", "a", "b", "?", "a*", "*b", "[ab]", "[^a]", "a?b", "*a*", "ab*", "[^ab]*",
             "b*a", "??", "a**b", "\\*", "[a-c]", "[]", "[^]", "*c"]  # fmt: skip
_KEYS = ["".join(p) for n in range(5) for p in itertools.product("abc*", repeat=n)]


@pytest.mark.parametrize("first", _PATTERNS)
def test_two_globs_overlap_exactly_when_some_key_matches_both(first: str) -> None:
    one = Glob.parse(first)
    for second in _PATTERNS:
        other = Glob.parse(second)
        both = any(one.matches(key) and other.matches(key) for key in _KEYS)
        assert one.overlaps(other) == both == other.overlaps(one), (first, second)


def test_a_glob_is_within_a_prefix_only_if_every_key_it_matches_starts_so() -> None:
    assert Glob.parse("tasks:replies:*").within("tasks:replies:")
    assert Glob.parse("tasks:replies:[ab]?").within("tasks:replies:")
    assert Glob.parse("tasks:replies:\\*").within("tasks:replies:")
    for pattern in ("tasks:replies*", "tasks:*", "*", "tasks:replie?:*", "tasks:replies"):
        assert not Glob.parse(pattern).within("tasks:replies:"), pattern


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "an empty pattern matches no key"),
        ("results:[ab", "has a '[' without its ']'"),
        ("results:\\", "ends with a lone backslash"),
        ("results:[a-]", "write a dash at the end of a [set] as \\-"),
    ],
)
def test_a_glob_that_is_not_whole_is_refused_saying_why(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", "\\[").replace("\\-", "\\\\-")):
        Glob.parse(pattern)


# --- reply_keys in the config ----------------------------------------------------------------


def config_with(tmp_path: Path, *workers: dict[str, Any]) -> Path:
    return write_config(tmp_path / "rq.toml", "redis://127.0.0.1:1/0", list(workers))


@pytest.mark.parametrize(
    ("reply_keys", "problem"),
    [
        (["*"], "could match keys of this queue itself (tasks, tasks:dead, ...)"),
        (["tasks*"], "could match keys of this queue itself"),
        (["tasks"], "could match keys of this queue itself"),
        (["tasks:dead"], "could match keys of this queue itself"),
        (["tasks:processing:*"], "could match keys of this queue itself"),
        (["tasks:replies"], "could match keys of this queue itself"),
        (["[tv]*"], "could match keys of this queue itself"),
        (["victim"], "could match keys of queue 'victim' (workers[1])"),
        (["victim:*"], "could match keys of queue 'victim' (workers[1])"),
        (["v?ctim:dead"], "could match keys of queue 'victim' (workers[1])"),
        (["victim:replies:*"], "could match keys of queue 'victim' (workers[1])"),
        (["*:dead"], "could match keys of this queue itself"),
        (["res*", "?ictim*"], "could match keys of queue 'victim' (workers[1])"),
        (["raw:[^x]*"], "could match keys of queue 'raw' (workers[2])"),
    ],
)
def test_reply_keys_that_could_reach_a_queues_keys_are_refused(
    tmp_path: Path, reply_keys: list[str], problem: str
) -> None:
    path = config_with(
        tmp_path,
        task_pair(reply_keys=reply_keys),
        task_pair(queue="victim"),
        {"queue": "raw", "handler": "testapp:handle"},
    )
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.render().splitlines()
    assert line.startswith(f"{path}: workers[0].reply_keys[{len(reply_keys) - 1}]: ")
    assert problem in line


def test_reply_keys_that_reach_no_queue_widen_the_namespace(tmp_path: Path) -> None:
    globs = ["results:*", "tasks:replies:*", "tasks:replies:done:[0-9]", "v:*", "victims"]
    path = config_with(tmp_path, task_pair(reply_keys=globs), task_pair(queue="victim"))
    (pair, _) = load(path, environ={}).pairs
    assert pair.reply_keys == tuple(globs)


def test_a_queue_inside_another_queues_reply_namespace_is_refused(tmp_path: Path) -> None:
    path = config_with(tmp_path, task_pair(), task_pair(queue="tasks:replies:x"))
    with pytest.raises(ConfigError, match=r"workers\[1\]\.queue: 'tasks:replies:x' could be a key"):
        load(path, environ={})


def test_reply_keys_are_compared_with_the_queues_of_every_host(tmp_path: Path) -> None:
    """Two URLs may name one server: a glob that reaches a queue on any host is refused,
    and one inside the pair's own replies passes next to the same queue on another host."""
    other = "redis://127.1:1/0"  # the same server as 127.0.0.1, which only INFO can tell
    path = config_with(
        tmp_path,
        task_pair(reply_keys=["tasks:replies:*", "results:*"]),
        task_pair(host=other),
        task_pair(queue="results", host=other),
    )
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.render().splitlines()
    assert "workers[0].reply_keys[1]: 'results:*' could match keys of queue 'results'" in line


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"reply_keys": ["results:[x"]}, "workers[0].reply_keys: 'results:[x' has a '['"),
        ({"reply_keys": "results:*"}, "workers[0].reply_keys: expected a list"),
        ({"reply_keys": [7]}, "workers[0].reply_keys[0]: expected a string, not 7"),
        (
            {"handler": "testapp:handle", "tasks": None, "reply_keys": ["results:*"]},
            "workers[0]: reply_keys: only a task pair (`tasks`) sends replies",
        ),
    ],
)
def test_a_malformed_reply_keys_is_refused_naming_the_field(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    pair = {k: v for k, v in {**task_pair(), **entry}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        load(config_with(tmp_path, pair), environ={})
    assert problem in info.value.render()


@pytest.mark.service
def test_check_refuses_a_reply_glob_that_reaches_another_queue_in_one_line(
    tmp_path: Path,
) -> None:
    path = config_with(tmp_path, task_pair(reply_keys=["vic*"]), task_pair(queue="victim"))
    done = run_cli("check", "-c", str(path))
    assert done.returncode == 2, done.stderr
    assert (
        f"{path}: workers[0].reply_keys[0]: 'vic*' could match keys of queue 'victim'"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


# --- the worker, against a real Redis ------------------------------------------------------


@pytest.fixture
def handler(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskHandler]:
    monkeypatch.setenv("TESTAPP_REDIS_URL", redis_server.url)
    import testapp

    monkeypatch.setattr(testapp, "_client", None)
    pair = PairSettings(host="local", queue="tasks", tasks=("taskapp:*",), url=redis_server.url)
    made = TaskHandler(pair)
    yield made
    made.teardown()


def test_a_reply_redis_refuses_fails_only_its_own_message(
    handler: TaskHandler, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    client.set("tasks:replies:str", "x")
    bad = task("taskapp:add", 1, 2, reply_to="tasks:replies:str")
    good = task("taskapp:add", 2, 2, reply_to="tasks:replies:ok")
    (three, bad_reply), (four, good_reply) = handler.run(bad), handler.run(good)
    assert (three, four) == (3, 4) and bad_reply is not None and good_reply is not None
    started = time.monotonic()
    error, written = handler.write_replies([bad_reply, good_reply])
    assert time.monotonic() - started < 0.5, "WRONGTYPE is not worth waiting for"
    assert written is None and isinstance(error, ReplyError)
    assert "reply to 'tasks:replies:str' not written" in str(error)
    assert "WRONGTYPE" in str(error)
    assert client.get("tasks:replies:str") == b"x"
    assert json.loads(client.rpop("tasks:replies:ok"))["result"] == 4  # type: ignore[arg-type]


def test_a_reply_refused_for_memory_is_retried_briefly_then_fails_its_message(
    handler: TaskHandler, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    message = task("taskapp:add", 1, 2, reply_to="tasks:replies:oom")
    result, reply = handler.run(message)
    assert result == 3 and reply is not None
    client.config_set("maxmemory", 1)
    try:
        started = time.monotonic()
        (error,) = handler.write_replies([reply])
        waited = time.monotonic() - started
    finally:
        client.config_set("maxmemory", 0)
    assert isinstance(error, ReplyError) and "tasks:replies:oom" in str(error)
    assert "out of memory" in str(error)
    assert 0.5 < waited < 3.0, f"a short retry, not an outage ({waited:.2f}s)"
    assert client.exists("tasks:replies:oom") == 0


# --- the service ----------------------------------------------------------------------------


def test_a_reply_to_outside_the_namespace_is_dead_lettered_at_once_and_touches_nothing(
    service: StartService, redis_server: RedisServer
) -> None:
    """The issue's reproductions: each would have deleted, fed or forged another key."""
    client = redis_server.client()
    client.lpush("victim", *[f"waiting {n}".encode() for n in range(5)])
    client.lpush(Keys("victim", "node:1").processing, b"in flight")
    client.lpush(Keys("bad").dead, b"dead letter")
    client.lpush("other:replies:someone", b"theirs")
    before = {key: client.lrange(key, 0, -1) for key in client.scan_iter()}
    svc = service([task_pair(max_attempts=5)])
    hostile = [
        task("taskapp:sleep", 0, key, reply_to=key, result_ttl=0.001)
        for key in ["victim", Keys("victim", "node:1").processing, Keys("bad").dead, "raw", "tasks",
                    "tasks:dead", "other:replies:someone", "tasks:replies", "tasks:*"]
    ]  # fmt: skip
    after = task("taskapp:add", 1, 2, reply_to="tasks:replies:after")
    Producer(redis_server.url).push("tasks", *hostile, after)
    assert reply_of(redis_server, "tasks:replies:after")["result"] == 3
    dead = Keys("tasks").dead
    wait_for(lambda: client.llen(dead) == len(hostile), timeout=15, what="dead letters")
    for message in hostile:
        info = dead_info(redis_server, "tasks", message)
        assert info["attempts"] == 1 and "is not one of this queue's reply keys" in str(
            info["reason"]
        )
    assert client.llen("sleep:started") == 0, "no hostile task ran"
    for key, items in before.items():
        assert client.lrange(key, 0, -1) == items and client.pttl(key) == -1, key
    assert not client.exists("raw") and not client.exists("tasks:*")
    log = svc.output()
    assert sum("is not one of this queue's reply keys" in line for line in log.splitlines()) == len(
        hostile
    )
    assert internal_tracebacks(log) == []


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_refused_message_runs_nothing_not_even_its_on_failure(
    service: StartService, redis_server: RedisServer, concurrency: int
) -> None:
    """docs/tasks.md: refused "before anything runs". A message that ran and failed for good runs
    its `on_failure`, which shows when the worker got past the refused ones."""
    client = redis_server.client()
    svc = service([task_pair(max_attempts=3, processes=1, concurrency=concurrency)])
    on_failure = {"on_failure": "taskapp:error_callback"}
    refused = [
        task("taskapp:fail", "x", reply_to="victim", **on_failure),
        task("taskapp:fail", "x", reply_to="tasks:dead", **on_failure),
        task("taskapp:fail", 1, 2, reply_to="tasks:replies:r", **on_failure),
        task("os:system", "true", reply_to="tasks:replies:r", **on_failure),
        task("taskapp:fail", "x", on_success="os:system", **on_failure),
        task("taskapp:fail", float("nan"), reply_to="tasks:replies:r", **on_failure),
        json.dumps({"task": "taskapp:fail", "args": ["x"], **on_failure}).encode("utf-16"),
    ]
    ran = task("taskapp:fail", "ran", **on_failure)
    Producer(redis_server.url).push("tasks", *refused)
    dead = Keys("tasks").dead
    wait_for(lambda: client.llen(dead) == len(refused), timeout=15, what="dead letters")
    Producer(redis_server.url).push("tasks", ran)
    wait_for(lambda: client.llen("callbacks:failure") > 0, timeout=15, what="on_failure")
    assert client.lrange("callbacks:failure", 0, -1) == [b"raised|raised: ValueError: ran"]
    assert client.lrange("fail:attempts", 0, -1) == [b"ran"] * 3
    for message in refused:
        assert dead_info(redis_server, "tasks", message)["attempts"] == 1
    replies = [json.loads(reply) for reply in client.lrange("tasks:replies:r", 0, -1)]
    assert [reply["reason"] for reply in replies] == ["refused"] * 3, "their callers still hear"
    assert not client.exists("victim")
    assert internal_tracebacks(svc.output()) == []


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_reply_of_the_wrong_type_fails_its_delivery_and_the_queue_goes_on(
    service: StartService, redis_server: RedisServer, concurrency: int
) -> None:
    """`SET tasks:replies:x x`: the task runs max_attempts times, no more; it is
    dead-lettered saying why, and the worker never exits for it."""
    client = redis_server.client()
    client.set("tasks:replies:x", "x")
    svc = service([task_pair(max_attempts=3, concurrency=concurrency)])
    (worker,) = svc.wait_workers(1)
    message = task("taskapp:sleep", 0, "wrongtype", reply_to="tasks:replies:x")
    after = task("taskapp:add", 1, 2, reply_to="tasks:replies:after")
    Producer(redis_server.url).push("tasks", message, after)
    assert reply_of(redis_server, "tasks:replies:after")["result"] == 3
    wait_for(lambda: client.llen(Keys("tasks").dead) == 1, timeout=15, what="the dead letter")
    info = dead_info(redis_server, "tasks", message)
    assert info["attempts"] == 3
    assert "ReplyError: reply to 'tasks:replies:x' not written" in str(info["reason"])
    assert "WRONGTYPE" in str(info["reason"])
    assert client.lrange("sleep:started", 0, -1) == [b"wrongtype"] * 3
    assert [w.pid for w in svc.workers()] == [worker.pid], "the worker never exited"
    log = svc.output()
    assert "exited" not in log and "redis refused" not in log
    assert "reply to 'tasks:replies:x' not written" in log
    assert client.get("tasks:replies:x") == b"x"
    assert internal_tracebacks(log) == []


def acl_user(server: RedisServer, *reply_keys: str) -> str:
    """The URL of a Redis user with every right on queue `tasks`'s keys but its replies,
    and on `reply_keys`."""
    server.client().execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "worker", "on", ">worker-password-0123", "+@all", "~tasks",
        "~tasks:[^r]*", "~tasks:retry", "~tasks:reclaim:*", "~tasks:reclaim-turn", *reply_keys,
    )  # fmt: skip
    return f"redis://worker:worker-password-0123@127.0.0.1:{server.port}/0"


def test_check_names_a_redis_user_that_may_not_write_replies(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = write_config(tmp_path / "acl.toml", acl_user(redis_server), [task_pair()])
    (line,) = checks.host_problems(load(path, environ={}))
    assert line.startswith("queue 'tasks' on redis://worker:***@")
    assert "may not run EVAL, LPUSH, PEXPIRE as workers do" in line and "NOPERM" not in line
    path = write_config(
        tmp_path / "ok.toml", acl_user(redis_server, "~tasks:replies:*"), [task_pair()]
    )
    assert checks.host_problems(load(path, environ={})) == []


@pytest.mark.service
def test_a_reply_the_redis_user_may_not_write_fails_its_delivery_not_the_queue(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """NOPERM on the reply key is that delivery's failure, not an outage of the queue."""
    client = redis_server.client()
    url = acl_user(redis_server, "~tasks:replies:ok:*")
    path = write_config(tmp_path / "acl.toml", url, [task_pair()], manager={"check_interval": 0.2})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)])}
    env["TESTAPP_REDIS_URL"] = redis_server.url
    svc = Service(path, tmp_path, env).start()
    try:
        message = task("taskapp:sleep", 0, "noperm", reply_to="tasks:replies:denied")
        after = task("taskapp:add", 1, 2, reply_to="tasks:replies:ok:after")
        Producer(redis_server.url).push("tasks", message, after)
        assert reply_of(redis_server, "tasks:replies:ok:after")["result"] == 3
        wait_for(lambda: client.llen(Keys("tasks").dead) == 1, timeout=15, what="the dead letter")
        reason = str(dead_info(redis_server, "tasks", message)["reason"])
        assert (
            "reply to 'tasks:replies:denied' not written" in reason
            and "NoPermissionError" in reason
        )
        assert client.llen("sleep:started") == 2  # max_attempts, no more
        log = svc.output()
        assert log.count("not written") == 3, "two failed deliveries, one lost failure reply"
        assert "retrying with backoff" not in log, "not an outage"
        assert "exited" not in log and internal_tracebacks(log) == []
    finally:
        svc.cleanup()


def test_an_executor_ignores_and_logs_once_a_reply_it_never_asked_for(
    service: StartService, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    service([task_pair()])
    with Executor(redis_server.url, "tasks") as executor:
        prefix, _, secret = executor.reply_key.rpartition(":")
        assert prefix == "tasks:replies" and len(secret) == 32  # 128 random bits
        future = executor.submit("taskapp:sleep", 1, "real")
        assert (
            len(future.task_id) == 48
            and future.task_id != executor.submit("taskapp:add", 1, 1).task_id
        )
        caplog.set_level(logging.WARNING, logger="rqworkers.client.executor")
        forged = [
            {"v": 1, "id": "f" * 48, "ok": True, "result": "forged"},
            {"v": 1, "id": future.task_id[:32] + "0" * 16, "ok": True, "result": "forged"},
            {"v": 1, "id": "x", "ok": False, "reason": "raised", "message": "forged"},
            "not a reply",
            [1, 2],
        ]
        junk = [b"[" * 100_000, b"\xff\xfe"]  # too deep for json, not UTF-8
        redis_server.client().lpush(executor.reply_key, *[json.dumps(f) for f in forged], *junk)

        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]

        wait_for(lambda: logged() and redis_server.client().llen(executor.reply_key) == 0,
                 timeout=10, what="the forged replies to be read")  # fmt: skip
        assert future.result(timeout=20) == "real", "the forged replies were ignored"
    (line,) = logged()
    assert f"a reply for task id '{'f' * 48}', which it never sent" in line
