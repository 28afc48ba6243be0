"""Tasks end to end: `Executor`, `Producer` and the CLI against the real `rqworkers run` and a
real redis-server. Every process is killed at teardown by the fixtures, even on failure."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import rqworkers
from rqworkers import Executor, Producer, TaskError
from rqworkers.errors import RqworkersError
from rqworkers.store.keys import Keys
from tests.servers import Cluster, Processes, SentinelSetup
from tests.support import (
    APPS,
    REPO,
    RedisServer,
    Service,
    dead_info,
    run_cli,
    task_pair,
    wait_for,
    write_config,
)

StartService = Callable[..., Service]


def _taskapp() -> Any:
    """The test app's functions, under their module name `taskapp`, which is all that an
    executor sends: the workers import the module themselves."""
    if str(APPS) not in sys.path:  # taskapp imports its sibling testapp
        sys.path.append(str(APPS))
    spec = importlib.util.spec_from_file_location("taskapp", APPS / "taskapp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


taskapp = _taskapp()


@pytest.fixture
def executor(redis_server: RedisServer) -> Iterator[Callable[..., Executor]]:
    made: list[Executor] = []

    def make(**options: Any) -> Executor:
        made.append(Executor(redis_server.url, "tasks", **options))
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            one.shutdown(wait=False, cancel_futures=True)


def test_the_executor_is_a_concurrent_futures_executor_importable_from_rqworkers() -> None:
    assert issubclass(rqworkers.Executor, concurrent.futures.Executor)
    assert issubclass(rqworkers.TaskFuture, concurrent.futures.Future)


_NOT_SECONDS = [math.nan, math.inf, -math.inf, -1, 0, 0.0, 1e9, True, "5", None]


@pytest.mark.parametrize(
    "options",
    [{"result_ttl": bad} for bad in _NOT_SECONDS]
    + [{"timeout": bad} for bad in _NOT_SECONDS if bad is not None]
    + [{"max_pending": bad} for bad in [math.nan, math.inf, 0, -1, 2.5, True, "3"]],
    ids=repr,
)
def test_an_executor_refuses_a_bad_number_when_it_is_made(
    redis_server: RedisServer, options: dict[str, Any]
) -> None:
    """At the call, not at the first `submit` or, worse, in `shutdown`: with `result_ttl`
    NaN, leaving a `with` block raised a ValueError there that hid the block's own error."""
    threads = threading.active_count()
    (name,) = options
    with pytest.raises(ValueError, match=f"^{name} must be "):
        Executor(redis_server.url, "tasks", **options)
    assert threading.active_count() == threads, "no reply reader was started"
    with pytest.raises(ZeroDivisionError), Executor(redis_server.url, "tasks", **{name: 1}) as ex:
        if name != "max_pending":
            with pytest.raises(AttributeError):
                setattr(ex, name, options[name])  # read-only: checked once, for good
        1 / 0  # noqa: B018 - the block's own error comes out of `with`


def test_an_executor_takes_every_sensible_number(redis_server: RedisServer) -> None:
    with Executor(redis_server.url, "tasks", timeout=0.001, result_ttl=10**8, max_pending=1):
        pass
    with Executor(redis_server.url, "tasks", timeout=None, max_pending=None, result_ttl=0.5):
        pass
    assert redis_server.client().keys() == []


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, -1, 0, 1e9, True, "1"])
def test_wait_reply_refuses_a_timeout_that_is_not_seconds_at_once(
    redis_server: RedisServer, timeout: Any
) -> None:
    """`None` waits forever; NaN and infinity used to wait forever without saying so."""
    outcome: list[BaseException | None] = []

    def wait() -> None:
        with Producer(redis_server.url) as producer:
            try:
                producer.wait_reply("tasks:replies:none", timeout)
                outcome.append(None)
            except BaseException as exc:  # the test reports whatever came out
                outcome.append(exc)

    thread = threading.Thread(target=wait, daemon=True)  # the old code blocked forever here
    thread.start()
    thread.join(5)
    assert outcome, f"wait_reply(timeout={timeout!r}) is still waiting"
    assert isinstance(outcome[0], ValueError), outcome
    assert str(outcome[0]).startswith("timeout must be a positive number of seconds")


def test_wait_reply_times_out_after_its_timeout(redis_server: RedisServer) -> None:
    with Producer(redis_server.url) as producer:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within 0\.3s"):
            producer.wait_reply("tasks:replies:none", 0.3)
        assert 0.25 < time.monotonic() - started < 2


def test_nan_and_infinity_are_never_sent_by_submit(
    redis_server: RedisServer, executor: Callable[..., Executor]
) -> None:
    ex = executor()
    with Producer(redis_server.url) as producer:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(TypeError, match="cannot be encoded as JSON"):
                producer.submit("tasks", "taskapp:add", (value, 1))
            with pytest.raises(TypeError, match="cannot be encoded as JSON"):
                ex.submit(taskapp.add, 1, value)
            with pytest.raises(TypeError, match="cannot be encoded as JSON"):
                list(ex.map(taskapp.add, [1], [value]))
    assert redis_server.client().llen("tasks") == 0
    assert rqworkers.TaskError and rqworkers.Producer


@pytest.mark.parametrize("prefetch", [1, 100])
def test_seed_003_jobs_with_callbacks_and_a_map_of_1000(
    service: StartService, redis_server: RedisServer, prefetch: int
) -> None:
    """Seed 003's program: `Job(id, func, args, kwargs)` submitted with a done-callback, then
    a map; only the executor line differs from ProcessPoolExecutor."""
    service([task_pair(prefetch=prefetch, processes=2)])
    done: dict[int, Any] = {}
    lock = threading.Lock()

    def on_done(future: concurrent.futures.Future[Any]) -> None:
        with lock:
            result = future.result()
            done[result["id"]] = result["result"]

    with Executor(redis_server.url, "tasks") as executor:  # was ProcessPoolExecutor(2)
        jobs = [{"id": i, "func": taskapp.job, "args": (i, i), "kwargs": {"scale": 3}}
                for i in range(20)]  # fmt: skip
        for job in jobs:
            future = executor.submit(job["func"], *job["args"], **job["kwargs"])
            future.add_done_callback(on_done)
        squares = list(executor.map(taskapp.square, range(1000), timeout=60))
    assert squares == [i * i for i in range(1000)]
    assert done == {i: 3 * i for i in range(20)}


def test_seed_000_tasks_with_their_own_timeout_and_callbacks(
    service: StartService, redis_server: RedisServer
) -> None:
    """Seed 000's program: a task module with `runnable`, `callback`, `error_callback`, each
    task with its own timeout; the callbacks run in the worker, the results come back."""
    service([task_pair(max_attempts=1)])
    client = redis_server.client()
    producer = Producer(redis_server.url)
    r = producer.reply_key("tasks")
    callbacks = {"on_success": "taskapp:callback", "on_failure": "taskapp:error_callback"}
    ok, zero, slow = (
        producer.submit("tasks", "taskapp:runnable", (i, b), timeout=1, reply_to=r, **callbacks)
        for i, b in ((7, 2), (1, 0), (1, -1))
    )
    replies = {}
    for _ in range(3):
        popped = client.brpop([r], timeout=20)
        assert popped is not None, "every task replies"
        task_id, result, error = rqworkers.client.tasks.read_reply(popped[1])
        replies[task_id] = error.reason if error else result
    assert replies == {ok: 3, zero: "raised", slow: "timeout"}
    wait_for(lambda: client.llen("callbacks:failure") == 2, timeout=10, what="error callbacks")
    assert client.lrange("callbacks:success", 0, -1) == [b"3"]
    failures = sorted(client.lrange("callbacks:failure", 0, -1))
    assert failures[0].startswith(b"raised|raised: ZeroDivisionError: b is zero")
    assert failures[1] == b"timeout|timeout: MessageTimeout: timeout after 1s"

    with Executor(redis_server.url, "tasks", timeout=1) as executor:  # the same, as futures
        futures = [executor.submit(taskapp.runnable, 7, b) for b in (2, 0, -1)]
        outcomes = [f.exception(timeout=20) or f.result() for f in futures]
    assert outcomes[0] == 3
    assert [o.reason for o in outcomes[1:]] == ["raised", "timeout"]  # type: ignore[union-attr]


def test_a_failed_task_is_retried_then_raises_task_error_with_its_traceback(
    service: StartService, redis_server: RedisServer, executor: Callable[..., Executor]
) -> None:
    service([task_pair(max_attempts=3)])
    future = executor().submit(taskapp.fail, "nope")
    error = future.exception(timeout=30)
    assert isinstance(error, TaskError)
    assert (error.reason, error.type, error.message) == ("raised", "ValueError", "nope")
    assert 'taskapp.py", line' in error.traceback and "ValueError: nope" in error.traceback
    assert "rqworkers/worker/" not in error.traceback
    assert redis_server.client().llen("fail:attempts") == 3  # max_attempts, then final
    with pytest.raises(TaskError):
        future.result()


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_task_past_its_own_timeout_fails_with_reason_timeout(
    service: StartService,
    redis_server: RedisServer,
    executor: Callable[..., Executor],
    concurrency: int,
) -> None:
    """The caller, the log and the dead letter all name the task's own timeout."""
    svc = service([task_pair(max_attempts=1, timeout=30, concurrency=concurrency)])
    started = time.monotonic()
    future = executor(timeout=0.5).submit(taskapp.sleep, 20, "late")
    error = future.exception(timeout=15)
    assert isinstance(error, TaskError) and error.reason == "timeout"
    assert error.message == "timeout after 0.5s"
    assert time.monotonic() - started < 10, "the task's own timeout, not the pair's 30 s"
    (payload,) = redis_server.client().lrange(Keys("tasks").dead, 0, -1)
    assert dead_info(redis_server, "tasks", payload)["reason"] == "timeout after 0.5s"
    (line,) = [line for line in svc.output().splitlines() if "dead-lettered" in line]
    assert "timeout after 0.5s" in line and "after 30s" not in svc.output()
    assert concurrency == 1 or "a handler thread ran past 0.5s" in svc.output()
    assert "exited: timeout" in wait_for(
        lambda: svc.output() if "exited: timeout" in svc.output() else None,
        timeout=10, what="the worker to recycle",
    )  # fmt: skip


def test_a_return_value_that_is_not_json_is_a_failure_that_says_so(
    service: StartService, executor: Callable[..., Executor]
) -> None:
    service([task_pair(max_attempts=1, tasks=["taskapp:*", "builtins:float"])])
    error = executor().submit(taskapp.not_json).exception(timeout=20)
    assert isinstance(error, TaskError) and error.reason == "raised"
    assert "cannot be encoded as JSON" in error.message
    for text in ("nan", "inf", "-inf"):  # JSON has no NaN nor Infinity: no parser reads them
        error = executor().submit("builtins:float", text).exception(timeout=20)
        assert isinstance(error, TaskError) and error.reason == "raised", text
        assert "return value cannot be encoded as JSON: Out of range float" in error.message
    assert executor().submit("builtins:float", "1.5").result(timeout=20) == 1.5


def test_a_worker_sigkilled_mid_task_still_resolves_the_future_once(
    service: StartService, redis_server: RedisServer, executor: Callable[..., Executor]
) -> None:
    svc = service([task_pair(max_attempts=3)])
    (worker,) = svc.wait_workers(1)
    calls: list[Any] = []
    future = executor().submit(taskapp.sleep, 1.5, "victim")
    future.add_done_callback(lambda f: calls.append(f.result()))
    client = redis_server.client()
    wait_for(lambda: client.llen("sleep:started") == 1, timeout=10, what="the task to start")
    os.kill(worker.pid, signal.SIGKILL)
    assert future.result(timeout=30) == "victim"
    time.sleep(0.5)  # a second reply, if there were one, would have come by now
    assert calls == ["victim"]
    assert client.lrange("sleep:started", 0, -1) == [b"victim", b"victim"]  # replayed once


def test_a_task_that_kills_its_worker_every_time_is_dead_lettered_and_its_future_fails(
    service: StartService, redis_server: RedisServer, executor: Callable[..., Executor]
) -> None:
    service([task_pair(max_attempts=2)])
    error = executor().submit(taskapp.crash).exception(timeout=30)
    assert isinstance(error, TaskError) and error.reason == "dead-lettered"
    assert "SIGKILL" in error.message


def test_cancel_while_queued_takes_the_message_out(
    service: StartService, redis_server: RedisServer, executor: Callable[..., Executor]
) -> None:
    service([task_pair()])
    ex = executor()
    client = redis_server.client()
    busy = ex.submit(taskapp.sleep, 1.0, "busy")
    wait_for(lambda: client.llen("sleep:started") == 1, timeout=10, what="the worker to be busy")
    queued = ex.submit(taskapp.sleep, 0, "queued")
    assert client.llen("tasks") == 1
    assert queued.cancel() and queued.cancelled()
    assert client.llen("tasks") == 0
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result()
    assert queued in concurrent.futures.wait([queued], timeout=1).done
    assert busy.result(timeout=10) == "busy"
    assert not busy.cancel(), "a finished (or running) task cannot be cancelled"
    ex.shutdown()
    assert client.lrange("sleep:started", 0, -1) == [b"busy"]


def test_max_pending_makes_submit_wait(
    service: StartService, executor: Callable[..., Executor]
) -> None:
    service([task_pair(processes=2)])
    ex = executor(max_pending=2)
    first = [ex.submit(taskapp.sleep, 1.0, str(i)) for i in range(2)]
    submitted = threading.Event()
    third: list[concurrent.futures.Future[Any]] = []

    def submit_third() -> None:
        third.append(ex.submit(taskapp.add, 1, 2))
        submitted.set()

    thread = threading.Thread(target=submit_third)
    started = time.monotonic()
    thread.start()
    assert not submitted.wait(0.5), "submit must block while two futures are unfinished"
    assert submitted.wait(10)
    assert time.monotonic() - started >= 0.8
    assert any(f.done() for f in first)
    assert third[0].result(timeout=10) == 3
    thread.join()


def test_two_executors_on_one_queue_each_get_only_their_own_results(
    service: StartService, executor: Callable[..., Executor]
) -> None:
    service([task_pair(processes=2, prefetch=10)])
    a, b = executor(), executor()
    assert a.reply_key != b.reply_key
    futures_a = [a.submit(taskapp.add, i, 0) for i in range(200)]
    futures_b = [b.submit(taskapp.add, i, 1000) for i in range(200)]
    assert [f.result(timeout=30) for f in futures_a] == list(range(200))
    assert [f.result(timeout=30) for f in futures_b] == [i + 1000 for i in range(200)]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json at all", "not valid JSON"),
        (b"[1, 2, 3]", "a JSON array, not an object"),
        (b'{"args": [1, 2]}', "no 'task' field"),
        (b'{"task": "taskapp:add", "args": {"a": 1}}', "'args' must be a list"),
        (b'{"task": "os:system", "args": ["touch /tmp/x"]}', "not in this queue's allow-list"),
        (b'{"task": "recorded_import:run"}', "not in this queue's allow-list"),
        (b'{"task": "taskapp:nope"}', "does not exist"),
        (b'{"task": null}', "'task' must be 'module:function', not null"),
        (b'{"task": ["taskapp:add"]}', "'task' must be 'module:function'"),
        (b'{"task": "taskapp:add", "args": [1, 2], "timeout": NaN}', "NaN is not JSON"),
        (b'{"task": "taskapp:add", "args": [NaN, 2]}', "NaN is not JSON"),
        ('{"task": "taskapp:add", "args": [1, 2]}'.encode("utf-16"), "not UTF-8"),
        (b'{"task": "taskapp:add", "args": [1, 2], "result_ttl": -1}', "'result_ttl' must be a"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-task",
        "bad-args",
        "os-system",
        "not-allowed",
        "missing",
        "null-task",
        "list-task",
        "nan-timeout",
        "nan-argument",
        "utf-16",
        "negative-ttl",
    ],
)
def test_bad_input_is_dead_lettered_at_once_with_its_reason(
    service: StartService,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    payload: bytes,
    reason: str,
) -> None:
    marker = tmp_path / "recorded_import"
    monkeypatch.setenv("RECORDED_IMPORT_FILE", str(marker))
    svc = service([task_pair(max_attempts=5, retry_delay=0.1)])
    client = redis_server.client()
    after = b'{"task": "taskapp:add", "args": [1, 2], "reply_to": "tasks:replies:after"}'
    Producer(redis_server.url).push("tasks", payload, after)
    wait_for(lambda: client.llen(Keys("tasks").dead) == 1, timeout=15, what="the dead letter")
    popped = client.brpop(
        ["tasks:replies:after"], timeout=15
    )  # the worker went on with the next message
    assert popped is not None and json.loads(popped[1])["result"] == 3
    assert client.lrange(Keys("tasks").dead, 0, -1) == [payload]
    (details,) = [json.loads(v) for v in client.hvals(Keys("tasks").dead_reasons)]
    assert reason in details["reason"] and details["attempts"] == 1
    assert client.llen("tasks") == 0 and client.zcard(Keys("tasks").retry) == 0
    assert not marker.exists(), "a module outside the allow-list was imported"
    log = svc.output()
    assert "Traceback" not in log
    assert sum(reason in line for line in log.splitlines()) == 1


def test_a_refused_task_fails_its_future_with_reason_refused(
    service: StartService, executor: Callable[..., Executor]
) -> None:
    service([task_pair(tasks=["taskapp:add"])])
    ex = executor()
    error = ex.submit(taskapp.square, 3).exception(timeout=20)
    assert isinstance(error, TaskError) and error.reason == "refused"
    assert "'taskapp:square' is not in this queue's allow-list" in error.message
    assert ex.submit("taskapp:add", 2, 3).result(timeout=20) == 5


def test_a_huge_argument_list_passes(
    service: StartService, executor: Callable[..., Executor]
) -> None:
    service([task_pair()])
    assert executor().submit(taskapp.count, *range(200_000)).result(timeout=30) == 200_000


def test_shutdown_and_with_work_as_the_standard_library_documents(
    service: StartService, redis_server: RedisServer
) -> None:
    service([task_pair()])
    client = redis_server.client()
    ex = Executor(redis_server.url, "tasks")
    running = ex.submit(taskapp.sleep, 1.0, "running")
    wait_for(lambda: client.llen("sleep:started") == 1, timeout=10, what="the task to start")
    waiting = [ex.submit(taskapp.sleep, 0, f"w{i}") for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=0) == "running"
    assert all(f.cancelled() for f in waiting)
    assert client.llen("tasks") == 0 and not client.exists(ex.reply_key)
    with pytest.raises(RuntimeError):
        ex.submit(taskapp.add, 1, 2)
    ex.shutdown()  # a second time: harmless, and leaves no key behind
    assert not client.exists(ex.reply_key)
    with Executor(redis_server.url, "tasks") as ex2:
        future = ex2.submit(taskapp.add, 2, 2)
    assert future.done() and future.result() == 4


@pytest.mark.slow
def test_an_executor_waits_out_a_redis_restart(
    service: StartService, redis_server: RedisServer, executor: Callable[..., Executor]
) -> None:
    service([task_pair()])
    ex = executor()
    assert ex.submit(taskapp.add, 1, 1).result(timeout=20) == 2
    future = ex.submit(taskapp.sleep, 2.0, "across")
    wait_for(
        lambda: redis_server.client().llen("sleep:started") == 1, timeout=10, what="task start"
    )
    redis_server.stop()
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(timeout=1)  # the existing timeout applies: no hang
    redis_server.start()  # same port, appendfsync always: the queue and replies are kept
    assert future.result(timeout=60) == "across"
    assert ex.submit(taskapp.add, 2, 2).result(timeout=30) == 4


def test_the_push_and_submit_commands(service: StartService, redis_server: RedisServer) -> None:
    svc = service([task_pair(max_attempts=1), {"queue": "raw", "handler": "testapp:handle"}])
    config = str(svc.config_path)
    env = svc.env
    client = redis_server.client()

    done = run_cli("push", "-c", config, "--queue", "raw", stdin="one\ntwo\nthree\n", env=env)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: client.llen("done") == 3, timeout=15, what="the pushed lines")
    assert sorted(client.lrange("done", 0, -1)) == [b"one", b"three", b"two"]

    message = '{"task": "taskapp:add", "args": [20, 22], "reply_to": "tasks:replies:cli"}'
    assert run_cli("push", "-c", config, "--queue", "tasks", message, env=env).returncode == 0
    popped = client.brpop(["tasks:replies:cli"], timeout=20)
    assert popped is not None and json.loads(popped[1])["result"] == 42

    done = run_cli("submit", "-c", config, "--queue", "tasks", "taskapp:job", "--args", "[1, 2]",
                   "--kwargs", '{"scale": 10}', "--wait", "30", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 20

    done = run_cli("submit", "-c", config, "--queue", "tasks", "taskapp:fail", "--args",
                   '["from the cli"]', "--wait", env=env)  # fmt: skip
    assert done.returncode == 1
    assert "failed (raised): ValueError: from the cli" in done.stderr

    done = run_cli("submit", "-c", config, "--queue", "tasks", "taskapp:add", "--args", "[1, 1]",
                   env=env)  # fmt: skip
    assert done.returncode == 0 and len(done.stdout.strip()) == 32  # the task id: 128 bits

    done = run_cli("submit", "-c", config, "--queue", "raw", "taskapp:add", env=env)
    assert done.returncode == 1 and "not a task queue" in done.stderr

    # `status` shows the task pair like any other: its worker, its count, its dead letter.
    def task_pair_status() -> dict[str, Any] | None:
        done = run_cli("status", "-c", config, "--json", env=env)
        (status,) = [p for p in json.loads(done.stdout) if p["queue"] == "tasks"]
        workers = status["snapshot"]["workers"]
        # The keeper publishes a worker's counters with its lease, every few seconds.
        counts = workers[0].get("succeeded", 0) + workers[0].get("failed", 0) if workers else 0
        return status if counts >= 4 else None

    status = wait_for(task_pair_status, timeout=15, what="status to show the task pair's counts")
    assert status["snapshot"]["dead"] == 1


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ("[1e400, 1]", "the number 1e400 is out of range"),
        ("[NaN, 1]", "NaN is not JSON"),
        ('{"x": -Infinity}', "-Infinity is not JSON"),
        ("[" * 100_000, "not valid JSON (maximum recursion depth"),
    ],
    ids=["1e400", "nan", "minus-infinity", "deep"],
)
@pytest.mark.service
def test_submit_refuses_arguments_no_json_parser_reads_and_sends_nothing(
    redis_server: RedisServer, tmp_path: Path, args: str, reason: str
) -> None:
    config = write_config(tmp_path / "rqworkers.toml", redis_server.url, [task_pair()])
    option = "--kwargs" if args.startswith("{") else "--args"
    done = run_cli("submit", "-c", str(config), "taskapp:add", option, args, "--wait", "5")
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert f"error: argument {option}: " in done.stderr.splitlines()[-1]
    assert reason in done.stderr.splitlines()[-1]
    assert redis_server.client().keys() == [], "nothing was sent"


@pytest.mark.slow
@pytest.mark.service
def test_producer_and_executor_on_a_cluster_and_through_sentinels(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Every URL form the config accepts: a task pair on a Redis Cluster, served to an
    Executor and a Producer; a Producer through Sentinel reaches the master."""
    processes = Processes()
    svc: Service | None = None
    try:
        cluster = Cluster(processes, tmp_path / "cluster").start()
        path = write_config(tmp_path / "cluster.toml", cluster.url, [task_pair(queue="{tasks}")],
                            manager={"check_interval": 0.2, "shutdown_timeout": 10.0})  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
        env["TESTAPP_REDIS_URL"] = redis_server.url
        svc = Service(path, tmp_path, env).start()
        with Executor(cluster.url, "{tasks}") as executor:
            assert executor.submit(taskapp.add, 1, 2).result(timeout=30) == 3
            assert list(executor.map(taskapp.square, range(100), timeout=30)) == [
                i * i for i in range(100)
            ]
        producer = Producer(cluster.url)
        producer.submit("{tasks}", "taskapp:add", (2, 3), reply_to="{tasks}:replies:mine")
        assert producer.wait_reply("{tasks}:replies:mine", timeout=30) == 5

        sentinels = SentinelSetup(processes, tmp_path / "sentinel").start()
        through = Producer(sentinels.url)
        through.push("raw", b"one", "two")
        task_id = through.submit("tasks", "taskapp:add", (1, 1))
        master = sentinels.master.client()
        assert master.lrange("raw", 0, -1) == [b"two", b"one"]
        assert json.loads(master.lindex("tasks", 0))["id"] == task_id
    finally:
        if svc is not None:
            svc.cleanup()
        processes.kill_all()


def test_a_reply_list_of_the_wrong_type_fails_the_futures_instead_of_hanging_them(
    executor: Callable[..., Executor], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRONGTYPE never passes by waiting: the pending future fails with the cause, and so
    does every later submit, rather than wait forever for replies no one can read."""
    from rqworkers.client import executor as executor_module

    monkeypatch.setattr(executor_module, "_BLOCK", 0.1)  # the reader notices within 0.1 s
    ex = executor()
    future = ex.submit(taskapp.square, 3)  # no worker runs: it waits in the queue
    redis_server.client().set(ex.reply_key, b"not a list")
    with pytest.raises(RqworkersError, match="WRONGTYPE"):
        future.result(timeout=10)
    with pytest.raises(RqworkersError, match="cannot be read"):
        ex.submit(taskapp.square, 4)
