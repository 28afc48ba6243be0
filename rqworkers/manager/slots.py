"""The manager's bookkeeping for one worker process of one `(host, queue)` pair.

A slot outlives its processes: it keeps the worker id (so a respawned worker finds its
private list), its bad exits in a row (crashes and failed starts) and the time the next
start is due.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import psutil

from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.common.process import explain_exit
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode
from rqworkers.worker.scoreboard import Scoreboard

log = logging.getLogger(__name__)

# Seconds a worker must live, once its handler's setup() returned, for its slot's failure
# count to reset: a setup() that fails or hangs on every start is a crash loop, however slow.
HEALTHY_AFTER = 10.0
# How many workers in a row that died in their own replay a slot remembers (`Slot.spared`):
# each backs off, so more than a few in a row is a slot that cannot start at all.
SPARED_KEPT = 16

# Exits the slot expects in normal life: respawn at once, no backoff. Values: the reason
# for the log, and the recycle kind for metrics (see `scoreboard.RECYCLE_REASONS`).
_RECYCLES = {
    ExitCode.MAX_REQUESTS: ("max requests", "max_requests"),
    ExitCode.TIMEOUT: ("timeout", "timeout"),
}
_EXIT_WORDS = {
    ExitCode.OK: "stopped",
    ExitCode.STARTUP_FAILED: "startup failed",
    ExitCode.ORPHANED: "orphaned",
    ExitCode.REDIS_LASTING_ERROR: "redis refused an operation",
    ExitCode.SUPERSEDED: "another process took over its private list (node name shared?)",
}


@dataclass
class Slot:
    pair: PairSettings
    index: int  # 1-based process number within the pair
    name: str  # for people: `queue1-1`
    worker_id: str  # for Redis keys: stable across respawns on the same node
    board: Scoreboard = field(default_factory=Scoreboard)
    pid: int | None = None
    process: psutil.Process | None = None
    spawned_at: float = 0.0  # monotonic time of the fork
    bad_exits: int = 0  # crashes and failed starts in a row
    next_start: float = 0.0
    # Why the manager itself signalled the worker; it explains the exit when reaped.
    stop_reason: str | None = None
    stop_kind: str = ""  # the recycle kind of that reason, "" for a shutdown
    kill_sent: bool = False  # SIGKILL is on its way: nothing more to enforce
    # How the last worker ended, when it ended badly: handed to the next worker so that a
    # message it leaves behind is dead-lettered with the real cause.
    previous_exit: str | None = None
    # The oldest delivery of its private list that had not reached the handler: the next
    # replay charges every one before it an attempt (see `scripts.REPLAY`). None: unknown
    # (a new manager, or a worker that died before replaying): every leftover is charged.
    previous_unstarted: bytes | None = None
    # Workers since that mark that died in their replay, after it had charged what had
    # started (`Scoreboard.replay_interrupted`): what carries their ids is not charged again.
    spared: tuple[bytes, ...] = ()
    retiring: bool = False  # removed (reload or SIGTTOU): not restarted once its worker exits

    @property
    def key(self) -> tuple[str, str, int]:
        """What makes a slot the same one across reloads."""
        return (self.pair.url, self.pair.queue, self.index)

    def spawned(self, pid: int, now: float) -> None:
        """Call after the fork; `board.prepare()` must have run before it."""
        self.pid = pid
        self.spawned_at = now
        self.stop_reason = None
        self.stop_kind = ""
        self.kill_sent = False
        self.board.set_pid(pid)
        try:
            self.process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self.process = None

    def ended(self, status: int, now: float, backoff: ExponentialBackoff) -> str:
        """Record the death of the slot's worker; return the reason for the log.

        Read before the scoreboard is reset: a worker that dies while a message is in its
        handler exited mid-message, whatever its exit code (`os._exit(0)` included).
        """
        code = os.waitstatus_to_exitcode(status)
        healthy = self.board.get("ready") and now - self.spawned_at >= HEALTHY_AFTER
        if self.stop_reason is not None:
            # The manager's own kills are recycles, but for a failed start ("crash").
            reason, kind = self.stop_reason, self.stop_kind
            crashed = kind == "crash"
        elif self.board.busy_for():
            reason, kind, crashed = f"exited mid-message ({explain_exit(status)})", "crash", True
        elif code in _RECYCLES:
            (reason, kind), crashed = _RECYCLES[ExitCode(code)], False
        elif code in _EXIT_WORDS:
            reason, crashed = _EXIT_WORDS[ExitCode(code)], code != ExitCode.OK
            kind = "crash" if crashed else ""
        else:
            reason, kind, crashed = explain_exit(status), "crash", True
        unstarted = self.board.first_unstarted
        if not crashed:
            self.bad_exits = 0
        elif healthy or self.board.made_progress:
            # It settled a message before it died: respawn at once. A worker that dies before
            # settling anything (a bad import, a refused login, a failing setup(), or the
            # same delivery ending its worker again and again) backs off.
            self.bad_exits = 1
        else:
            self.bad_exits += 1
        self.previous_exit = reason if (crashed or self.stop_reason) else None
        if unstarted is not None:  # else the worker never took over: keep what we knew
            self.previous_unstarted, self.spared = unstarted, ()
        else:
            interrupted = self.board.replay_interrupted
            if interrupted is not None:  # bounded: a slot that keeps dying that way backs off
                self.spared = (*self.spared, interrupted)[-SPARED_KEPT:]
            self.board.hand_on(self.previous_unstarted, self.spared)  # for the keeper
        delay = backoff.compute(self.bad_exits)
        self.next_start = now + delay
        self.board.worker_ended(reason, kind, time.time() + delay, self.bad_exits)
        self.pid = None
        self.process = None
        self.stop_reason = None
        return reason

    def start_failed(self, reason: str, now: float, backoff: ExponentialBackoff) -> float:
        """No worker could be started (the fork failed): a failure like a crash at start,
        retried after the same backoff. Returns that delay."""
        self.bad_exits += 1
        delay = backoff.compute(self.bad_exits)
        self.next_start = now + delay
        self.board.worker_ended(reason, "", time.time() + delay, self.bad_exits)
        return delay

    def rss(self) -> int:
        """Resident memory of the worker in bytes; 0 if it cannot be read."""
        if self.process is None:
            return 0
        try:
            return int(self.process.memory_info().rss)
        except psutil.Error:
            return 0


@dataclass
class KeeperSlot:
    """The lease keeper's place: one per manager, restarted a second after any exit."""

    pid: int | None = None
    next_start: float = 0.0
    restarting: bool = False  # asked to stop so that a new one takes a new slot list

    def ended(self, status: int, now: float, restart: bool) -> None:
        if self.restarting or not restart:
            log.info("keeper %d stopped", self.pid)
            self.next_start = now
        else:
            log.warning("keeper %d exited: %s; restarting in 1s", self.pid, explain_exit(status))
            self.next_start = now + 1.0
        self.pid = None
        self.restarting = False
