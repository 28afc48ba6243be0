"""Task messages without the service: the format, the allow-list, replies, task pairs in the
config, and `TaskHandler` driven directly against a real redis-server."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rqworkers.client import tasks
from rqworkers.client.producer import Producer
from rqworkers.client.tasks import AllowList, TaskError
from rqworkers.config import PairSettings, load
from rqworkers.errors import ConfigError, MessageTimeout, Refused
from rqworkers.ops import checks
from rqworkers.store.keys import Keys
from rqworkers.worker.alarm import ALARM
from rqworkers.worker.taskhandler import TaskHandler
from rqworkers.worker.taskhandler import load as load_handler
from tests.support import APPS, REPO, RedisServer


@pytest.fixture(autouse=True)
def apps_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test apps, where a worker finds them through its PYTHONPATH."""
    monkeypatch.syspath_prepend(str(APPS))


@pytest.fixture
def recorded_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The file that `recorded_import` writes if anything ever imports it."""
    marker = tmp_path / "imported"
    monkeypatch.setenv("RECORDED_IMPORT_FILE", str(marker))
    sys.modules.pop("recorded_import", None)
    yield marker
    sys.modules.pop("recorded_import", None)


# --- the message format ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"hello", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"[1, 2]", "a JSON array, not an object"),
        (b'"taskapp:add"', "a JSON string, not an object"),
        (b"42", "a JSON number, not an object"),
        (b"null", "a JSON null, not an object"),
        (b'{"args": [1]}', "no 'task' field"),
        (b'{"task": 7}', "'task' must be 'module:function'"),
        (b'{"task": "taskapp"}', "'task' must be 'module:function'"),
        (b'{"task": "taskapp:add.__globals__"}', "'task' must be 'module:function'"),
        (b'{"task": "taskapp:add", "args": {"a": 1}}', "'args' must be a list, not a JSON object"),
        (b'{"task": "taskapp:add", "args": "12"}', "'args' must be a list, not a JSON string"),
        (b'{"task": "taskapp:add", "kwargs": [1]}', "'kwargs' must be an object"),
        (b'{"task": "taskapp:add", "id": 5}', "'id' must be a non-empty string"),
        (b'{"task": "taskapp:add", "timeout": -1}', "'timeout' must be a positive number"),
        (b'{"task": "taskapp:add", "timeout": true}', "'timeout' must be a positive number"),
        (b'{"task": "taskapp:add", "timeout": Infinity}', "not valid JSON (Infinity is not JSON)"),
        (b'{"task": "taskapp:add", "result_ttl": 0}', "'result_ttl' must be a positive number"),
        (b'{"task": "taskapp:add", "reply_to": ""}', "'reply_to' must be a non-empty string"),
        (b'{"task": null}', "'task' must be 'module:function', not null"),
        (b'{"task": {"a": 1}}', "'task' must be 'module:function'"),
        (b'{"task": false}', "'task' must be 'module:function'"),
        (b'{"task": "taskapp:add", "id": null}', "'id' must be a non-empty string"),
        (b'{"task": "taskapp:add", "timeout": 0}', "'timeout' must be a positive number"),
        (b'{"task": "taskapp:add", "timeout": NaN}', "not valid JSON (NaN is not JSON)"),
        (b'{"task": "taskapp:add", "timeout": 1e400}', "the number 1e400 is out of range"),
        (b'{"task": "taskapp:add", "timeout": "5"}', "'timeout' must be a positive number"),
        (b'{"task": "taskapp:add", "result_ttl": -1}', "'result_ttl' must be a positive number"),
        (b'{"task": "taskapp:add", "result_ttl": NaN}', "not valid JSON (NaN is not JSON)"),
        (b'{"task": "taskapp:add", "result_ttl": 1e300}', "'result_ttl' must be a positive number"),
        (b'{"task": "taskapp:add", "reply_to": 5}', "'reply_to' must be a non-empty string"),
        (b'{"task": "taskapp:add", "on_success": "x"}', "'on_success' must be 'module:function'"),
        (b'{"task": "taskapp:add", "agrs": []}', "unknown field(s): 'agrs'"),
        (b'{"v": 2, "task": "taskapp:add"}', "version 2 is not supported"),
    ],
)
def test_a_message_that_cannot_be_read_is_refused_with_its_reason(
    payload: bytes, reason: str
) -> None:
    with pytest.raises(Refused) as info:
        tasks.parse(payload)
    assert reason in str(info.value)


def test_only_task_is_required_and_a_missing_id_is_the_same_for_every_retry() -> None:
    message = b'{"task": "myapp.jobs:add"}'
    task = tasks.parse(message)
    assert (task.task, task.args, task.kwargs, task.timeout, task.reply_to) == (
        "myapp.jobs:add", [], {}, None, None,
    )  # fmt: skip
    assert task.result_ttl == tasks.DEFAULT_RESULT_TTL
    assert task.id and tasks.parse(message).id == task.id
    assert tasks.parse(b'{"task": "myapp.jobs:add", "args": [1]}').id != task.id


def test_a_message_survives_encoding_and_parsing_unchanged() -> None:
    sent = Producer.task(
        "myapp.jobs:add", (1, "two", [3.5], {"four": None}), {"é": "ü"}, timeout=2.5,
        reply_to="replies", result_ttl=60, on_success="myapp.jobs:ok", on_failure="myapp.jobs:ko",
    )  # fmt: skip
    data = tasks.encode(sent)
    assert json.loads(data)["v"] == tasks.VERSION
    assert tasks.parse(data) == sent


def test_encoding_refuses_what_a_worker_would_refuse() -> None:
    with pytest.raises(ValueError, match="'task' must be 'module:function'"):
        tasks.encode(Producer.task("no colon"))
    with pytest.raises(ValueError, match="'timeout' must be a positive number"):
        tasks.encode(Producer.task("m:f", timeout=0))
    with pytest.raises(TypeError):
        tasks.encode(Producer.task("m:f", (object(),)))


def test_a_huge_argument_list_passes() -> None:
    args = list(range(1_000_000))
    task = tasks.parse(tasks.encode(Producer.task("taskapp:count", args)))
    assert len(task.args) == 1_000_000 and task.args[-1] == 999_999


_ADD = '{"task": "taskapp:add", "args": [1, 2]}'


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_ADD.encode("utf-16"), "not UTF-8"),  # with its byte-order mark
        (_ADD.encode("utf-16-le"), "a NUL byte"),
        (_ADD.encode("utf-16-be"), "a NUL byte"),
        (_ADD.encode("utf-32"), "not UTF-8"),
        (_ADD.encode("utf-32-be"), "a NUL byte"),
        (b"\xef\xbb\xbf" + _ADD.encode(), "byte-order mark"),
        (b'{"task": "taskapp:add", "args": ["\xe9", 1]}', "not UTF-8"),  # Latin-1
        (b'{"task": "taskapp:add", "args": ["\xed\xa0\x80"]}', "not UTF-8"),  # a surrogate
        (b'{"task": "taskapp:add", "args": [NaN, 1]}', "NaN is not JSON"),
        (b'{"task": "taskapp:add", "args": [Infinity, 1]}', "Infinity is not JSON"),
        (b'{"task": "taskapp:add", "kwargs": {"a": -Infinity}}', "-Infinity is not JSON"),
        (b'{"task": "taskapp:add", "args": [1e400, 1]}', "1e400 is out of range"),
        (b'{"task": "taskapp:add", "args": [-1.5e308, 1e309]}', "1e309 is out of range"),
    ],
    ids=[
        "utf-16",
        "utf-16-le",
        "utf-16-be",
        "utf-32",
        "utf-32-be",
        "utf-8-bom",
        "latin-1",
        "surrogate",
        "nan",
        "infinity",
        "minus-infinity",
        "1e400",
        "1e309",
    ],
)
def test_a_message_is_utf8_json_without_nan_or_infinity(payload: bytes, reason: str) -> None:
    with pytest.raises(Refused) as info:
        tasks.parse(payload)
    text = str(info.value)
    assert text.startswith("not a task message: not valid JSON (") and reason in text
    assert "\n" not in text and len(text) < 200, "one short reason line"


def test_utf8_text_and_big_finite_numbers_pass() -> None:
    task = tasks.parse('{"task": "taskapp:add", "args": ["é€😀", 1.5e308, -1e-400, 10]}'.encode())
    assert task.args == ["é€😀", 1.5e308, -0.0, 10]
    assert tasks.parse(b'{"task": "taskapp:add", "args": [' + b"9" * 400 + b"]}").args[0] > 1e308


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_never_sent(value: float) -> None:
    with pytest.raises(TypeError, match="cannot be encoded as JSON"):
        tasks.encode(Producer.task("m:f", (1, [value])))
    with pytest.raises(TypeError, match="cannot be encoded as JSON"):
        tasks.encode(Producer.task("m:f", kwargs={"x": {"y": value}}))
    with pytest.raises(TypeError, match="cannot be encoded as JSON"):
        tasks.success_reply("id", {"mean": value})


def test_path_of_names_module_level_functions_only() -> None:
    import taskapp

    assert tasks.path_of(taskapp.add) == "taskapp:add"
    assert tasks.path_of("taskapp:add") == "taskapp:add"

    def nested() -> None: ...

    for bad in (nested, lambda: None, TaskError.from_dead_letter, "taskapp"):
        with pytest.raises(ValueError):
            tasks.path_of(bad)


def test_a_function_of_a_script_run_as_main_is_refused_with_advice(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "from rqworkers.client import tasks\n"
        "def work(): pass\n"
        "try:\n    tasks.path_of(work)\nexcept ValueError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert "move it to a module" in out


# --- the allow-list ----------------------------------------------------------------------


def test_allow_list_patterns_are_module_function_or_module_star() -> None:
    for good in ("myapp.jobs:*", "reports:build", "a.b.c:_x"):
        assert tasks.pattern_problem(good) is None
    for bad in ("myapp.jobs", "*:*", "myapp.*:f", "m:f.g", "m:", ":f", "m:f*", "os:sys tem"):
        assert tasks.pattern_problem(bad), bad


def test_the_allow_list_is_judged_on_the_name_before_any_import(recorded_import: Path) -> None:
    allowed = AllowList(["taskapp:*", "reports:build"])
    assert allowed.permits("taskapp:add") and allowed.permits("reports:build")
    for path in ("recorded_import:run", "os:system", "builtins:eval", "reports:other",
                 "taskapp:_private", "taskapp.sub:add", "taskapp:add.__globals__"):  # fmt: skip
        assert not allowed.permits(path), path
        with pytest.raises(Refused, match="not in this queue's allow-list"):
            allowed.resolve(path)
    assert "recorded_import" not in sys.modules
    assert not recorded_import.exists()


def test_a_wildcard_allows_only_public_functions_defined_in_the_module() -> None:
    allowed = AllowList(["taskapp:*"])
    import taskapp

    assert allowed.resolve("taskapp:add") is taskapp.add
    with pytest.raises(Refused, match="not a function defined in 'taskapp'"):
        allowed.resolve("taskapp:system")  # `from os import system` in taskapp
    with pytest.raises(Refused, match="not a function defined in 'taskapp'"):
        allowed.resolve("taskapp:NotAFunction")
    with pytest.raises(Refused, match="does not exist"):
        allowed.resolve("taskapp:nope")


def test_an_allow_list_problem_names_the_module_or_the_function(recorded_import: Path) -> None:
    assert AllowList(["taskapp:*", "taskapp:add"]).problems() == []
    problems = AllowList(["no_such_module_here:*", "taskapp:nope"]).problems()
    assert "cannot import 'no_such_module_here'" in problems[0]
    assert "'taskapp' has no 'nope'" in problems[1]


# --- replies -----------------------------------------------------------------------------


def test_replies_carry_the_result_or_the_error() -> None:
    assert tasks.read_reply(tasks.success_reply("id1", {"a": [1]})) == ("id1", {"a": [1]}, None)
    with pytest.raises(TypeError, match="cannot be encoded as JSON"):
        tasks.success_reply("id1", {1, 2})
    nested: list[object] = []
    for _ in range(100_000):  # deeper than the encoder recurses: refused as the others are
        nested = [nested]
    with pytest.raises(TypeError, match="cannot be encoded as JSON: nested too deeply"):
        tasks.success_reply("id1", nested)
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        error = TaskError.from_dead_letter("id2", "ValueError: bad value", exc)
    task_id, result, got = tasks.read_reply(tasks.failure_reply(error))
    assert (task_id, result) == ("id2", None)
    assert got is not None
    assert (got.reason, got.type, got.message) == ("raised", "ValueError", "bad value")
    assert "raise ValueError" in got.traceback and "Traceback" in got.traceback


def test_a_failure_says_whether_the_task_raised_timed_out_died_or_was_refused() -> None:
    cases: list[tuple[BaseException | None, str]] = [
        (ValueError("x"), tasks.RAISED),
        (MessageTimeout(), tasks.TIMEOUT),
        (Refused("not allowed"), tasks.REFUSED),
        (None, tasks.DEAD_LETTERED),
    ]
    for error, reason in cases:
        failure = TaskError.from_dead_letter("id", "killed by signal 9 (SIGKILL)", error, 2.0)
        assert failure.reason == reason
    lost = TaskError.from_dead_letter("id", "killed by signal 9 (SIGKILL)", None)
    assert lost.message == "killed by signal 9 (SIGKILL)"
    assert TaskError.from_dead_letter("id", "t", MessageTimeout(), 2.0).message == (
        "timeout after 2s"
    )


# --- task pairs in the config ------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rqworkers.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_task_pair_is_declared_with_tasks_in_defaults_or_workers(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [hosts]
        local = "redis://127.0.0.1:6379/0"
        [defaults]
        handler = "rqworkers.examples:log_message"
        [[workers]]
        host = "local"
        queue = "raw"
        [[workers]]
        host = "local"
        queue = "tasks"
        tasks = ["myapp.jobs:*", "reports:build"]
        """,
    )
    raw, task_pair = load(path, environ={}).pairs
    assert raw.handler == "rqworkers.examples:log_message" and raw.tasks is None
    assert task_pair.handler is None and task_pair.tasks == ("myapp.jobs:*", "reports:build")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('handler = "m:f"\ntasks = ["m:*"]', "workers[0]: set `handler` (raw payloads) or"),
        ('tasks = ["m"]', "workers[0].tasks: 'm' is not of the form 'module:function'"),
        ("tasks = []", "workers[0].tasks: "),
        ("", "workers[0].handler: required setting is missing"),
    ],
)
def test_a_pair_has_handler_or_tasks_never_both(tmp_path: Path, entry: str, problem: str) -> None:
    path = write_config(
        tmp_path, f'[[workers]]\nhost = "redis://127.0.0.1:6379/0"\nqueue = "q"\n{entry}\n'
    )
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert any(problem in line for line in str(info.value).splitlines()), str(info.value)


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.service
def test_check_and_run_refuse_a_pair_with_both(tmp_path: Path, command: str) -> None:
    path = write_config(
        tmp_path,
        """
        [[workers]]
        host = "redis://127.0.0.1:6379/0"
        queue = "q"
        handler = "rqworkers.examples:log_message"
        tasks = ["rqworkers.examples:square"]
        """,
    )
    done = subprocess.run(
        [sys.executable, "-m", "rqworkers", command, "-c", str(path)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{path}: workers[0]: set `handler` (raw payloads) or `tasks`" in done.stderr
    assert "not both" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.service
def test_check_reports_an_allow_list_that_does_not_import(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [[workers]]
        host = "redis://127.0.0.1:6379/0"
        queue = "tasks"
        tasks = ["no_such_module_here:*", "taskapp:nope"]
        """,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "rqworkers", "check", "-c", str(path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "of queue 'tasks': cannot import 'no_such_module_here'" in done.stderr
    assert "'taskapp' has no 'nope'" in done.stderr
    assert "Traceback" not in done.stderr
    config = load(path, environ={})
    assert len(checks.handler_problems(config)) == 1


# --- TaskHandler, driven directly ----------------------------------------------------------


@pytest.fixture
def handler(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskHandler]:
    monkeypatch.setenv("TESTAPP_REDIS_URL", redis_server.url)
    import testapp  # taskapp records through testapp's client

    monkeypatch.setattr(testapp, "_client", None)  # its client is for this test's server
    pair = PairSettings(
        host="local", queue="tasks", tasks=("taskapp:*",), timeout=5.0, url=redis_server.url
    )
    made = load_handler(pair)
    assert isinstance(made, TaskHandler)
    made.setup()
    yield made
    made.teardown()


def test_the_handler_runs_the_task_and_replies_before_the_ack(
    handler: TaskHandler, redis_server: RedisServer
) -> None:
    r = "tasks:replies:r"
    message = tasks.encode(Producer.task("taskapp:job", (7, 6), {"scale": 2}, reply_to=r))
    result, reply = handler.run(message)
    assert result["result"] == 12 and reply is not None and reply[0] == r
    client = redis_server.client()
    assert client.exists(r) == 0, "replies travel together, just before the acks"
    assert handler.write_replies([]) == [] and client.exists(r) == 0
    assert handler.write_replies([reply]) == [None]
    assert 0 < client.pttl(r) <= tasks.DEFAULT_RESULT_TTL * 1000
    task_id, result, error = tasks.read_reply(client.rpop(r))
    assert (task_id, result["result"], error) == (tasks.parse(message).id, 12, None)


def test_the_messages_own_timeout_interrupts_it_within_the_pairs(handler: TaskHandler) -> None:
    ALARM.install()

    def under_the_pairs_timeout() -> float:
        message = tasks.encode(Producer.task("taskapp:sleep", (3,), timeout=0.2))
        with pytest.raises(MessageTimeout):
            handler.handle(message)
        left = ALARM.left()
        assert left is not None and 4.0 < left < 5.0, "the pair's deadline holds again"
        assert handler.handle(tasks.encode(Producer.task("taskapp:add", (1, 2), timeout=1))) == 3
        return left

    try:
        assert ALARM.call(5.0, under_the_pairs_timeout) > 4.0  # what the worker runs it in
        assert ALARM.left() is None
    finally:
        ALARM.disarm()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_a_task_that_cannot_run_is_refused_before_it_is_called(
    handler: TaskHandler, redis_server: RedisServer, recorded_import: Path
) -> None:
    for task, args in [
        ("recorded_import:run", []),
        ("os:system", ["true"]),
        ("builtins:eval", ["1"]),
        ("taskapp:nope", []),
        ("taskapp:add", [1]),  # arguments that do not fit
        ("taskapp:add", [1, 2, 3]),
    ]:
        with pytest.raises(Refused):
            handler.handle(json.dumps({"task": task, "args": args}).encode())
    callback = {"task": "taskapp:add", "args": [1, 2], "on_success": "os:system"}
    with pytest.raises(Refused, match="'os:system' is not in this queue's allow-list"):
        handler.handle(json.dumps(callback).encode())
    assert not recorded_import.exists()
    assert redis_server.client().llen("sleep:started") == 0


OUTSIDE_THE_REPLY_KEYS = [
    "tasks",  # the queue itself
    "tasks:dead",
    "tasks:dead:reasons",
    "tasks:processing:node:1",
    "tasks:retry",
    "tasks:deliveries",  # any key of the queue's, even one added later
    "tasks:replies",  # not under `tasks:replies:`
    "victim",  # another queue
    "victim:processing:node:1",
    "bad:dead",
    "raw",
    "strkey",
    "TASKS:replies:x",
    " tasks:replies:x",
    "other:replies:x",  # another queue's callers
    "tasks:*",  # globs are literal keys, and these are not in the namespace
    "*",
    "tasks[:]replies:x",
    "x" * 100_000,
]


@pytest.mark.parametrize("key", OUTSIDE_THE_REPLY_KEYS, ids=lambda key: key[:30])
def test_a_reply_to_outside_the_queues_reply_keys_is_refused_before_anything_runs(
    handler: TaskHandler, redis_server: RedisServer, key: str
) -> None:
    client = redis_server.client()
    client.set("strkey", "x")
    client.lpush("victim", b"waiting")
    message = tasks.encode(
        Producer.task("taskapp:sleep", (0, "ran"), reply_to=key, result_ttl=0.001)
    )
    with pytest.raises(Refused, match="is not one of this queue's reply keys") as info:
        handler.handle(message)
    assert len(str(info.value)) < 300, "one short reason line, even for a huge key"
    handler.on_dead_letter(message, str(info.value), info.value)
    assert client.llen("sleep:started") == 0, "refused before the task ran"
    assert sorted(client.keys()) == [b"strkey", b"victim"], "nothing written anywhere"
    assert client.pttl("victim") == -1 and client.lrange("victim", 0, -1) == [b"waiting"]


@pytest.mark.parametrize(
    "key", ["tasks:replies:abc", "tasks:replies:*", "tasks:replies:[x]", "tasks:replies:a:b"]
)
def test_a_reply_to_in_the_queues_reply_namespace_is_written(
    handler: TaskHandler, redis_server: RedisServer, key: str
) -> None:
    message = tasks.encode(Producer.task("taskapp:add", (1, 2), reply_to=key))
    result, reply = handler.run(message)
    assert result == 3 and reply is not None
    assert handler.write_replies([reply]) == [None]
    assert redis_server.client().keys() == [key.encode()]


@pytest.mark.parametrize(
    "fields",
    [
        {"reply_to": 7},
        {"reply_to": ["tasks:replies:x"]},
        {"reply_to": {"key": "tasks:replies:x"}},
        {"reply_to": True},
        {"reply_to": "tasks:replies:\ud800"},  # a lone surrogate: no key can be written
    ],
    ids=["number", "list", "object", "bool", "surrogate"],
)
def test_a_reply_to_that_is_not_a_key_is_refused(
    handler: TaskHandler, redis_server: RedisServer, fields: dict[str, object]
) -> None:
    message = json.dumps({"task": "taskapp:add", "args": [1, 2], **fields}).encode()
    with pytest.raises(Refused, match="'reply_to' must be a non-empty string") as info:
        handler.handle(message)
    handler.on_dead_letter(message, str(info.value), info.value)
    assert redis_server.client().keys() == []


def test_reply_keys_widen_the_namespace_only_as_the_operator_says(
    redis_server: RedisServer,
) -> None:
    pair = PairSettings(
        host="local",
        queue="tasks",
        tasks=("taskapp:*",),
        reply_keys=("results:*", "done:[0-9]?"),
        url=redis_server.url,
    )
    made = TaskHandler(pair)
    try:
        for key in ("results:x", "done:1a", "tasks:replies:y"):
            message = tasks.encode(Producer.task("taskapp:add", (1, 2), reply_to=key))
            result, reply = made.run(message)
            assert result == 3 and reply is not None
            assert made.write_replies([reply]) == [None]
        for key in ("done:a1", "done:12x", "result", Keys("tasks").dead):
            message = tasks.encode(Producer.task("taskapp:add", (1, 2), reply_to=key))
            with pytest.raises(Refused, match=r"\(tasks:replies:\*, results:\*, done:\[0-9\]\?\)"):
                made.handle(message)
        keys = {k.decode() for k in redis_server.client().scan_iter()}
        assert keys == {"results:x", "done:1a", "tasks:replies:y"}
    finally:
        made.teardown()


_REFUSED_WITH_ON_FAILURE = {
    "reply-to-outside": {"task": "taskapp:fail", "args": ["x"], "reply_to": "victim"},
    "reply-to-dead-list": {"task": "taskapp:fail", "args": ["x"], "reply_to": "tasks:dead"},
    "arguments-do-not-fit": {"task": "taskapp:fail", "args": [1, 2, 3]},
    "not-allowed": {"task": "os:system", "args": ["true"]},
    "does-not-exist": {"task": "taskapp:nope"},
    "on-success-not-allowed": {"task": "taskapp:fail", "args": ["x"], "on_success": "os:system"},
    "unknown-field": {"task": "taskapp:fail", "args": ["x"], "agrs": []},
    "bad-timeout": {"task": "taskapp:fail", "args": ["x"], "timeout": -1},
}


@pytest.mark.parametrize("fields", _REFUSED_WITH_ON_FAILURE.values(), ids=_REFUSED_WITH_ON_FAILURE)
def test_a_refused_message_runs_nothing_not_even_its_on_failure(
    handler: TaskHandler, redis_server: RedisServer, fields: dict[str, object]
) -> None:
    client = redis_server.client()
    r = "tasks:replies:r"
    fields = {"reply_to": r, **fields, "on_failure": "taskapp:error_callback"}
    for message in (json.dumps(fields).encode(), json.dumps(fields).encode("utf-16")):
        with pytest.raises(Refused) as info:
            handler.handle(message)
        handler.on_dead_letter(message, str(info.value), info.value)
    assert client.llen("fail:attempts") == 0 and client.llen("callbacks:failure") == 0
    if fields["reply_to"] == r:  # the caller still hears, and only once per message
        replies = [tasks.read_reply(reply)[2] for reply in client.lrange(r, 0, -1)]
        assert [error.reason if error else None for error in replies] == ["refused"] * 2
    assert set(client.keys()) <= {r.encode()}


def test_a_dead_letter_replies_and_runs_on_failure_once(
    handler: TaskHandler, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    r = "tasks:replies:r"
    message = tasks.encode(
        Producer.task("taskapp:fail", ("no",), reply_to=r, on_failure="taskapp:error_callback")
    )
    with pytest.raises(ValueError) as info:
        handler.handle(message)
    handler.on_failure(message, info.value)  # a failure to be retried: nothing yet
    assert client.llen(r) == 0 and client.llen("callbacks:failure") == 0
    handler.on_dead_letter(message, "ValueError: no", info.value)
    _, _, error = tasks.read_reply(client.rpop(r))
    assert error is not None and (error.reason, error.type, error.message) == (
        "raised", "ValueError", "no",
    )  # fmt: skip
    assert client.lrange("callbacks:failure", 0, -1) == [b"raised|raised: ValueError: no"]
    # Refused for an unknown field, but its reply_to is still read: the caller hears.
    odd = b'{"task": "taskapp:add", "reply_to": "tasks:replies:r", "id": "x1", "bogus": 1}'
    handler.on_dead_letter(odd, "unknown field", Refused("unknown field"))
    assert tasks.read_reply(client.rpop(r))[2].reason == "refused"  # type: ignore[union-attr]
    handler.on_dead_letter(b"\xff not json", "not valid JSON", Refused("x"))  # nobody to tell
    assert client.llen(r) == 0
