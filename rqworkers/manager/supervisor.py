"""The manager: keeps one worker process per slot alive, and stops them all cleanly.

After gunicorn's arbiter: signal handlers only queue the signal; the main loop does the work,
one pass at a time: handle signals → reap workers → enforce limits → spawn workers → sleep.
A child's death (SIGCHLD) wakes the sleep at once, so a replacement starts without waiting
for the next tick.

Signals: SIGTERM/SIGINT stop gracefully (a second one kills at once); SIGHUP reloads the
config file; SIGTTIN/SIGTTOU add or remove one process for every pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from types import FrameType

import setproctitle

from rqworkers import config, logs
from rqworkers.common import process
from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.config import Config, PairSettings
from rqworkers.errors import ConfigError
from rqworkers.manager import pidfile
from rqworkers.manager.slots import KeeperSlot, Slot
from rqworkers.ops import checks
from rqworkers.ops.keeper import KeeperSpec, Lease
from rqworkers.ops.keeper import main as keeper_main
from rqworkers.worker.loop import WorkerSpec
from rqworkers.worker.main import main as worker_main

log = logging.getLogger(__name__)

_MB = 1024 * 1024
KEEPER_RETRY = 1.0  # seconds before trying again to start a keeper that could not fork
# Seconds the keeper is given to mark its workers stopped, after they are gone: a stop takes
# up to `shutdown_timeout` plus this (deploy/kubernetes sizes its grace period by it).
KEEPER_STOP = 5.0


class Manager:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.manager
        self.slots = build_slots(config)
        self.backoff = restart_backoff(self.settings.restart_backoff_max)
        self.signals: list[int] = []
        self.stopping = False
        self.extra_processes = 0  # from SIGTTIN/SIGTTOU, on top of every pair's `processes`
        self.pid = os.getpid()
        self.start_time = time.time()  # wall clock, for the uptime metric
        self.keeper = KeeperSlot()
        self._pid_lock: tuple[str, int] | None = None  # pid file path and its locked fd
        self._wakeup_read, self._wakeup_write = os.pipe()

    # -- the main loop --------------------------------------------------------------------

    def run(self) -> int:
        # Titled first: `reload` signals only a process with this title that holds the pid file.
        setproctitle.setproctitle(pidfile.TITLE)
        self.claim()
        self.install_signals()
        self.log_banner()
        try:
            while not self.stopping:
                self.handle_signals()
                self.reap_workers()
                if self.stopping:
                    break
                self.enforce_limits()
                self.spawn_workers()
                logs.rotate_if_due()
                self.sleep()
            self.stop_workers()
        finally:
            self.kill_workers()  # whatever went wrong, leave no process behind
            self.remove_pid_file()
        log.info("manager %d stopped", self.pid)
        return 0

    def claim(self) -> None:
        """Take what only one manager may hold, before anything starts: the pid file, then
        the metrics address. Raises `ConfigError` (exit 2, as from `check`) if one is taken."""
        self.write_pid_file()
        problems = checks.metrics_problems(self.config)
        if problems:
            self.remove_pid_file()
            raise ConfigError(self.config.source, problems)

    def write_pid_file(self) -> None:
        """Write the manager's pid under a lock that lives as long as the manager.

        A second manager given the same file finds it locked and refuses to start, leaving
        the file alone (as gunicorn refuses): `rqworkers reload` must never signal the wrong
        manager. A symbolic link, a FIFO or a device in its place is refused (see `pidfile`).
        """
        path = self.settings.pid_file
        if not path:
            return
        try:
            self._pid_lock = (path, pidfile.take(path, self.pid))
        except pidfile.PidFileError as exc:
            raise ConfigError(self.config.source, [f"manager.pid_file: {exc}"]) from None

    def remove_pid_file(self) -> None:
        """Remove the pid file this manager holds, unless another file has replaced it."""
        if self._pid_lock is None:
            return
        (path, fd), self._pid_lock = self._pid_lock, None
        pidfile.release(path, fd)

    def install_signals(self) -> None:
        os.set_blocking(self._wakeup_write, False)
        os.set_blocking(self._wakeup_read, False)
        signal.set_wakeup_fd(self._wakeup_write)
        for signum in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGCHLD,
            signal.SIGHUP,
            signal.SIGTTIN,
            signal.SIGTTOU,
        ):
            signal.signal(signum, self.queue_signal)

    def queue_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("%s received: stopping workers gracefully", signal.Signals(signum).name)
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                self.scale(+1 if signum == signal.SIGTTIN else -1)

    # -- live changes ---------------------------------------------------------------------

    def reload(self) -> None:
        """Apply the config file anew. All of it is checked first, the log file opened
        included: a file that fails is refused, and the running config stays untouched."""
        log.info("SIGHUP received: reloading %s", self.config.source)
        try:
            new = config.load(self.config.source)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            return
        problems, unchecked = checks.start_collision_problems(new)
        for line in unchecked:
            log.warning("reload: %s", line)
        problems += checks.handler_problems_isolated(new)
        if problems:
            log.error("reload refused, keeping the running config: %s", "; ".join(problems))
            return
        try:
            logs.configure(new.logging, "manager")
        except OSError as exc:
            log.error("reload refused, keeping the running config: log file: %s", exc)
            return
        # The keeper fires the schedules, and serves the page with `metrics_address` and
        # the token: either change gives it a new config.
        manager_changed = new.manager != self.settings or new.schedules != self.config.schedules
        telemetry_changed = new.telemetry != self.config.telemetry
        self.config, self.settings = new, new.manager
        self.backoff = restart_backoff(self.settings.restart_backoff_max)
        # Below the lowest, the same workers, but a SIGTTIN would seem to do nothing.
        self.extra_processes = max(self.extra_processes, _lowest_extra(new))
        self.reconcile("removed from the config")
        if telemetry_changed:  # a worker sets its tracing up at its start: replace them all
            for slot in self.slots:
                if not slot.retiring:
                    self.kill_worker(slot, signal.SIGTERM, "[telemetry] changed")
        if manager_changed:
            self.restart_keeper()

    def scale(self, delta: int) -> None:
        name = "SIGTTIN" if delta > 0 else "SIGTTOU"
        extra = max(_lowest_extra(self.config), self.extra_processes + delta)
        if extra == self.extra_processes:
            log.info("%s ignored: every pair is down to one process", name)
            return
        self.extra_processes = extra
        total = sum(_processes(pair, extra) for pair in self.config.pairs)
        log.info("%s: %+d process(es) per pair over the config, %d in all", name, extra, total)
        self.reconcile(f"one process fewer per pair ({name})")

    def reconcile(self, retire_reason: str) -> None:
        """Make the slots match the config: start new ones, recycle changed ones, retire the
        ones no longer wanted. Slots that did not change are left alone, and so are those
        whose pair changed its `processes` only."""
        wanted = {slot.key: slot for slot in build_slots(self.config, self.extra_processes)}
        changed = False
        for slot in list(self.slots):
            new = wanted.pop(slot.key, None)
            if new is None:
                if not slot.retiring:
                    changed |= self.retire(slot, retire_reason)
                continue
            if slot.retiring:  # wanted again before its worker exited: respawned after all
                slot.retiring = False
                log.info("%s is wanted again: it restarts once its worker exits", slot.name)
            if new.pair != slot.pair:
                recycle = not _same_but_processes(slot.pair, new.pair)
                slot.pair, changed = new.pair, True  # the keeper's labels come from the pair
                if recycle:
                    self.kill_worker(slot, signal.SIGTERM, "config changed")
        for slot in wanted.values():
            self.slots.append(slot)
            changed = True
        if changed:
            self.restart_keeper()

    def retire(self, slot: Slot, reason: str) -> bool:
        """Stop a slot for good; True if it is gone at once (it had no worker)."""
        slot.retiring = True
        if slot.pid is None:
            self.slots.remove(slot)
            return True
        self.kill_worker(slot, signal.SIGTERM, reason)
        return False

    def restart_keeper(self) -> None:
        """Have a new keeper take the current slots, once the set of slots has changed.

        A retiring slot stays in the set until its worker is reaped, so that its lease is
        kept while it finishes; its removal restarts the keeper again. Not while stopping:
        the keeper must hold the leases of the workers still finishing.
        """
        if self.keeper.pid is not None and not self.stopping:
            self.keeper.restarting = True
            process.send(self.keeper.pid, signal.SIGTERM)

    def log_banner(self) -> None:
        s = self.settings
        log.info(
            "rqworkers manager %d starting on node %s (check interval %gs, shutdown timeout %gs)",
            self.pid,
            self.config.node,
            s.check_interval,
            s.shutdown_timeout,
        )
        for slot in self.slots:
            p = slot.pair
            log.info(
                "  %s: queue %r on %s, handler %s, max_requests %d, timeout %gs",
                slot.name,
                p.queue,
                p.endpoint,
                p.handler or f"tasks {list(p.tasks or ())}",
                p.max_requests,
                p.timeout,
            )

    def sleep(self) -> None:
        """Wait for the next tick, a due start or a signal, whichever comes first."""
        now = time.monotonic()
        due = [slot.next_start for slot in self._startable()]
        if self.keeper.pid is None:
            due.append(self.keeper.next_start)
        timeout = min([self.settings.check_interval, *(max(0.0, t - now) for t in due)])
        if self.signals:
            timeout = 0.0
        self._wait_for_wakeup(timeout)

    def _wait_for_wakeup(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([self._wakeup_read], [], [], timeout)
        try:
            while os.read(self._wakeup_read, 4096):
                pass
        except BlockingIOError:
            pass

    # -- lifecycle of workers -------------------------------------------------------------

    def spawn_workers(self) -> None:
        now = time.monotonic()
        if self.keeper.pid is None and now >= self.keeper.next_start:
            self.spawn_keeper()
        for slot in self._startable():
            if now >= slot.next_start:
                self.spawn_worker(slot)

    def _startable(self) -> list[Slot]:
        """The slots without a worker, but for those whose worker id a retiring worker still
        holds: two processes must never share a private list, so they wait for its end."""
        held = {(slot.pair.queue, slot.worker_id) for slot in self.slots if slot.pid is not None}
        return [
            slot
            for slot in self.slots
            if slot.pid is None and (slot.pair.queue, slot.worker_id) not in held
        ]

    def spawn_worker(self, slot: Slot) -> None:
        spec = WorkerSpec(
            pair=slot.pair,
            name=slot.name,
            worker_id=slot.worker_id,
            manager_pid=self.pid,
            previous_exit=slot.previous_exit,
            previous_unstarted=slot.previous_unstarted,
            spared=slot.spared,
            lease_ttl=self.settings.lease_ttl,
            sample_succeeded=self.config.logging.sample_succeeded,
            sample_failed=self.config.logging.sample_failed,
            tracing=self.config.telemetry.tracing,
        )
        board = slot.board
        logging_settings = self.config.logging

        def child() -> int:
            logs.configure(logging_settings, slot.name, rotate=False, queue=spec.pair.queue)
            return worker_main(spec, board)

        board.prepare()
        try:
            pid = process.fork(child, slot.name, own_group=True)
        except OSError as exc:  # EAGAIN, ENOMEM: a failed start, retried with the backoff
            delay = slot.start_failed(f"cannot fork: {exc}", time.monotonic(), self.backoff)
            log.error("%s: cannot fork a worker: %s; retrying in %.1fs", slot.name, exc, delay)
            return
        slot.spawned(pid, time.monotonic())
        log.info("%s %d started", slot.name, pid)

    def spawn_keeper(self) -> None:
        spec = KeeperSpec(
            node=self.config.node,
            manager_pid=self.pid,
            lease_ttl=self.settings.lease_ttl,
            reclaim_interval=self.settings.reclaim_interval,
            leases=tuple(
                Lease(
                    s.pair.url,
                    s.pair.queue,
                    s.worker_id,
                    s.name,
                    s.pair.host,
                    s.board,
                    s.pair.concurrency,
                    s.pair.limits,
                )
                for s in self.slots
            ),
            metrics_address=self.settings.metrics_address,
            manager_start_time=self.start_time,
            config=self.config,
        )
        logging_settings = self.config.logging

        def child() -> int:
            logs.configure(logging_settings, "keeper", rotate=False)
            return keeper_main(spec)

        try:
            self.keeper.pid = process.fork(child, "keeper")
        except OSError as exc:
            self.keeper.next_start = time.monotonic() + KEEPER_RETRY
            log.error("cannot fork the keeper: %s; retrying in %gs", exc, KEEPER_RETRY)
            return
        log.info("keeper %d started (lease ttl %gs)", self.keeper.pid, spec.lease_ttl)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.keeper.pid:
                self.keeper.ended(status, time.monotonic(), restart=not self.stopping)
                continue
            slot = self._slot_of(pid)
            if slot is None:
                continue
            if slot.retiring:
                self.slots.remove(slot)
                self.restart_keeper()  # so that it no longer watches that slot
            succeeded, failed = slot.board.succeeded, slot.board.failed
            reason = slot.ended(status, time.monotonic(), self.backoff)
            delay = max(0.0, slot.next_start - time.monotonic())
            level = logging.WARNING if slot.bad_exits else logging.INFO
            log.log(
                level,
                "%s %d exited: %s (succeeded %d, failed %d)%s",
                slot.name,
                pid,
                reason,
                succeeded,
                failed,
                f"; restarting in {delay:.1f}s" if delay > 0 and not self.stopping else "",
            )

    def enforce_limits(self) -> None:
        """Recycle workers over their memory limits or stuck past their timeout, and end
        those whose handler's setup() ran past `setup_timeout`: a failed start, restarted
        with backoff.

        A worker already asked to stop is still watched: one that keeps growing after its
        soft-limit SIGTERM, or hangs, is SIGKILLed all the same.
        """
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is None or slot.kill_sent:
                continue
            pair = slot.pair
            if not slot.board.get("ready") and now - slot.spawned_at > pair.setup_timeout:
                reason = f"setup ran past setup_timeout ({pair.setup_timeout:g}s)"
                self.kill_worker(slot, signal.SIGKILL, reason, "crash")
                continue
            stuck_for = slot.board.busy_for()
            if stuck_for > pair.timeout + pair.timeout_grace:
                reason = f"timeout (killed after {stuck_for:.1f}s)"
                self.kill_worker(slot, signal.SIGKILL, reason, "timeout")
                continue
            if not (pair.soft_memory_limit or pair.hard_memory_limit):
                continue
            rss = slot.rss()
            if pair.hard_memory_limit and rss > pair.hard_memory_limit:
                limit = pair.hard_memory_limit
                reason = f"hard memory limit ({rss // _MB}MB > {limit // _MB}MB)"
                self.kill_worker(slot, signal.SIGKILL, reason, "memory_hard")
            elif pair.soft_memory_limit and rss > pair.soft_memory_limit and not slot.stop_reason:
                limit = pair.soft_memory_limit
                reason = f"soft memory limit ({rss // _MB}MB > {limit // _MB}MB)"
                self.kill_worker(slot, signal.SIGTERM, reason, "memory_soft")

    def kill_worker(self, slot: Slot, signum: int, reason: str, kind: str = "") -> None:
        """Signal a worker, recording why (and its recycle `kind`) for when it is reaped.

        SIGKILL goes to the worker's whole process group, so that no subprocess its handler
        started outlives it. SIGTERM goes to the worker alone: it lets the handler finish,
        and the handler's own subprocesses are then its business.
        """
        if slot.pid is None:
            return
        if slot.stop_reason is None or signum == signal.SIGKILL:
            slot.stop_reason, slot.stop_kind = reason, kind
            slot.board.stop_requested()
        slot.kill_sent = slot.kill_sent or signum == signal.SIGKILL
        log.info("%s %d: %s; sending %s", slot.name, slot.pid, reason, signal.Signals(signum).name)
        process.send(slot.pid, signum, group=signum == signal.SIGKILL)

    def stop_workers(self) -> None:
        """Graceful stop: SIGTERM everyone, wait up to `shutdown_timeout` (or until a second
        stop signal), SIGKILL the rest, and only then stop the keeper, which holds the
        leases of the workers still finishing."""
        for slot in self.slots:
            self.kill_worker(slot, signal.SIGTERM, "shutdown")
        deadline = time.monotonic() + self.settings.shutdown_timeout
        reason = "shutdown timeout"
        while any(slot.pid for slot in self.slots) and time.monotonic() < deadline:
            self.reap_workers()
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals):
                log.warning("second stop signal: killing workers now")
                reason = "second stop signal"
                self.signals.clear()
                break
            self.signals.clear()
            self._wait_for_wakeup(0.1)
        self.reap_workers()
        self.kill_slots(reason)
        self.stop_keeper()

    def stop_keeper(self) -> None:
        """Last to go: it keeps the leases of slow workers alive while they finish."""
        if self.keeper.pid is None:
            return
        process.send(self.keeper.pid, signal.SIGTERM)
        deadline = time.monotonic() + KEEPER_STOP
        while self.keeper.pid is not None and time.monotonic() < deadline:
            self._wait_for_wakeup(0.05)
            self.reap_workers()

    def kill_workers(self) -> None:
        """SIGKILL what is still alive and wait for it: no orphan outlives the manager."""
        if self.keeper.pid is not None:
            process.send(self.keeper.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.keeper.pid, 0)
            self.keeper.pid = None
        self.kill_slots("shutdown timeout")

    def kill_slots(self, reason: str) -> None:
        """SIGKILL every worker still alive, with its process group, and reap it."""
        for slot in self.slots:
            if slot.pid is not None:
                self.kill_worker(slot, signal.SIGKILL, reason)
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    _, status = os.waitpid(slot.pid, 0)
                except ChildProcessError:
                    status = 0
                reason = slot.ended(status, time.monotonic(), self.backoff)
                log.warning("%s exited: %s", slot.name, reason)

    def _slot_of(self, pid: int) -> Slot | None:
        return next((slot for slot in self.slots if slot.pid == pid), None)


def restart_backoff(cap: float) -> ExponentialBackoff:
    """Delay before restarting a worker that keeps failing: none the first time, then from
    0.5 s doubling up to `cap`, jittered so that workers failing together spread out."""
    return ExponentialBackoff(base=0.5, cap=cap, free=1, jitter=0.1)


def _processes(pair: PairSettings, extra: int) -> int:
    """Processes wanted for `pair`, with SIGTTIN/SIGTTOU's `extra`: never fewer than one."""
    return max(1, pair.processes + extra)


def _lowest_extra(config: Config) -> int:
    """The lowest `extra_processes` that means something: it leaves every pair at one
    process (`_processes` never gives fewer), and any lower one would give the same."""
    return 1 - max((pair.processes for pair in config.pairs), default=1)


def _same_but_processes(old: PairSettings, new: PairSettings) -> bool:
    """Whether `old`'s workers may go on as `new`'s: `processes` only sizes the pair."""
    return old.model_copy(update={"processes": new.processes}) == new


def build_slots(config: Config, extra_processes: int = 0) -> list[Slot]:
    """One slot per process of every pair. Names carry the host only where queues repeat."""
    queue_counts: dict[str, int] = {}
    for pair in config.pairs:
        queue_counts[pair.queue] = queue_counts.get(pair.queue, 0) + 1
    slots = []
    for pair in config.pairs:
        unique = queue_counts[pair.queue] == 1
        base = pair.queue if unique else f"{pair.host}/{pair.queue}"
        owner = config.node if unique else f"{config.node}:{pair.host}"
        for index in range(1, _processes(pair, extra_processes) + 1):
            slots.append(Slot(pair, index, f"{base}-{index}", worker_id=f"{owner}:{index}"))
    return slots
