"""The config loader: file → frozen `Config`, or one `ConfigError` listing every problem.

Every error test asserts the three things an operator needs on each line: the file, the
field path and what is wrong. The CLI tests run `python -m rqworkers check` for real.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rqworkers.config import (
    MAX_CONFIG_BYTES,
    MAX_PROCESSES_TOTAL,
    Config,
    PairSettings,
    load,
    max_processes,
    parse_size,
)
from rqworkers.errors import ConfigError
from rqworkers.store.connections import redact
from tests.support import APPS, REPO, RedisServer, free_port

EXAMPLE = REPO / "config" / "rqworkers.toml"
URL = "redis://127.0.0.1:6379/0"
WORKER = f"""
[[workers]]
host = "{URL}"
queue = "q"
handler = "rqworkers.examples:log_message"
"""


def write(tmp_path: Path, text: str, name: str = "rqworkers.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), environ={} if environ is None else environ)


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ={} if environ is None else environ)
    exc = info.value
    assert exc.source == str(path)
    assert exc.problems, "a ConfigError must carry at least one problem"
    # Every problem is rendered on its own line, naming the file first.
    assert str(exc) == "\n".join(f"{path}: {problem}" for problem in exc.problems)
    return exc


def problem_lines(exc: ConfigError, field: str) -> list[str]:
    """The rendered lines reporting a problem at exactly `field`."""
    lines = str(exc).split("\n")
    return [line for line in lines if line.startswith(f"{exc.source}: {field}: ")]


def assert_problem(exc: ConfigError, field: str, *fragments: str) -> str:
    lines = problem_lines(exc, field)
    assert lines, f"no problem reported at {field!r}; got:\n{exc}"
    matching = [line for line in lines if all(f in line for f in fragments)]
    assert matching, f"no line at {field!r} mentions {fragments!r}; got:\n{exc}"
    return matching[0]


# -- the example file and [defaults] -----------------------------------------------------------


def test_example_config_loads_with_defaults_merged() -> None:
    cfg = load(EXAMPLE, environ={"RQWORKERS_NODE": "node-a"})

    assert cfg.source == str(EXAMPLE)
    assert cfg.node == "node-a"
    assert cfg.manager.check_interval == 1.0
    assert cfg.manager.shutdown_timeout == 30.0
    assert cfg.logging.level == "INFO"
    assert cfg.logging.sample_succeeded == 1.0 and cfg.logging.format == "text"
    assert [p.queue for p in cfg.pairs] == ["queue1", "queue2"]
    q1, q2 = cfg.pairs
    for pair in cfg.pairs:
        assert pair.url == "redis://127.0.0.1:6379/0"  # ${REDIS_URL:-...} default
        assert pair.host == "local"
        assert pair.max_requests_jitter == 1000
        assert pair.timeout == 30.0
        assert pair.soft_memory_limit == 200_000_000
        assert pair.hard_memory_limit == 300_000_000
    assert q1.max_attempts == 5
    assert q1.handler == "rqworkers.examples:log_message"
    assert q1.max_requests == 10_000
    # Per-worker overrides win over [defaults].
    assert q2.handler == "rqworkers.examples:Counter"
    assert q2.max_requests == 100
    assert q2.max_attempts == 2 and q2.retry_delay == 0.5


def test_example_config_takes_values_from_the_environment() -> None:
    environ = {
        "REDIS_URL": "redis://:hunter2@redis.internal:6380/3",
        "RQWORKERS_LOG_LEVEL": "debug",
        "RQWORKERS_NODE": "node-b",
    }
    cfg = load(EXAMPLE, environ=environ)

    assert cfg.logging.level == "DEBUG"  # expanded, then normalised
    assert {p.url for p in cfg.pairs} == {"redis://:hunter2@redis.internal:6380/3"}
    assert {p.endpoint for p in cfg.pairs} == {"redis://:***@redis.internal:6380/3"}
    assert cfg.node == "node-b"


def test_node_comes_from_manager_then_environment_then_hostname(tmp_path: Path) -> None:
    assert load_text(tmp_path, WORKER).node == socket.gethostname()
    assert load_text(tmp_path, WORKER, {"RQWORKERS_NODE": "env-node"}).node == "env-node"
    text = '[manager]\nnode = "cfg-node"\n' + WORKER
    assert load_text(tmp_path, text, {"RQWORKERS_NODE": "env-node"}).node == "cfg-node"


def test_defaults_merge_into_every_worker_and_entries_override(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        f"""
        [hosts]
        main = "{URL}"

        [defaults]
        host = "main"
        handler = "app:handle"
        timeout = 5.0
        max_attempts = 3
        processes = 2

        [[workers]]
        queue = "a"

        [[workers]]
        queue = "b"
        timeout = 9.5
        handler = "app:Other"
        """,
    )
    a, b = cfg.pairs
    assert (a.queue, a.timeout, a.max_attempts, a.processes, a.handler) == (
        "a",
        5.0,
        3,
        2,
        "app:handle",
    )
    assert (b.queue, b.timeout, b.max_attempts, b.processes, b.handler) == (
        "b",
        9.5,
        3,
        2,
        "app:Other",
    )
    assert a.url == b.url == URL
    # Settings in neither place keep the built-in defaults.
    assert a.max_requests == 10_000
    assert a.retry_delay == 1.0
    assert a.soft_memory_limit == a.hard_memory_limit == 0


def test_a_config_without_optional_sections_gets_builtin_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, WORKER)
    (pair,) = cfg.pairs
    assert pair.url == URL
    assert (pair.processes, pair.max_requests, pair.timeout, pair.max_attempts) == (
        1,
        10_000,
        30.0,
        5,
    )
    assert cfg.manager.check_interval == 1.0
    assert cfg.logging.level == "INFO"


# -- ${VAR} expansion --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "environ", "expected"),
    [
        ("q-${NAME}", {"NAME": "x"}, "q-x"),
        ("q-${NAME:-dflt}", {}, "q-dflt"),
        ("q-${NAME:-dflt}", {"NAME": ""}, "q-dflt"),  # like the shell's :-
        ("q-${NAME:-dflt}", {"NAME": "set"}, "q-set"),
        ("q-${NAME:-}", {}, "q-"),
        ("q-${NAME}", {"NAME": ""}, "q-"),  # set but empty, no default: empty
        ("q-${A}-${B:-b}-${A}", {"A": "1"}, "q-1-b-1"),
        ("cost-$$5", {}, "cost-$5"),
        ("q-$${NAME}", {}, "q-${NAME}"),  # escaped: not a reference
        ("q-$$$${NAME}", {"NAME": "x"}, "q-$${NAME}"),
        ("q-$$${NAME}", {"NAME": "x"}, "q-$x"),
        ("a$b", {}, "a$b"),  # a lone $ is kept
        ("q-${NOT CLOSED", {}, "q-${NOT CLOSED"),
    ],
)
def test_variable_expansion(
    tmp_path: Path, written: str, environ: dict[str, str], expected: str
) -> None:
    text = WORKER.replace('queue = "q"', f'queue = "{written}"')
    assert load_text(tmp_path, text, environ).pairs[0].queue == expected


@pytest.mark.parametrize(
    ("written", "environ"),
    [
        ("${A:-${B}}", {"B": "b"}),  # used to give the text `${B}` and a stray `}`
        ("${A:-${B}}", {}),
        ("${A:-x${B:-y}z}", {"B": "b"}),
        ("q-${A:-${B}}", {"A": "set"}),  # refused even when the default is not needed
    ],
)
def test_a_reference_inside_a_default_is_refused(
    tmp_path: Path, written: str, environ: dict[str, str]
) -> None:
    text = WORKER.replace('queue = "q"', f'queue = "{written}"')
    exc = config_error(tmp_path, text, environ)
    assert_problem(exc, "workers[0].queue", "${A:-${...}}: a reference inside a default is not "
                   "supported; write the default itself, or set A")  # fmt: skip
    assert len(exc.problems) == 1


def test_expansion_reaches_hosts_and_numbers(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
        [hosts]
        main = "${REDIS_URL}"

        [[workers]]
        host = "main"
        queue = "q"
        handler = "app:handle"
        processes = "${PROCS:-3}"
        hard_memory_limit = "${LIMIT}"
        """,
        {"REDIS_URL": "redis://db:6379/2", "LIMIT": "1GiB"},
    )
    (pair,) = cfg.pairs
    assert pair.url == "redis://db:6379/2"
    assert pair.processes == 3
    assert pair.hard_memory_limit == 2**30


def test_missing_variables_are_all_reported_with_field_paths(tmp_path: Path) -> None:
    exc = config_error(
        tmp_path,
        """
        [hosts]
        main = "${REDIS_URL}"

        [logging]
        level = "${LEVEL}"

        [[workers]]
        host = "main"
        queue = "a"
        handler = "app:handle"

        [[workers]]
        host = "main"
        queue = "${QUEUE_B}"
        handler = "app:handle"
        """,
        {"UNRELATED": "1"},
    )
    assert_problem(exc, "hosts.main", "environment variable REDIS_URL is not set")
    assert_problem(exc, "logging.level", "environment variable LEVEL is not set")
    assert_problem(exc, "workers[1].queue", "environment variable QUEUE_B is not set")
    assert len(exc.problems) == 3


def test_load_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RQW_TEST_QUEUE", "from-os")
    text = WORKER.replace('queue = "q"', 'queue = "${RQW_TEST_QUEUE}"')
    assert load(write(tmp_path, text)).pairs[0].queue == "from-os"


# -- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('"200MB"', 200_000_000),
        ('"1GiB"', 2**30),
        ('"1gib"', 2**30),
        ('"1.5GB"', 1_500_000_000),
        ('"10 kb"', 10_000),
        ('"1k"', 1024),
        ('"64KiB"', 65536),
        ('"2M"', 2 * 1024**2),
        ('"1TB"', 10**12),
        ('"512b"', 512),
        ('" 4096 "', 4096),
        ('"1048576"', 1_048_576),
        ("1048576", 1_048_576),
        ("0", 0),
    ],
)
def test_sizes(tmp_path: Path, written: str, expected: int) -> None:
    text = f"[logging]\nmax_bytes = {written}\n" + WORKER
    assert load_text(tmp_path, text).logging.max_bytes == expected


@pytest.mark.parametrize("field", ["soft_memory_limit", "hard_memory_limit"])
def test_a_memory_limit_leaves_room_for_a_worker_to_start(tmp_path: Path, field: str) -> None:
    exc = config_error(tmp_path, WORKER + f'{field} = "10MB"\n')
    assert_problem(exc, f"workers[0].{field}", "10000000 bytes is below what a worker needs",
                   "use 0 (off) or at least 64MiB")  # fmt: skip
    assert getattr(load_text(tmp_path, WORKER + f'{field} = "64MiB"\n').pairs[0], field) == 2**26


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ('"lots"', "is not a size"),
        ('"200 MBs"', "is not a size"),
        ('"1e3"', "is not a size"),
        ('"-5MB"', "is not a size"),
        ('""', "is not a size"),
        ('"MB"', "is not a size"),
        ("1.5", "is not a size"),
        ("true", "expected a size"),
        ("-1", "cannot be negative"),
        ("[1]", "is not a size"),
    ],
)
def test_bad_sizes_are_rejected(tmp_path: Path, written: str, problem: str) -> None:
    exc = config_error(tmp_path, WORKER + f"soft_memory_limit = {written}\n")
    assert_problem(exc, "workers[0].soft_memory_limit", problem)


def test_parse_size_directly() -> None:
    assert parse_size("200MB") == 200_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size(7) == 7
    for bad in (True, False, -1, "x", 1.0, None, "12 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_logging_max_bytes_is_a_size(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[logging]\nmax_bytes = "1MiB"\n' + WORKER)
    assert cfg.logging.max_bytes == 1024**2
    exc = config_error(tmp_path, '[logging]\nmax_bytes = "huge"\n' + WORKER)
    assert_problem(exc, "logging.max_bytes", "is not a size")


def test_an_absurd_size_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    exc = config_error(tmp_path, WORKER + f'soft_memory_limit = "{"9" * 400}"\n')
    assert_problem(exc, "workers[0].soft_memory_limit")


# -- memory limits -----------------------------------------------------------------------------


@pytest.mark.parametrize(("soft", "hard"), [('"300MB"', '"200MB"'), ('"1GiB"', "1073741824")])
def test_soft_limit_at_or_above_hard_limit_is_rejected(
    tmp_path: Path, soft: str, hard: str
) -> None:
    text = WORKER + f"soft_memory_limit = {soft}\nhard_memory_limit = {hard}\n"
    exc = config_error(tmp_path, text)
    assert_problem(exc, "workers[0]", "soft_memory_limit", "must be below hard_memory_limit")


def test_soft_limit_is_checked_after_merging_defaults(tmp_path: Path) -> None:
    text = '[defaults]\nhard_memory_limit = "100MB"\n' + WORKER + 'soft_memory_limit = "150MB"\n'
    exc = config_error(tmp_path, text)
    assert_problem(exc, "workers[0]", "(150000000 bytes) must be below", "(100000000 bytes)")


@pytest.mark.parametrize(
    ("extra", "soft", "hard"),
    [
        ('soft_memory_limit = "100MB"\nhard_memory_limit = "200MB"\n', 100_000_000, 200_000_000),
        ('soft_memory_limit = "100MB"\n', 100_000_000, 0),  # 0 means "no limit"
        ('hard_memory_limit = "100MB"\n', 0, 100_000_000),
    ],
)
def test_valid_memory_limits(tmp_path: Path, extra: str, soft: int, hard: int) -> None:
    pair = load_text(tmp_path, WORKER + extra).pairs[0]
    assert (pair.soft_memory_limit, pair.hard_memory_limit) == (soft, hard)


# -- unknown keys and bad values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("typo = 1\n" + WORKER, "typo"),
        ("[manager]\nchek_interval = 2\n" + WORKER, "manager.chek_interval"),
        ('[logging]\nlvl = "INFO"\n' + WORKER, "logging.lvl"),
        ("[defaults]\nmax_request = 5\n" + WORKER, "defaults.max_request"),
        (WORKER + "max_request = 5\n", "workers[0].max_request"),
        ("[surprise]\nx = 1\n" + WORKER, "surprise"),
    ],
)
def test_unknown_keys_are_rejected_in_every_section(tmp_path: Path, text: str, field: str) -> None:
    exc = config_error(tmp_path, text)
    assert_problem(exc, field, "unknown setting")


def test_a_typo_in_defaults_is_reported_once_not_per_worker(tmp_path: Path) -> None:
    text = "[defaults]\nmax_request = 5\n" + WORKER + WORKER.replace('"q"', '"q2"')
    exc = config_error(tmp_path, text)
    assert len(problem_lines(exc, "defaults.max_request")) == 1
    assert exc.problems == ["defaults.max_request: unknown setting"]


def test_url_is_not_a_user_setting(tmp_path: Path) -> None:
    exc = config_error(tmp_path, WORKER + f'url = "{URL}"\n')
    assert_problem(exc, "workers[0].url", "unknown setting", "hosts go in `host`")
    exc = config_error(tmp_path, f'[defaults]\nurl = "{URL}"\n' + WORKER)
    assert_problem(exc, "defaults.url", "unknown setting")


def test_queue_in_defaults_is_rejected(tmp_path: Path) -> None:
    exc = config_error(tmp_path, '[defaults]\nqueue = "shared"\n' + WORKER)
    assert_problem(exc, "defaults.queue", "belongs in a [[workers]] entry")


def test_a_bad_value_in_defaults_is_reported_at_defaults(tmp_path: Path) -> None:
    text = (
        '[defaults]\ntimeout = -1\nsoft_memory_limit = "plenty"\n'
        + WORKER
        + WORKER.replace('"q"', '"q2"')
        + WORKER.replace('"q"', '"q3"')
        + "timeout = 4\n"  # overrides the bad default: not its problem
    )
    exc = config_error(tmp_path, text)
    assert len(problem_lines(exc, "defaults.timeout")) == 1
    assert_problem(exc, "defaults.timeout", "greater than or equal to 0.001")
    assert len(problem_lines(exc, "defaults.soft_memory_limit")) == 1
    assert_problem(exc, "defaults.soft_memory_limit", "'plenty' is not a size")
    assert not any(".timeout" in p and p.startswith("workers") for p in exc.problems)


def test_a_bad_value_in_a_worker_is_reported_at_the_worker(tmp_path: Path) -> None:
    text = "[defaults]\ntimeout = 3\n" + WORKER + WORKER.replace('"q"', '"q2"') + "timeout = 0\n"
    exc = config_error(tmp_path, text)
    assert_problem(exc, "workers[1].timeout", "greater than or equal to 0.001")
    assert not problem_lines(exc, "defaults.timeout")


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [
        ("processes = 0", "workers[0].processes", "greater than or equal to 1"),
        ("max_attempts = 0", "workers[0].max_attempts", "greater than or equal to 1"),
        ('timeout = "soon"', "workers[0].timeout", "a number (such as 1.5), not the string 'soon'"),
        ('processes = "3"', "workers[0].processes", "not the string '3' (write numbers without"),
        ("processes = true", "workers[0].processes", "expected an integer (such as 3), not true"),
        ("max_attempts = 2.0", "workers[0].max_attempts", "not 2.0 (a fraction"),
        ("timeout = true", "workers[0].timeout", "expected a number (such as 1.5), not true"),
        ("processes = 1000000000000", "workers[0].processes", "less than or equal to 4096"),
        ("timeout = inf", "workers[0].timeout", "finite number"),
        ("timeout = nan", "workers[0].timeout", "finite number"),
        ("timeout = 1e308", "workers[0].timeout", "less than or equal to 604800"),
        ("timeout = 1e-300", "workers[0].timeout", "greater than or equal to 0.001"),
        ("retry_delay = -inf", "workers[0].retry_delay", "finite number"),
        ("max_requests = 9223372036854775807", "workers[0].max_requests", "1000000000"),
        ('hard_memory_limit = "99999999999999999999TB"', "workers[0].hard_memory_limit", "less"),
        ('handler = "no colon here"', "workers[0].handler", "match pattern"),
        ('handler = "mod:"', "workers[0].handler", "match pattern"),
        ('queue = ""', "workers[0].queue", "at least 1 character"),
    ],
)
def test_bad_worker_values(tmp_path: Path, line: str, field: str, problem: str) -> None:
    key = line.split(" = ")[0]
    lines = [ln for ln in WORKER.splitlines() if not ln.startswith(f"{key} =")]
    exc = config_error(tmp_path, "\n".join([*lines, line, ""]))
    assert_problem(exc, field, problem)


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [
        ("check_interval = inf", "manager.check_interval", "finite number"),
        ("check_interval = 1e308", "manager.check_interval", "less than or equal to 60"),
        ("check_interval = 1e-300", "manager.check_interval", "greater than or equal to 0.01"),
        ("lease_ttl = inf", "manager.lease_ttl", "finite number"),
        ("lease_ttl = 1e12", "manager.lease_ttl", "less than or equal to 86400"),
        ("reclaim_interval = 1e-9", "manager.reclaim_interval", "greater than or equal to 0.1"),
        ("shutdown_timeout = nan", "manager.shutdown_timeout", "finite number"),
        ("restart_backoff_max = 1e300", "manager.restart_backoff_max", "less than or equal"),
        # A worker whose setup() fails would be forked again at once, hundreds of times a second.
        ("restart_backoff_max = 1e-300", "manager.restart_backoff_max", "or equal to 1"),
        ("restart_backoff_max = 0.5", "manager.restart_backoff_max", "greater than or equal to 1"),
        ("restart_backoff_max = nan", "manager.restart_backoff_max", "finite number"),
        ("restart_backoff_max = inf", "manager.restart_backoff_max", "finite number"),
        ('pid_file = "a\\u0000b"', "manager.pid_file", "holds a NUL character"),
        ('metrics_address = "127.0.0.1:99999"', "manager.metrics_address", "port from 1 to"),
        ('metrics_address = "127.0.0.1:0"', "manager.metrics_address", "port from 1 to 65535"),
        ('metrics_address = "127.0.0.1"', "manager.metrics_address", "not host:port"),
        ('metrics_address = "127.0.0.1:http"', "manager.metrics_address", "not host:port"),
        ('metrics_address = ":-1"', "manager.metrics_address", "not host:port"),
        ('metrics_address = "[::1]:9108"', "manager.metrics_address", "IPv4 only"),
        ('metrics_address = "::1:9108"', "manager.metrics_address", "IPv4 only"),
        ("metrics_address = 9108", "manager.metrics_address", "expected a string, not 9108"),
        ('pid_file = ""', "manager.pid_file", "at least 1 character"),
    ],
)
def test_bad_manager_values(tmp_path: Path, line: str, field: str, problem: str) -> None:
    exc = config_error(tmp_path, f"[manager]\n{line}\n" + WORKER)
    assert_problem(exc, field, problem)
    assert len(exc.problems) == 1


@pytest.mark.parametrize("kind", ["character device", "FIFO", "directory", "large file"])
def test_a_config_file_is_read_only_if_it_is_a_regular_file_of_sensible_size(
    tmp_path: Path, kind: str
) -> None:
    """`-c /dev/zero` used to end in a MemoryError, `-c` a FIFO in a hang."""
    if kind == "character device":
        path, problem = "/dev/zero", "is a character device, not a regular file"
    elif kind == "FIFO":
        path, problem = str(tmp_path / "fifo"), "is a FIFO, not a regular file"
        os.mkfifo(path)
    elif kind == "directory":
        path, problem = str(tmp_path), "is a directory, not a regular file"
    else:
        path, problem = str(tmp_path / "big.toml"), "is larger than 1024 KiB"
        Path(path).write_text(WORKER + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert info.value.problems == [f"cannot read: {problem}" + ("" if kind != "large file"
                                   else ": not a config file")]  # fmt: skip
    # Just under the bound is read.
    Path(tmp_path / "fits.toml").write_text(WORKER + "#" * (MAX_CONFIG_BYTES - len(WORKER) - 1))
    assert load(tmp_path / "fits.toml", environ={}).pairs


def test_a_pid_file_naming_a_directory_is_refused(tmp_path: Path) -> None:
    exc = config_error(tmp_path, f'[manager]\npid_file = "{tmp_path}"\n' + WORKER)
    assert_problem(exc, "manager.pid_file", f"{str(tmp_path)!r} is a directory")


@pytest.mark.parametrize(
    ("line", "field", "problem"),
    [
        ("backup_count = 1e9", "logging.backup_count", "expected an integer"),
        ("backup_count = 100000", "logging.backup_count", "less than or equal to 1000"),
        ("sample_succeeded = nan", "logging.sample_succeeded", "finite number"),
        ("sample_failed = inf", "logging.sample_failed", "finite number"),
        ('max_bytes = "1e400"', "logging.max_bytes", "is not a size"),
        ('file = "a\\u0000b"', "logging.file", "'a\\x00b' holds a NUL character: no file has"),
    ],
)
def test_bad_logging_values(tmp_path: Path, line: str, field: str, problem: str) -> None:
    exc = config_error(tmp_path, f"[logging]\n{line}\n" + WORKER)
    assert_problem(exc, field, problem)


def test_processes_of_all_pairs_together_are_bounded(tmp_path: Path) -> None:
    text = "[defaults]\nprocesses = 2048\n" + "".join(
        WORKER.replace('"q"', f'"q{i}"') for i in range(3)
    )
    exc = config_error(tmp_path, text)
    assert_problem(exc, "workers", "6144 processes in all; at most 4096")
    assert MAX_PROCESSES_TOTAL == 4096
    # Not this machine's ceiling: `status` and `dead` load the file on smaller machines.
    assert max_processes() < 4096
    load_text(tmp_path, WORKER + f"processes = {max_processes() + 1}\n")


@pytest.mark.parametrize(
    ("line", "environ", "field", "expected"),
    [
        ('processes = "${P}"', {"P": "3"}, "processes", 3),
        ('timeout = "${T:-2.5}"', {}, "timeout", 2.5),
        ('timeout = "${T}"', {"T": " 7 "}, "timeout", 7.0),
        ('max_attempts = "${N:-4}"', {}, "max_attempts", 4),
    ],
)
def test_numbers_may_come_from_the_environment(
    tmp_path: Path, line: str, environ: dict[str, str], field: str, expected: object
) -> None:
    (pair,) = load_text(tmp_path, WORKER + line + "\n", environ).pairs
    assert getattr(pair, field) == expected


@pytest.mark.parametrize(
    ("line", "environ", "field", "problem"),
    [
        ('processes = "${P}"', {"P": "true"}, "workers[0].processes", "not the string 'true'"),
        ('processes = "${P}"', {"P": "2.0"}, "workers[0].processes", "not 2.0"),
        ('timeout = "${T}"', {"T": "inf"}, "workers[0].timeout", "finite number"),
        ('timeout = "${T}"', {"T": "soon"}, "workers[0].timeout", "not the string 'soon'"),
    ],
)
def test_numbers_from_the_environment_are_checked_like_written_ones(
    tmp_path: Path, line: str, environ: dict[str, str], field: str, problem: str
) -> None:
    exc = config_error(tmp_path, WORKER + line + "\n", environ)
    assert_problem(exc, field, problem)


def test_missing_required_worker_settings_are_all_reported(tmp_path: Path) -> None:
    exc = config_error(tmp_path, f'[[workers]]\nhost = "{URL}"\n')
    assert_problem(exc, "workers[0].queue", "required setting is missing")
    assert_problem(exc, "workers[0].handler", "required setting is missing")


def test_problems_from_several_sections_are_reported_together(tmp_path: Path) -> None:
    text = '[manager]\ncheck_interval = 0\n[logging]\nlevel = "LOUD"\n' + WORKER
    exc = config_error(tmp_path, text)
    assert_problem(exc, "manager.check_interval", "greater than or equal to 0.01")
    assert_problem(exc, "logging.level", "'DEBUG'")


def test_logging_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load_text(tmp_path, '[logging]\nlevel = "warning"\n' + WORKER).logging.level == "WARNING"


# -- hosts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["nowhere", "http://127.0.0.1:6379", "127.0.0.1:6379", "Local"])
def test_a_host_that_is_neither_a_name_nor_a_url_is_rejected(tmp_path: Path, host: str) -> None:
    text = f'[hosts]\nlocal = "{URL}"\n' + WORKER.replace(f'host = "{URL}"', f'host = "{host}"')
    exc = config_error(tmp_path, text)
    assert_problem(exc, "workers[0].host", repr(host), "neither a [hosts] name nor a")


@pytest.mark.parametrize(
    "url", ["redis://r:6379/0", "rediss://:pw@r:6380/1", "unix:///run/redis.sock"]
)
def test_hosts_may_be_names_or_urls(tmp_path: Path, url: str) -> None:
    named = load_text(
        tmp_path, f'[hosts]\nmain = "{url}"\n' + WORKER.replace(f'host = "{URL}"', 'host = "main"')
    )
    assert named.pairs[0].url == url
    assert named.pairs[0].host == "main"
    direct = load_text(tmp_path, WORKER.replace(URL, url))
    assert direct.pairs[0].url == url


def test_a_host_name_pointing_to_a_bad_url_is_rejected(tmp_path: Path) -> None:
    text = '[hosts]\nmain = "db.example:6379"\n' + WORKER.replace(
        f'host = "{URL}"', 'host = "main"'
    )
    exc = config_error(tmp_path, text)
    # The entry is what needs fixing, so it is named; its users are not blamed as well.
    assert_problem(exc, "hosts.main", "'db.example:6379' is not a URL starting with redis://")
    assert len(exc.problems) == 1


@pytest.mark.parametrize(
    ("written", "fragment"),
    [
        ("${REDIS_URL", "'${REDIS_URL' is not a valid reference"),
        ("redis://127.0.0.1:${PORT/0", "'${PORT/0' is not a valid reference"),
        ("redis://${1HOST}:6379/0", "'${1HOST}' is not a valid reference"),
        ("redis://${A:-x}${B", "'${B' is not a valid reference"),
    ],
)
def test_a_broken_reference_in_hosts_names_the_host_entry(
    tmp_path: Path, written: str, fragment: str
) -> None:
    text = f'[hosts]\nmain = "{written}"\nspare = "{URL}"\n' + WORKER.replace(
        f'host = "{URL}"', 'host = "main"'
    )
    exc = config_error(tmp_path, text, {"REDIS_URL": URL, "PORT": "6379"})
    assert_problem(exc, "hosts.main", fragment, "write ${NAME} or ${NAME:-default}")
    assert not problem_lines(exc, "workers[0].host")
    assert not problem_lines(exc, "hosts.spare")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://127.0.0.1:99999/0"])
def test_a_malformed_url_is_a_config_error(tmp_path: Path, url: str) -> None:
    exc = config_error(tmp_path, WORKER.replace(URL, url))
    assert_problem(exc, "workers[0].host")


# -- duplicates --------------------------------------------------------------------------------


def test_a_duplicate_host_and_queue_pair_is_rejected(tmp_path: Path) -> None:
    exc = config_error(tmp_path, WORKER + WORKER.replace("log_message", "Counter"))
    assert_problem(exc, "workers[1]", "queue 'q' on this host is already declared in workers[0]")


def test_a_duplicate_through_a_host_alias_is_rejected(tmp_path: Path) -> None:
    alias = WORKER.replace(f'host = "{URL}"', 'host = "same"')
    exc = config_error(tmp_path, f'[hosts]\nsame = "{URL}"\n' + WORKER + alias)
    assert_problem(exc, "workers[1]", "already declared in workers[0]", "processes")


def test_the_same_queue_on_two_hosts_is_fine(tmp_path: Path) -> None:
    other = WORKER.replace(URL, "redis://127.0.0.1:6380/0")
    cfg = load_text(tmp_path, WORKER + other)
    assert [(p.url, p.queue) for p in cfg.pairs] == [
        (URL, "q"),
        ("redis://127.0.0.1:6380/0", "q"),
    ]


@pytest.mark.parametrize(
    "derived",
    [
        "q:dead",
        "q:dead:reasons",
        "q:retry",
        "q:processing:web-1:1",
        "q:workers",
        "q:lease:web-1:1",
        "q:reclaim:web-1:1",
        "q:op:web-1:1",
        "q:deliveries",
        "q:dead:2026",  # a future `<queue>:dead:*` key: any `q:...` name belongs to q
        "q:",
        "q::",
    ],
)
def test_a_queue_that_could_be_a_key_of_another_queue_on_its_host_is_refused(
    tmp_path: Path, derived: str
) -> None:
    # Declared after or before the queue it would shadow: refused either way.
    for text in (WORKER + WORKER.replace('"q"', f'"{derived}"'),
                 WORKER.replace('"q"', f'"{derived}"') + WORKER):  # fmt: skip
        exc = config_error(tmp_path, text)
        index = 1 if text.startswith(WORKER) else 0
        assert_problem(
            exc,
            f"workers[{index}].queue",
            f"{derived!r} could be a key of queue 'q' (workers[{1 - index}]) on the same host",
        )
        assert len(exc.problems) == 1


@pytest.mark.parametrize("name", ["q2", "qq:dead", "jobs:q", "Q:dead", "q-dead", "{q}:dead"])
def test_queue_names_that_share_a_prefix_only_are_fine(tmp_path: Path, name: str) -> None:
    cfg = load_text(tmp_path, WORKER + WORKER.replace('"q"', f'"{name}"'))
    assert [p.queue for p in cfg.pairs] == ["q", name]


def test_a_derived_name_on_another_host_is_fine(tmp_path: Path) -> None:
    other = WORKER.replace(URL, "redis://127.0.0.1:6379/1").replace('"q"', '"q:dead"')
    cfg = load_text(tmp_path, WORKER + other)
    assert [p.queue for p in cfg.pairs] == ["q", "q:dead"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("redis://127.0.0.1:6379/1", "redis://localhost:6379/1"),
        ("redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/01"),
        ("redis://127.0.0.1:6379/1", "redis://[::1]:6379?db=1"),
        ("redis://localhost/0", "redis://user:pw@LOCALHOST:6379"),
        ("redis://h:7000/0", "redis://h:7000/0?socket_timeout=5"),
        ("unix:///run/redis.sock?db=2", "unix:///run//redis.sock?db=02"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("queues", [("q", "q"), ("q", "q:dead")])
def test_two_spellings_of_one_server_and_database_are_one_host(
    tmp_path: Path, first: str, second: str, queues: tuple[str, str]
) -> None:
    """The same queue under two spellings of one URL used to pass even `check`: two pairs
    on one list. So did `q:dead` next to `q` spelled so, before `check` connected."""
    text = WORKER.replace(URL, first) + WORKER.replace(URL, second).replace('"q"', f'"{queues[1]}"')
    exc = config_error(tmp_path, text)
    wanted = (
        "queue 'q' is already declared on the same host in workers[0] (another spelling of "
        "its URL); use `processes` for more workers"
        if queues[1] == "q"
        else "'q:dead' could be a key of queue 'q' (workers[0]) on the same host"
    )
    assert_problem(exc, "workers[1].queue", wanted)
    assert len(exc.problems) == 1


@pytest.mark.parametrize(
    "other",
    ["redis://127.0.0.1:6379/2", "redis://127.0.0.1:6380/0", "redis://10.0.0.1:6379/0",
     "unix:///run/redis.sock"],
)  # fmt: skip
def test_the_same_queue_on_another_server_or_database_is_fine(tmp_path: Path, other: str) -> None:
    cfg = load_text(tmp_path, WORKER + WORKER.replace(URL, other))
    assert [p.queue for p in cfg.pairs] == ["q", "q"]


# -- the file itself ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(info.value) == f"{path}: file not found"


def test_invalid_toml(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "[[workers]\nqueue = 'q'\n")
    assert "not valid TOML" in str(exc)


def test_a_duplicate_toml_key_is_invalid_toml(tmp_path: Path) -> None:
    exc = config_error(tmp_path, WORKER + 'queue = "again"\n')
    assert "not valid TOML" in str(exc)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, environ={})  # a directory
    assert str(info.value).startswith(f"{tmp_path}: cannot read")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load(binary, environ={})
    assert str(info.value).startswith(f"{binary}: cannot read")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[manager]\ncheck_interval = 1.0\n", "required setting is missing"),
        ("workers = []\n", "at least 1 item"),
        ('workers = "q"\n', "expected a list, not the string 'q'"),
        ("workers = [1]\n", "expected a table, not 1"),
    ],
)
def test_workers_must_be_a_non_empty_list_of_tables(
    tmp_path: Path, text: str, problem: str
) -> None:
    exc = config_error(tmp_path, text)
    field = "workers[0]" if text == "workers = [1]\n" else "workers"
    assert_problem(exc, field, problem)


def test_an_empty_file_needs_workers(tmp_path: Path) -> None:
    exc = config_error(tmp_path, "")
    assert exc.problems == ["workers: required setting is missing"]


# -- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
        ("rediss://default:pa:ss@h/1", "rediss://default:***@h/1"),
        ("unix://:s3cret@/run/redis.sock", "unix://:***@/run/redis.sock"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
    ],
)
def test_redact_hides_passwords(url: str, expected: str) -> None:
    assert redact(url) == expected


@pytest.mark.parametrize(
    ("url", "secret"),
    [("redis://:p@ssword@h:6379/0", "ssword"), ("redis://h:6379/0?password=s3cretword", "s3cret")],
)
def test_redact_hides_every_password_redis_py_accepts(url: str, secret: str) -> None:
    assert secret not in redact(url)
    assert "***" in redact(url)


def test_endpoint_is_redacted() -> None:
    pair = PairSettings(host="h", queue="q", handler="m:f", url="redis://u:topsecret@h:1/0")
    assert pair.endpoint == "redis://u:***@h:1/0"
    assert "topsecret" not in pair.endpoint


# -- property: load never fails with anything but ConfigError ----------------------------------

_KNOWN_KEYS = sorted(
    {
        *PairSettings.model_fields,
        "check_interval",
        "shutdown_timeout",
        "restart_backoff_max",
        "node",
        "level",
        "file",
        "max_bytes",
        "backup_count",
        "format",
        "sample_succeeded",
        "sample_failed",
        "lease_ttl",
        "reclaim_interval",
        "pid_file",
        "metrics_address",
        "local",
    }
)
_TEMPLATE_PIECES = [
    "${A}",
    "${NOPE}",
    "${A:-x}",
    "${NOPE:-}",
    "$$",
    "$",
    "{",
    "}",
    ":",
    "redis://127.0.0.1:6379/0",
    "unix:///tmp/r.sock",
    "local",
    "app:handle",
    "rqworkers.examples:log_message",
    "MB",
    "GiB",
    "1",
    "0",
    "-",
    ".",
    " ",
]

_keys = st.one_of(
    st.sampled_from(_KNOWN_KEYS),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
    st.text(max_size=6),
)
_sizes = st.from_regex(r"\A-?\d{1,15}(\.\d{1,3})?\s?([kKmMgGtT][iI]?[bB]?|[bB])?\Z")
_strings = st.one_of(
    st.text(max_size=20),
    st.lists(st.sampled_from(_TEMPLATE_PIECES), max_size=5).map("".join),
    _sizes,
)
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    _strings,
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(_keys, inner, max_size=3),
    ),
    max_leaves=6,
)
_tables = st.dictionaries(_keys, _values, max_size=6)


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml_document(top: dict[str, Any], sections: dict[str, Any], workers: Any) -> str:
    lines = [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in sections.items():
        if name in top:
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in table.items())
    if isinstance(workers, list) and "workers" not in top:
        for entry in workers:
            lines.append("[[workers]]")
            lines.extend(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in entry.items())
    return "\n".join(lines) + "\n"


_sections = st.fixed_dictionaries(
    {},
    optional={name: _tables for name in ("manager", "logging", "hosts", "defaults", "surprise")},
)
_workers = st.one_of(
    st.none(),
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "host": st.sampled_from(["local", "redis://127.0.0.1:6379/0", "${A}", "nowhere"]),
                "queue": _strings,
                "handler": st.sampled_from(["app:handle", "bad", "${A:-m:f}"]),
            },
        ).flatmap(lambda base: _tables.map(lambda extra: {**extra, **base})),
        max_size=3,
    ),
)
_documents = st.one_of(
    st.builds(_toml_document, st.dictionaries(_keys, _values, max_size=2), _sections, _workers),
    st.builds(_toml_document, st.just({}), _sections, _workers),
    st.text(max_size=200),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=_documents,
    environ=st.dictionaries(st.sampled_from(["A", "B", "RQWORKERS_NODE"]), _strings, max_size=3),
)
def test_load_returns_a_config_or_raises_config_error(text: str, environ: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.toml"
        path.write_text(text, encoding="utf-8")
        try:
            cfg = load(path, environ=environ)
        except ConfigError as exc:
            event("ConfigError")
            assert exc.problems
            assert exc.source == str(path)
            assert str(exc) == "\n".join(f"{path}: {problem}" for problem in exc.problems)
        else:
            event("Config")
            assert isinstance(cfg, Config)
            assert cfg.pairs
            for pair in cfg.pairs:
                assert pair.url.startswith(("redis://", "rediss://", "unix://"))


# -- the CLI, for real -------------------------------------------------------------------------


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RQWORKERS_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
    return env


def rqworkers_check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rqworkers", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=path.parent,
        timeout=60,
    )


@pytest.mark.service
def test_cli_check_rejects_a_bad_config(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = write(tmp_path, WORKER + "max_request = 5\n")
    result = rqworkers_check(path, cli_env)
    assert result.returncode == 2, result
    assert "invalid configuration" in result.stderr
    assert f"{path}: workers[0].max_request: unknown setting" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.service
def test_cli_check_missing_file(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "absent.toml"
    result = rqworkers_check(path, cli_env)
    assert result.returncode == 2
    assert f"{path}: file not found" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("handler", "problem"),
    [
        ("badimport:handle", "ImportError: this module cannot be imported"),
        ("testapp:no_such_handler", "has no attribute 'no_such_handler'"),
        ("no_such_module_xyz:handle", "ModuleNotFoundError"),
    ],
)
@pytest.mark.service
def test_cli_check_reports_a_handler_that_cannot_be_imported(
    tmp_path: Path, cli_env: dict[str, str], handler: str, problem: str
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # the handler problem decides the exit code
    path = write(
        tmp_path, WORKER.replace(URL, url).replace("rqworkers.examples:log_message", handler)
    )
    result = rqworkers_check(path, cli_env)
    assert result.returncode == 2, result
    line = next(ln for ln in result.stderr.splitlines() if f"handler {handler!r}" in ln)
    assert line.startswith(f"{path}: ")
    assert "of queue 'q'" in line
    assert problem in line
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.service
def test_cli_check_passes_against_a_real_redis(
    tmp_path: Path, cli_env: dict[str, str], redis_server: RedisServer
) -> None:
    path = write(
        tmp_path,
        f"""
        [hosts]
        local = "{redis_server.url}"

        [defaults]
        host = "local"
        handler = "testapp:handle"

        [[workers]]
        queue = "one"

        [[workers]]
        queue = "two"
        handler = "testapp:Lifecycle"
        """,
    )
    result = rqworkers_check(path, cli_env)
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"{path}: ok (2 queues, 1 host reachable)"
    assert result.stderr == ""


@pytest.mark.service
def test_cli_check_fails_for_an_unreachable_host_without_leaking_its_password(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    secret = "pw-d0nt-l3ak"
    url = f"redis://admin:{secret}@127.0.0.1:{free_port()}/0"
    path = write(tmp_path, f'[hosts]\nlocal = "{url}"\n' + WORKER.replace(f'"{URL}"', '"local"'))
    result = rqworkers_check(path, cli_env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, result
    assert secret not in output
    assert f"{path}: redis at redis://admin:***@127.0.0.1:" in result.stderr
    assert "ConnectionError" in result.stderr
    assert "Traceback" not in output


@pytest.mark.service
def test_cli_check_does_not_leak_a_password_from_the_environment(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    secret = "env-s3cret-value"
    cli_env["RQW_TEST_URL"] = f"redis://:{secret}@127.0.0.1:{free_port()}/0"
    path = write(tmp_path, WORKER.replace(URL, "${RQW_TEST_URL}"))
    result = rqworkers_check(path, cli_env)
    assert result.returncode == 1, result
    assert secret not in result.stdout + result.stderr
    assert "redis://:***@127.0.0.1:" in result.stderr


@pytest.mark.service
def test_cli_check_reports_a_malformed_url_without_a_traceback(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    path = write(tmp_path, WORKER.replace(URL, "redis://127.0.0.1:notaport/0"))
    result = rqworkers_check(path, cli_env)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode in (1, 2)
    assert str(path) in result.stderr


def test_names_no_release_shipped_are_unknown_settings(tmp_path: Path) -> None:
    """`handled` and `failures` named the log shares before any release: no alias is kept."""
    path = tmp_path / "old.toml"
    path.write_text(
        "[logging]\nhandled = 0.5\nfailures = 0.25\n"
        '[[workers]]\nhost = "redis://127.0.0.1:6379/0"\nqueue = "q"\nhandler = "m:f"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    said = str(caught.value)
    assert "logging.handled: unknown setting" in said
    assert "logging.failures: unknown setting" in said
