"""The manager's supervision in awkward moments: reloads that fail, forks that fail, children
that hang, scaling back and forth, hosts that freeze, and signals to whole process groups.

Unit tests drive a `Manager` or `Keeper` in this process with `os.fork` or `process.send`
replaced; the others run the real `rqworkers run` against a real redis-server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from rqworkers import config, logs
from rqworkers.common import process
from rqworkers.config import Config, LoggingSettings
from rqworkers.manager.supervisor import Manager, build_slots
from rqworkers.ops import checks
from rqworkers.ops.keeper import Keeper, KeeperSpec, Lease
from rqworkers.store.keys import Keys
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import RedisServer, Service, free_port, wait_for, write_config
from tests.test_operate import scrape

StartService = Callable[..., Service]
HANDLER = "testapp:handle"
NOWHERE = "redis://127.0.0.1:1/0"  # never contacted by the unit tests


# -- helpers -----------------------------------------------------------------------------------


def load(path: Path, workers: list[dict[str, Any]], url: str = NOWHERE, **sections: Any) -> Config:
    sections.setdefault("manager", {"node": "n", "check_interval": 1.0})
    return config.load(write_config(path, url, workers, **sections))


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back as it was: `logs.configure` replaces its handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


class Harness:
    """A `Manager` whose signals are recorded, never sent, and whose reaping is scripted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cfg: Config) -> None:
        self.sent: list[tuple[int, int]] = []
        self.exits: list[tuple[int, int]] = []
        monkeypatch.setattr(
            process, "send", lambda pid, signum, group=False: self.sent.append((pid, signum))
        )
        monkeypatch.setattr(checks, "handler_problems_isolated", lambda cfg: [])
        real_waitpid = os.waitpid

        def waitpid(pid: int, options: int) -> tuple[int, int]:
            if pid == -1 and self.exits:
                return self.exits.pop(0)
            if pid == -1:
                return (0, 0)
            return real_waitpid(pid, options)

        monkeypatch.setattr(os, "waitpid", waitpid)
        self.manager = Manager(cfg)
        self.manager.keeper.next_start = float("inf")  # no keeper in these tests
        self.next_pid = 4_000_000  # above the default pid_max: never a real process

    def give_workers(self) -> None:
        """Pretend every slot without a worker got one."""
        for slot in self.manager.slots:
            if slot.pid is None:
                self.next_pid += 1
                slot.pid = self.next_pid
                slot.board.set_pid(self.next_pid)

    def reap(self, pid: int) -> None:
        self.exits.append((pid, 0))
        self.manager.reap_workers()

    def names(self) -> list[str]:
        return [slot.name for slot in self.manager.slots]


# -- scaling and reconciling -------------------------------------------------------------------


def test_extra_processes_never_leave_a_pair_without_a_process(tmp_path: Path) -> None:
    cfg = load(
        tmp_path / "c.toml",
        [{"queue": "big", "handler": HANDLER, "processes": 3},
         {"queue": "small", "handler": HANDLER, "processes": 1}],
    )  # fmt: skip
    names = [slot.name for slot in build_slots(cfg, extra_processes=-2)]
    assert names == ["big-1", "small-1"]


def test_a_pair_added_by_a_reload_after_sigttou_gets_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    h = Harness(monkeypatch, load(path, [{"queue": "q", "handler": HANDLER, "processes": 3}]))
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    h.give_workers()
    h.manager.scale(-1)
    h.manager.scale(-1)
    for slot in list(h.manager.slots):
        if slot.retiring:
            assert slot.pid is not None
            h.reap(slot.pid)
    assert h.names() == ["q-1"]
    load(path, [{"queue": "q", "handler": HANDLER, "processes": 3},
                {"queue": "new", "handler": HANDLER, "processes": 1}])  # fmt: skip
    h.manager.reload()
    assert h.names() == ["q-1", "new-1"]


def test_sigttin_right_after_sigttou_keeps_the_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(monkeypatch, load(tmp_path / "c.toml", [{"queue": "q", "handler": HANDLER}]))
    h.give_workers()
    h.manager.scale(+1)
    h.give_workers()
    second = h.manager.slots[1]
    h.manager.scale(-1)
    assert second.retiring and (second.pid, signal.SIGTERM) in h.sent
    h.manager.scale(+1)  # before its worker has exited
    assert not second.retiring
    assert second.pid is not None
    h.reap(second.pid)
    assert h.names() == ["q-1", "q-2"], "the slot stays, to be respawned"
    assert second.pid is None and second.next_start <= time.monotonic()


def test_changing_processes_alone_recycles_no_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    h = Harness(monkeypatch, load(path, [{"queue": "q", "handler": HANDLER, "processes": 2}]))
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    h.give_workers()
    load(path, [{"queue": "q", "handler": HANDLER, "processes": 3}])
    h.manager.reload()
    assert h.names() == ["q-1", "q-2", "q-3"]
    assert h.sent == [], "no worker was asked to stop"
    assert all(slot.pair.processes == 3 for slot in h.manager.slots)
    load(path, [{"queue": "q", "handler": HANDLER, "processes": 3, "timeout": 5.0}])
    h.manager.reload()
    assert len([s for s in h.sent if s[1] == signal.SIGTERM]) == 2, "a real change recycles"


def test_a_new_slot_waits_for_the_retiring_worker_that_holds_its_worker_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same host under another URL: a new pair to the manager, the same private list.
    path = tmp_path / "c.toml"
    h = Harness(monkeypatch, load(path, [{"queue": "q", "handler": HANDLER}]))
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    forked: list[str] = []

    def fake_fork(child: Callable[[], int], name: str = "", own_group: bool = False) -> int:
        forked.append(name)
        h.next_pid += 1
        return h.next_pid

    monkeypatch.setattr(process, "fork", fake_fork)
    h.give_workers()
    [old] = h.manager.slots
    load(path, [{"queue": "q", "handler": HANDLER}], url="redis://localhost:1/0")
    h.manager.reload()
    [_, new] = h.manager.slots
    assert old.retiring and new.worker_id == old.worker_id
    h.manager.spawn_workers()
    assert forked == [], "two processes must never share one private list"
    assert old.pid is not None
    h.reap(old.pid)
    h.manager.spawn_workers()
    assert forked == ["q-1"] and h.manager.slots == [new]


def test_the_manager_wakes_up_for_a_due_keeper_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(monkeypatch, load(tmp_path / "c.toml", [{"queue": "q", "handler": HANDLER}]))
    h.give_workers()
    h.manager.keeper.next_start = time.monotonic() + 0.05
    waits: list[float] = []
    monkeypatch.setattr(h.manager, "_wait_for_wakeup", waits.append)
    h.manager.sleep()
    assert waits and waits[0] <= 0.05


# -- reload ------------------------------------------------------------------------------------


def test_configure_opens_the_new_log_file_before_dropping_the_old_handlers(
    tmp_path: Path, root_logging: None
) -> None:
    logs.configure(LoggingSettings(file=str(tmp_path / "good.log")), "manager")
    before = list(logging.getLogger().handlers)
    with pytest.raises(OSError):
        logs.configure(LoggingSettings(file=str(tmp_path / "missing" / "x.log")), "manager")
    assert logging.getLogger().handlers == before
    logging.getLogger("t").warning("still logging")
    assert "still logging" in (tmp_path / "good.log").read_text()


def test_a_reload_with_a_log_file_that_cannot_be_opened_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root_logging: None, caplog: Any
) -> None:
    path = tmp_path / "c.toml"
    h = Harness(monkeypatch, load(path, [{"queue": "q", "handler": HANDLER}]))
    old = h.manager.config
    load(
        path,
        [{"queue": "q", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}],
        logging={"file": str(tmp_path / "missing" / "rq.log")},
    )
    with caplog.at_level(logging.INFO):
        h.manager.reload()
    assert h.manager.config is old
    assert h.names() == ["q-1"]
    assert "reload refused" in caplog.text and "missing" in caplog.text


def test_a_reload_whose_handler_check_hangs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    h = Harness(monkeypatch, load(path, [{"queue": "q", "handler": HANDLER}]))
    monkeypatch.undo()  # the real handler check, with a call that times out

    def hangs(fn: Callable[[], str], timeout: float = 0.0) -> str:
        raise TimeoutError("no answer from child 1 within 30s: killed")

    monkeypatch.setattr(process, "call_in_child", hangs)
    assert checks.handler_problems_isolated(h.manager.config) == [
        "checking handlers failed: no answer from child 1 within 30s: killed"
    ]


# -- children that hang, forks that fail ---------------------------------------------------------


def test_call_in_child_kills_a_child_that_hangs_and_reaps_it() -> None:
    before = {child.pid for child in psutil.Process().children()}
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        process.call_in_child(lambda: time.sleep(60) or "never", timeout=0.5)
    assert time.monotonic() - started < 5
    after = {child.pid for child in psutil.Process().children()}  # zombies included
    assert after <= before, "the child was killed and reaped"
    assert process.call_in_child(lambda: "answer", timeout=5) == "answer"


def test_call_in_child_drops_the_managers_signal_handlers_and_wakeup_fd() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    old_fd = signal.set_wakeup_fd(write_end)
    try:
        answer = process.call_in_child(
            lambda: (
                f"{signal.getsignal(signal.SIGTERM) is signal.SIG_DFL} {signal.set_wakeup_fd(-1)}"
            )
        )
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, previous)
        os.close(read_end)
        os.close(write_end)
    assert answer == "True -1"


def _fork_fails(*args: Any) -> int:
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def test_a_failed_fork_is_a_failed_start_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(monkeypatch, load(tmp_path / "c.toml", [{"queue": "q", "handler": HANDLER}]))
    monkeypatch.setattr(os, "fork", _fork_fails)
    [slot] = h.manager.slots
    h.manager.spawn_worker(slot)
    assert slot.pid is None and slot.bad_exits == 1
    h.manager.spawn_worker(slot)
    assert slot.bad_exits == 2
    assert slot.next_start - time.monotonic() > 0.3, "the second failure waits"
    assert "cannot fork" in slot.board.last_exit and slot.board.state() == "backoff"

    h.manager.spawn_keeper()
    assert h.manager.keeper.pid is None
    assert h.manager.keeper.next_start - time.monotonic() == pytest.approx(1.0, abs=0.2)


def test_a_failed_fork_in_a_handler_check_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(tmp_path / "c.toml", [{"queue": "q", "handler": HANDLER}])
    monkeypatch.setattr(os, "fork", _fork_fails)
    [problem] = checks.handler_problems_isolated(cfg)
    assert "checking handlers failed" in problem and "Resource temporarily" in problem


# -- the keeper --------------------------------------------------------------------------------


def test_a_host_that_hangs_holds_no_other_host_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Accepts connections (the kernel does, into the backlog) and never answers.
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)
    frozen_url = f"redis://127.0.0.1:{frozen.getsockname()[1]}/0"
    boards = [Scoreboard(), Scoreboard()]
    for board in boards:
        board.prepare()
        board.set_pid(os.getpid())
    leases = (
        Lease(frozen_url, "a", "n:1", "a-1", "frozen", boards[0]),
        Lease(redis_server.url, "b", "n:1", "b-1", "local", boards[1]),
    )
    spec = KeeperSpec("n", os.getppid(), lease_ttl=30, reclaim_interval=10, leases=leases)
    keeper = Keeper(spec)
    stale = psutil.Process(os.getpid())
    keeper.processes[4_000_123] = stale  # a worker long gone
    try:
        now = time.monotonic()
        keeper.tick(now)
        assert time.monotonic() - now < 3, "one short timeout, not one per action"
        assert redis_server.client().pttl(Keys("b", "n:1").lease) > 25_000
        by_url = {endpoint.url: endpoint for endpoint in keeper.endpoints}
        assert by_url[redis_server.url].next_reclaim == now + 10, "its own schedule"
        assert by_url[frozen_url].next_reclaim >= now + 30, "a full TTL after its outage"
        assert set(keeper.processes) == {os.getpid()}, "only live workers are cached"
    finally:
        keeper.close()
        frozen.close()


# -- the real service --------------------------------------------------------------------------


def test_healthz_is_ok_after_sigttou(service: StartService, redis_server: RedisServer) -> None:
    port = free_port()
    svc = service(
        [{"queue": "q", "handler": HANDLER}],
        manager={"check_interval": 0.2, "shutdown_timeout": 5.0,
                 "metrics_address": f"127.0.0.1:{port}"},
    )  # fmt: skip
    svc.wait_workers(1)
    svc.signal(signal.SIGTTIN)
    svc.wait_workers(2)
    svc.signal(signal.SIGTTOU)
    svc.wait_workers(1)
    time.sleep(2.5)  # past the grace a slot is given between an exit and a respawn
    _, body = wait_for(lambda: (r := scrape(port, "/healthz"))[0] == 200 and r, what="200")
    assert json.loads(body)["workers"] == 1, "the keeper no longer watches the retired slot"
    output = svc.output()
    assert "exited: one process fewer per pair (SIGTTOU)" in output
    assert "SIGTTOU: +0 process(es) per pair over the config, 1 in all" in output
    svc.signal(signal.SIGTTOU)
    wait_for(lambda: "SIGTTOU ignored" in svc.output(), what="a clamped SIGTTOU said so")


def test_a_reload_with_a_bad_log_file_keeps_the_manager_and_its_workers(
    service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    svc = service([{"queue": "q", "handler": HANDLER}])
    before = {w.pid for w in svc.wait_workers(1)}
    write_config(
        svc.config_path,
        redis_server.url,
        [{"queue": "q", "handler": HANDLER}],
        manager={"check_interval": 0.2, "shutdown_timeout": 10.0},
        logging={"file": str(tmp_path / "missing" / "rq.log")},
    )
    svc.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in svc.output(), what="refusal logged")
    assert svc.process is not None and svc.process.poll() is None
    assert {w.pid for w in svc.workers()} == before
    redis_server.client().lpush("q", b"after")
    wait_for(lambda: b"after" in redis_server.client().lrange("done", 0, -1), what="handled")


def test_workers_signalled_the_instant_they_are_forked_stop_at_once(
    service: StartService, redis_server: RedisServer
) -> None:
    # SIGTERM during setup() stops a worker at once. Sent before the new child has run a
    # line of its own, it must not reach the handler the child inherited from the manager,
    # which only notes the signal (in the child's copy of the manager): the worker would
    # then hang in setup() until setup_timeout, and a manager stopping waits for it.
    processes = 8
    svc = service(
        [{"queue": "q", "handler": "opsapp:HangingSetup", "processes": processes,
          "setup_timeout": 60.0}],
    )  # fmt: skip
    first = {w.pid for w in svc.wait_workers(processes)}
    spared = _children(svc.pid) - first  # the keeper
    for pid in first:  # a first failed start is restarted at once, all in one pass
        os.kill(pid, signal.SIGTERM)
    signalled: set[int] = set()
    deadline = time.monotonic() + 20
    while len(signalled) < processes and time.monotonic() < deadline:
        for pid in _children(svc.pid) - first - spared - signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled.add(pid)
    assert len(signalled) == processes, "every slot restarted"
    wait_for(
        lambda: not [pid for pid in signalled if _alive(pid)],
        timeout=5,
        what=f"the workers signalled at their fork to end ({[p for p in signalled if _alive(p)]})",
    )


def test_a_hard_kill_takes_the_handlers_subprocesses_along(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "q", "handler": "supervisionapp:spawn_and_hang", "timeout": 1.0,
          "timeout_grace": 0.5, "max_attempts": 1}],
    )  # fmt: skip
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("q", b"x")
    pid = int(wait_for(lambda: client.lindex("subprocesses", 0), what="subprocess started"))
    wait_for(lambda: "timeout (killed" in svc.output(), what="hard timeout")
    wait_for(lambda: not _alive(pid), timeout=5, what="the subprocess to be killed too")


def test_a_second_stop_signal_kills_workers_at_once_even_with_a_stuck_keeper(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "q", "handler": HANDLER, "timeout": 60}],
        manager={"check_interval": 0.2, "shutdown_timeout": 60.0},
    )
    [worker] = svc.wait_workers(1)
    keeper = next(c for c in psutil.Process(svc.pid).children() if c.pid != worker.pid)
    redis_server.client().lpush("q", b"stuck:60")
    wait_for(lambda: redis_server.client().llen("started") == 1, what="stuck message started")
    keeper.suspend()  # a keeper that will not stop in time must not hold the workers' kill
    svc.signal(signal.SIGTERM)
    wait_for(lambda: "shutdown; sending SIGTERM" in svc.output(), what="graceful stop begun")
    started = time.monotonic()
    svc.signal(signal.SIGTERM)
    wait_for(lambda: not _alive(worker.pid), timeout=10, what="worker killed")
    assert time.monotonic() - started < 3
    # Dead is not yet reaped: the manager logs the exit once it has reaped it.
    wait_for(lambda: "exited: second stop signal" in svc.output(), timeout=5, what="exit logged")
    assert svc.wait(15) == 0


def test_ctrl_c_in_a_terminal_stops_everything_gracefully(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service([{"queue": "q", "handler": HANDLER}, {"queue": "q2", "handler": HANDLER}])
    workers = svc.wait_workers(2)
    assert all(os.getpgid(w.pid) == w.pid for w in workers), "each leads its own group"
    client = redis_server.client()
    client.lpush("q", b"sleep:1.5")
    wait_for(lambda: client.llen("started") == 1, what="message started")
    os.killpg(svc.pid, signal.SIGINT)  # what a terminal does: the foreground process group
    assert svc.wait(20) == 0
    assert client.lrange("done", 0, -1) == [b"sleep:1.5"], "finished, not killed"
    assert svc.session() == [], "nothing left in the session"
    output = svc.output()
    assert "SIGINT received" in output
    worker_exit = re.search(r"q-1 \d+ exited: shutdown", output)
    keeper_stop = re.search(r"keeper \d+ stopped", output)
    assert worker_exit and keeper_stop
    assert worker_exit.start() < keeper_stop.start(), "leases kept until the workers are done"


def _children(pid: int) -> set[int]:
    """The pids of `pid`'s children, zombies included, read straight from /proc: quick
    enough to act on a fork before the child has run a line of its own."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(child) for child in text.split()}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
