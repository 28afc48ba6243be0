"""Property: every config that `load` accepts also runs.

Numbers are drawn for every numeric setting from plausible values and from the extremes
that used to pass `check` and then crash `run` (`inf`, `nan`, `1e308`, `1e-300`, 2**63,
`true`, `"3"` ...). Whatever loads must start for real: `rqworkers run` reaches "started"
for every worker, its workers take a message each, and it stops cleanly on SIGTERM; or it
refuses at start with exit code 2. Never a traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rqworkers.config import MAX_PROCESSES_TOTAL, MIN_RESTART_BACKOFF, Config, load
from rqworkers.errors import ConfigError
from tests.support import APPS, REPO, RedisServer, free_port, wait_for

EXTREMES: list[Any] = [
    math.inf, -math.inf, math.nan, 1e308, -1e308, 1e-300, 2**63 - 1, 2**64, -(2**63),
    10**12, 0, -1, 0.0, True, "3", "inf", "10MB", 1,
]  # fmt: skip

# Plausible values: what a person would write. Durations stay short so that a run of the
# property stays short.
_seconds = st.floats(min_value=0.0, max_value=3.0)
_counts = st.integers(min_value=0, max_value=3)
_shares = st.floats(min_value=0.0, max_value=1.0)

MANAGER = {
    "check_interval": st.floats(min_value=0.01, max_value=0.5),
    "shutdown_timeout": _seconds,
    "restart_backoff_max": st.floats(min_value=MIN_RESTART_BACKOFF, max_value=3.0),
    "lease_ttl": st.floats(min_value=1.0, max_value=60.0),
    "reclaim_interval": st.floats(min_value=0.1, max_value=3.0),
}
LOGGING = {
    "max_bytes": st.sampled_from([0, 1, "10MB", "1GB", 2**40]),
    "backup_count": _counts,
    "sample_succeeded": _shares,
    "sample_failed": _shares,
}
PAIR = {
    "processes": st.integers(min_value=1, max_value=2),
    "prefetch": st.integers(min_value=1, max_value=100),
    "max_requests": _counts,
    "max_requests_jitter": _counts,
    # Long enough for the test handler, whose failures (a timeout) may log a traceback.
    "timeout": st.floats(min_value=2.0, max_value=30.0),
    "timeout_grace": _seconds,
    "soft_memory_limit": st.sampled_from([0, "64MiB", "200MB"]),
    "hard_memory_limit": st.sampled_from([0, "300MB", 2**40]),
    "max_attempts": st.integers(min_value=1, max_value=3),
    "retry_delay": _seconds,
    "retry_delay_max": _seconds,
}
SECTIONS = {"manager": MANAGER, "logging": LOGGING, "defaults": PAIR}


def _section(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


_plausible = st.fixed_dictionaries(
    {
        **{name: _section(fields) for name, fields in SECTIONS.items()},
        "workers": st.lists(_section(PAIR), min_size=1, max_size=2),
    }
)
# Where an extreme goes: a field of a section, or of the first worker.
_places = st.sampled_from(
    [(name, field) for name, fields in SECTIONS.items() for field in fields]
    + [("workers", field) for field in PAIR]
)


def _with_extremes(
    document: dict[str, Any], extremes: list[tuple[tuple[str, str], Any]]
) -> dict[str, Any]:
    for (section, field), value in extremes:
        table = document["workers"][0] if section == "workers" else document[section]
        table[field] = value
    return document


# A plausible document with up to two fields set to an extreme, so that each extreme is
# tried alone as well as in company, and many documents still load.
documents = st.builds(
    _with_extremes,
    _plausible,
    st.lists(st.tuples(_places, st.sampled_from(EXTREMES)), max_size=2),
)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def render(document: dict[str, Any], url: str, manager: dict[str, Any]) -> str:
    """The TOML text: `manager` (a metrics address, a pid file) joins the drawn [manager]."""
    lines = [f'[hosts]\nlocal = "{url}"\n']
    for name in ("manager", "logging", "defaults"):
        table = {**document[name], **manager} if name == "manager" else document[name]
        lines += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items()), ""]
    for index, worker in enumerate(document["workers"]):
        lines += ["[[workers]]", 'host = "local"', f'queue = "q{index}"',
                  'handler = "testapp:handle"']  # fmt: skip
        lines += [*(f"{k} = {_toml(v)}" for k, v in worker.items()), ""]
    return "\n".join(lines)


def _loads(text: str) -> Config | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "drawn.toml"
        path.write_text(text)
        try:
            return load(path, environ={})
        except ConfigError as exc:
            assert exc.problems and all(str(path) in line for line in str(exc).splitlines())
            return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents)
def test_a_loaded_config_holds_only_finite_numbers_within_their_bounds(
    document: dict[str, Any],
) -> None:
    """The cheap half, run by default: extremes in every numeric field are refused by
    `load` (with a ConfigError naming the file), or come out finite and usable."""
    cfg = _loads(render(document, "redis://127.0.0.1:6379/0", {}))
    event("loads" if cfg else "refused")
    if cfg is None:
        return
    sections = [cfg.manager, cfg.logging, *cfg.pairs]
    # Every value but those of a setting declared a bool (`dashboard_private`): a number
    # must never arrive as one.
    numbers = [
        value
        for section in sections
        for name, value in section.model_dump().items()
        if type(section).model_fields[name].annotation is not bool
    ]
    for pair in cfg.pairs:
        assert pair.processes <= MAX_PROCESSES_TOTAL
        assert pair.timeout >= 0.001
    for value in numbers:
        if isinstance(value, int | float):
            assert not isinstance(value, bool) and math.isfinite(value) and value < 2**63
    assert 0.01 <= cfg.manager.check_interval <= 60


# -- the expensive half: real processes ----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for every example: starting one per example would dominate."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_until_started(
    path: Path, workdir: Path, server: RedisServer, cfg: Config
) -> tuple[int, str]:
    """`rqworkers run` until its workers have started and each queue's workers took a
    message, then SIGTERM; or until it exits by itself. Returns its exit code and output.
    The whole session is SIGKILLed at the end, whatever happened."""
    url, workers = server.url, sum(pair.processes for pair in cfg.pairs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]),
               TESTAPP_REDIS_URL=url)  # fmt: skip
    env.pop("RQWORKERS_LOG_LEVEL", None)
    log = workdir / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rqworkers", "run", "-c", str(path)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
            start_new_session=True,
        )  # fmt: skip
    try:
        started = wait_for(
            lambda: proc.poll() is not None or log.read_text().count(" started") >= workers + 1,
            timeout=60,
            what="every worker and the keeper started, or an exit",
        )
        if proc.poll() is None and started:
            client = server.client()
            for pair in cfg.pairs:
                client.lpush(pair.queue, b"hello")
            wait_for(
                lambda: (
                    proc.poll() is not None
                    or not any(client.llen(pair.queue) for pair in cfg.pairs)
                ),
                timeout=30,
                what="every queue's message taken",
            )
            proc.send_signal(signal.SIGTERM)
        return proc.wait(120), log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(document=documents)
@pytest.mark.service
def test_every_config_that_loads_also_starts_and_never_gives_a_traceback(
    document: dict[str, Any], shared_redis: RedisServer
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        manager = {"metrics_address": f"127.0.0.1:{free_port()}",
                   "pid_file": str(workdir / "rqworkers.pid")}  # fmt: skip
        text = render(document, shared_redis.url, manager)
        cfg = _loads(text)
        if cfg is None:
            event("refused by load")
            return
        path = workdir / "rqworkers.toml"
        path.write_text(text)
        shared_redis.client().flushdb()
        code, output = run_until_started(path, workdir, shared_redis, cfg)
        assert "Traceback" not in output, output
        if code == 2:
            event("refused at start")
            assert "rqworkers: cannot start" in output or "invalid configuration" in output
            return
        event("ran")
        assert code == 0, output
        total = sum(pair.processes for pair in cfg.pairs)
        assert output.count(" started") >= total + 1, output  # the keeper too
        assert "manager" in output and "stopped" in output


@pytest.mark.slow
@pytest.mark.service
def test_a_worker_whose_setup_always_fails_is_forked_at_a_bounded_rate(
    shared_redis: RedisServer, tmp_path: Path
) -> None:
    """At the lowest `restart_backoff_max` allowed, a handler whose setup() fails on every
    start is forked a handful of times in 6 s (986 times at 1e-300, before the floor)."""
    text = render(
        {"manager": {"restart_backoff_max": MIN_RESTART_BACKOFF, "check_interval": 0.05},
         "logging": {}, "defaults": {}, "workers": [{}]},
        shared_redis.url, {},
    ).replace("testapp:handle", "opsapp:FailingSetup")  # fmt: skip
    path = tmp_path / "rqworkers.toml"
    path.write_text(text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(APPS), str(REPO)]),
               TESTAPP_REDIS_URL=shared_redis.url)  # fmt: skip
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rqworkers", "run", "-c", str(path)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "q0-1" in log.read_text(), timeout=30, what="the first worker")
        first = time.monotonic()
        with contextlib.suppress(TimeoutError):  # the process only has to keep running
            wait_for(lambda: proc.poll() is not None, timeout=6.0, what="nothing")
        elapsed = time.monotonic() - first
        assert proc.poll() is None, log.read_text()
        starts = len(re.findall(r"q0-1 \d+ started", log.read_text()))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # One free restart, then 0.5 s, then 1 s (the cap) between starts; one spare for jitter.
    assert 2 <= starts <= 3 + elapsed / (MIN_RESTART_BACKOFF * 0.9), (starts, elapsed)
