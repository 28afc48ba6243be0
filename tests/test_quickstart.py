"""README's quick start, run as written, so that it cannot drift from what works.

The shell blocks marked `<!-- quickstart: terminal 1 -->` and `<!-- quickstart: terminal 2 -->`
run in the checkout, in that order, as two terminals would: the first (scripts/run-local)
stays in the foreground, the second pushes and looks. The only change is the environment:
Redis on a free loopback port instead of 6379, and the example config's metrics address and
pid file out of the way, so the test never meets a Redis or a manager of the machine. `PATH`
holds no `rqworkers`, so the second terminal only finds it if the block puts it there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.redisproc import free_port, wait_for
from tests.support import REPO

_BLOCK = re.compile(r"<!-- quickstart: (?P<name>[^>]+?) -->\n```sh\n(?P<body>.*?)```", re.S)


def quickstart_blocks(text: str) -> dict[str, str]:
    """The marked shell blocks of a README, by the name in their marker."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def test_the_readme_marks_both_terminals_of_its_quick_start() -> None:
    blocks = quickstart_blocks((REPO / "README.md").read_text())
    assert sorted(blocks) == ["terminal 1", "terminal 2"]
    assert "scripts/run-local" in blocks["terminal 1"]
    assert "rqworkers push" in blocks["terminal 2"]
    # The log line README shows is the one the run below waits for.
    assert "INFO queue1-1[83308]: received 5 bytes: b'hello'" in (REPO / "README.md").read_text()


def _path_without_rqworkers(path: str) -> str:
    return os.pathsep.join(
        d for d in path.split(os.pathsep) if d and not os.access(Path(d) / "rqworkers", os.X_OK)
    )


@pytest.fixture
def quickstart_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    env = dict(os.environ, PATH=_path_without_rqworkers(os.environ.get("PATH", "")))
    for name in ("RQWORKERS_CONFIG", "RQWORKERS_LOG_LEVEL", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)
    env.update(
        REDIS_PORT=str(port),  # what run-local starts or uses
        REDIS_URL=f"redis://127.0.0.1:{port}/0",  # what the example config reads
        RQWORKERS_METRICS=f"127.0.0.1:{free_port()}",
        RQWORKERS_PID_FILE=str(tmp_path / "rqworkers.pid"),
    )
    yield env
    shutil.rmtree(REPO / ".run" / f"redis-{port}", ignore_errors=True)


def _stop(terminal: subprocess.Popen[bytes], redis_pid_file: Path) -> None:
    """SIGINT as Ctrl-C would; then, whatever happened, kill every process it left by pid:
    those of its session (rqworkers runs in a process group of its own) and the
    redis-server run-local daemonized (a session of its own, named by its pid file)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(terminal.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        terminal.wait(30)
    left = [p for p in psutil.process_iter() if _session(p) == terminal.pid]
    with contextlib.suppress(OSError, ValueError):
        left.append(psutil.Process(int(redis_pid_file.read_text())))
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        terminal.wait(10)


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


@pytest.mark.service
def test_the_readme_quick_start_runs_as_written(
    tmp_path: Path, quickstart_env: dict[str, str]
) -> None:
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("the quick start runs in the checkout's .venv, which scripts/test makes")
    blocks = quickstart_blocks((REPO / "README.md").read_text())
    env = quickstart_env
    log_path = tmp_path / "terminal-1.log"
    with open(log_path, "wb") as log:
        terminal_1 = subprocess.Popen(
            ["bash", "-e", "-c", blocks["terminal 1"]], cwd=REPO, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    redis_pid_file = REPO / ".run" / f"redis-{env['REDIS_PORT']}" / "redis.pid"
    try:
        # run-local may first have to install into .venv (a fresh checkout).
        wait_for(lambda: re.search(r"queue1-1 \d+ started", log_path.read_text()),
                 timeout=120, what="terminal 1's workers")  # fmt: skip
        terminal_2 = subprocess.run(
            ["bash", "-e", "-c", blocks["terminal 2"]], cwd=REPO, env=env,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert terminal_2.returncode == 0, terminal_2
        assert re.search(r"^queue1 on redis://127\.0\.0\.1:\d+/0$", terminal_2.stdout, re.M), (
            terminal_2.stdout
        )
        wait_for(lambda: "received 5 bytes: b'hello'" in log_path.read_text(),
                 timeout=10, what="the handler to log the message")  # fmt: skip
    finally:
        _stop(terminal_1, redis_pid_file)
    output = log_path.read_text()
    assert "rqworkers exited with status 0" in output, output
    assert terminal_1.returncode == 0, output
