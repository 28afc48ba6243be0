"""Real parts for tests: a `redis-server` on a free loopback port and `rqworkers run`.

Every process started here is tracked by pid and killed at teardown, even when the test
fails. Tests wait on conditions with `wait_for`, never on blind sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from bench.redisproc import free_port, redis_server_binary, wait_for
from rqworkers.store.keys import Keys

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


class RedisServer:
    """A throwaway redis-server with `appendfsync always`, so a restart keeps every write."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self.workdir),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - kept for the process's life
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout=10, what="redis-server to answer PING")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def discard(self) -> None:
        """SIGKILL it, for when nothing on it matters any more: a SIGTERM costs about 0.1 s,
        as redis-server acts on one at its next cron tick (10 a second)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


class Service:
    """`python -m rqworkers run` in its own session, so teardown can kill the whole group."""

    def __init__(self, config_path: Path, cwd: Path, env: dict[str, str]) -> None:
        self.config_path = config_path
        self.cwd = cwd
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = cwd / f"{config_path.stem}.log"
        self.known_pids: set[int] = set()

    def start(self, *extra: str) -> Service:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rqworkers", "run", "--config", str(self.config_path), *extra],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.known_pids.add(self.process.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def workers(self) -> list[psutil.Process]:
        """The live worker processes: children the manager logged as `<name> <pid> started`."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        # A text line ends with `<name> <pid> started`; a JSON line has it as its message.
        found = re.findall(r" (\d+) started(?:$|\"\}$)", self.output(), re.M)
        started = {int(pid) for pid in found}
        live = [c for c in children if c.pid in started and _alive(c)]
        self.known_pids.update(c.pid for c in live)
        return live

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[psutil.Process]:
        return wait_for(
            lambda: w if len(w := self.workers()) == count else None,
            timeout=timeout,
            what=f"{count} workers",
        )

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def session(self) -> list[psutil.Process]:
        """Every live process of the manager's session: its keeper, its workers (each leads a
        process group of its own, but stays in the session) and their subprocesses."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.pid and _alive(proc):
                    found.append(proc)
            except (OSError, psutil.Error):
                continue
        return found

    def signal_session(self, signum: int) -> None:
        """Signal the whole node at once, as a lost or frozen machine would be."""
        for proc in self.session():
            with _suppress_lookup():
                os.kill(proc.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def cleanup(self) -> None:
        """Kill the manager's session and every pid ever seen; never leave a process behind."""
        if self.process is not None:
            self.workers()
            self.known_pids.update(proc.pid for proc in self.session())
            with _suppress_lookup():
                os.killpg(self.process.pid, signal.SIGKILL)
            for pid in self.known_pids:
                with _suppress_lookup():
                    os.kill(pid, signal.SIGKILL)
            self.process.wait(10)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _suppress_lookup:  # noqa: N801 - used like contextlib.suppress
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def task_pair(**settings: Any) -> dict[str, Any]:
    """A `[[workers]]` entry of the task pair `tasks` over the test apps, quick to retry."""
    pair: dict[str, Any] = {
        "queue": "tasks",
        "tasks": ["taskapp:*"],
        "max_attempts": 2,
        "retry_delay": 0.0,
        "timeout": 10.0,
    }
    pair.update(settings)
    return pair


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m rqworkers ARGS`, finding the test apps; its exit status and output."""
    if env is None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "rqworkers", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60, cwd=REPO,
    )  # fmt: skip


def write_config(path: Path, url: str, workers: list[dict[str, Any]], **sections: Any) -> Path:
    """A config file with one `[[workers]]` table per dict; `sections` become `[name]` tables,
    or `[[name]]` tables if given a list of dicts."""
    lines = [f'[hosts]\nlocal = "{url}"\n']
    for name, values in sections.items():
        for table in values if isinstance(values, list) else [values]:
            lines.append(f"[[{name}]]" if isinstance(values, list) else f"[{name}]")
            lines.extend(f"{key} = {_toml(value)}" for key, value in table.items())
            lines.append("")
    for worker in workers:
        lines.append("[[workers]]")
        entry = {"host": "local", **worker}
        lines.extend(f"{key} = {_toml(value)}" for key, value in entry.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def internal_tracebacks(output: str) -> list[str]:
    """Tracebacks in a log that do not come from a handler under tests/apps: those are
    failures of rqworkers itself. A handler's exception is logged with its traceback."""
    blocks = output.split("Traceback (most recent call last):")[1:]
    return [block for block in blocks if "tests/apps/" not in block]


def dead_info(server: RedisServer, queue: str, payload: bytes) -> dict[str, object]:
    """The dead-letter record of `payload` (of its newest copy) in `queue`."""
    from rqworkers.store.queue import digest

    raw = server.client().hget(Keys(queue).dead_reasons, digest(payload))
    assert raw is not None, f"no dead-letter reason for {payload!r}"
    return dict(json.loads(raw))


def fork_and_wait(child: Callable[[], int]) -> int:
    """Fork, run `child` there and leave through os._exit whatever happens; wait; status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def run_bench(args: list[str], budget: float, what: str) -> tuple[int | None, str, str]:
    """Run `python -m <args>` (a bench, the chaos harness) from the repository: its exit
    code, standard output and error. Over `budget` seconds it is sent SIGTERM (each kills
    what it started, then exits) and the test fails."""
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        pytest.fail(f"{what} took over {budget}s:\n{err}")
    return process.returncode, out, err


def step_through_outages(worker: Any, steps: int, done: Callable[[], bool] = lambda: False) -> None:
    """Call `worker.step()` (a `rqworkers.worker.loop.Worker`) up to `steps` times, as the
    worker's main loop does: a Redis error is an outage, recorded, after which the next
    step replays. Ends when the worker exits or is stopped, or once `done()` says so."""
    for _ in range(steps):
        if done():
            return
        try:
            code = worker.step()
        except redis.ConnectionError as exc:
            worker.lose_track()
            worker.outage.record(exc)
            continue
        if code is not None or worker.stop.set:
            return


def process_ended(pid: int) -> bool:
    """Whether process `pid` has ended (gone, or a zombie not yet reaped). It may end
    between two looks, so a process found missing on the second counts as ended."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def firing_managers(service: Callable[..., Any], nodes: Sequence[str], every: float) -> list[Any]:
    """One manager per node, each with the same schedule: `taskapp:add` every `every`
    seconds into `ticks`, every missed fire caught up (`catch_up = "all"`), its workers on
    an idle queue; `service` is the fixture that starts them."""
    ticks = {"name": "ticks", "host": "local", "queue": "ticks", "every": every,
             "task": "taskapp:add", "args": [1, 2], "catch_up": "all"}  # fmt: skip
    return [
        service(
            [{"queue": "idle", "handler": "testapp:handle"}],
            manager={"node": node, "check_interval": 0.2},
            schedules=[ticks],
        )
        for node in nodes
    ]
