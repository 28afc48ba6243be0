"""The numbers a slot's worker, its manager and the keeper share through shared memory.

The manager needs to know how long the current message has run (to kill a handler stuck in
C code) and how many in-flight messages had reached the handler when a worker died,
without asking the worker: a dead or stuck worker cannot answer. The keeper needs the same
numbers to publish status and serve metrics. An anonymous shared mapping made before `fork`
costs the worker a few memory writes per message and no system call.

Counters are cumulative over every worker the slot has had, so metrics stay correct across
recycling; a worker's own figures are the difference from a base taken at its start.
Each field has a single writer (the worker or the manager), so no lock is needed.
"""

from __future__ import annotations

import bisect
import mmap
import struct
import time

# Upper bounds in seconds of the handler-duration histogram (Prometheus' defaults).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
RECYCLE_REASONS = ("max_requests", "timeout", "memory_soft", "memory_hard", "crash")

_WORKER_COUNTERS = ("handled", "failed", "retried", "dead_lettered", "redis_errors")
_REASON_BYTES = 120

_F = struct.Struct("d")
_I = struct.Struct("q")


def _layout() -> dict[str, int]:
    names = [
        "busy_since",  # worker: monotonic seconds when the current message started; 0 idle
        "started",  # worker: in-flight messages that reached the handler, not yet settled
        *_WORKER_COUNTERS,  # worker: cumulative over the slot's life
        "duration_sum",  # worker: seconds spent in handlers
        *(f"bucket{i}" for i in range(len(DURATION_BUCKETS) + 1)),  # worker: cumulative
        "pid",  # manager: the live worker's pid, 0 when none
        "stopping",  # manager: 1 once it asked the worker to stop
        "since",  # manager: wall-clock start time of the live worker
        "next_start",  # manager: wall-clock time of the next start while in backoff
        "handled_base",  # manager: `handled` when the live worker started
        "failed_base",
        *(f"recycled_{reason}" for reason in RECYCLE_REASONS),  # manager: cumulative
    ]
    return {name: 8 * i for i, name in enumerate(names)}


_OFFSETS = _layout()
_REASON_OFFSET = 8 * len(_OFFSETS)
_SIZE = _REASON_OFFSET + _REASON_BYTES
_FLOATS = {"busy_since", "duration_sum", "since", "next_start"}


class Scoreboard:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SIZE, flags=mmap.MAP_SHARED)

    def get(self, name: str) -> float:
        packer = _F if name in _FLOATS else _I
        value: float = packer.unpack_from(self._map, _OFFSETS[name])[0]
        return value

    def _set(self, name: str, value: float) -> None:
        if name in _FLOATS:
            _F.pack_into(self._map, _OFFSETS[name], value)
        else:
            _I.pack_into(self._map, _OFFSETS[name], int(value))

    def _add(self, name: str, amount: float = 1) -> None:
        self._set(name, self.get(name) + amount)

    # -- written by the worker --------------------------------------------------------------

    def busy(self) -> None:
        """A message reaches the handler."""
        self._set("busy_since", time.monotonic())
        self._add("started")

    def idle(self, failed: bool, seconds: float) -> None:
        """The handler is done with it after `seconds` (the message may not be settled yet)."""
        self._set("busy_since", 0.0)
        self._add("handled")
        if failed:
            self._add("failed")
        self._add("duration_sum", seconds)
        self._add(f"bucket{bisect.bisect_left(DURATION_BUCKETS, seconds)}")

    def settled(self, count: int) -> None:
        """`count` started messages left the private list (acked, retried, dead-lettered)."""
        self._add("started", -count)

    def count(self, event: str) -> None:
        """One more `retried`, `dead_lettered` or `redis_errors`."""
        self._add(event)

    # -- written by the manager -------------------------------------------------------------

    def prepare(self) -> None:
        """Before forking a new worker: clear what described the previous one."""
        self._set("busy_since", 0.0)
        self._set("started", 0)
        self._set("stopping", 0)
        self._set("since", time.time())
        self._set("next_start", 0.0)
        self._set("handled_base", self.get("handled"))
        self._set("failed_base", self.get("failed"))

    def set_pid(self, pid: int) -> None:
        self._set("pid", pid)

    def worker_ended(self, reason: str, recycle: str, next_start: float) -> None:
        """Record why the worker ended (`recycle` is one of RECYCLE_REASONS or '')."""
        self._set("pid", 0)
        self._set("busy_since", 0.0)
        self._set("next_start", next_start)
        if recycle:
            self._add(f"recycled_{recycle}")
        encoded = reason.encode("utf-8", "replace")[: _REASON_BYTES - 1]
        self._map[_REASON_OFFSET : _REASON_OFFSET + _REASON_BYTES] = encoded.ljust(
            _REASON_BYTES, b"\0"
        )

    def stop_requested(self) -> None:
        self._set("stopping", 1)

    # -- read by anyone ---------------------------------------------------------------------

    def busy_for(self) -> float:
        """Seconds the current message has been running; 0 when idle."""
        since = self.get("busy_since")
        return time.monotonic() - since if since else 0.0

    @property
    def pid(self) -> int:
        return int(self.get("pid"))

    @property
    def started(self) -> int:
        return max(0, int(self.get("started")))

    @property
    def handled(self) -> int:
        """Messages handled by the live (or last) worker of the slot."""
        return int(self.get("handled") - self.get("handled_base"))

    @property
    def failed(self) -> int:
        return int(self.get("failed") - self.get("failed_base"))

    @property
    def last_exit(self) -> str:
        raw = self._map[_REASON_OFFSET : _REASON_OFFSET + _REASON_BYTES]
        return raw.rstrip(b"\0").decode("utf-8", "replace")

    def state(self) -> str:
        if not self.pid:
            return "backoff" if self.get("next_start") > time.time() else "starting"
        if self.get("stopping"):
            return "stopping"
        return "busy" if self.get("busy_since") else "idle"

    def totals(self) -> dict[str, float]:
        """Cumulative counters for metrics."""
        names = (*_WORKER_COUNTERS, "duration_sum")
        result = {name: self.get(name) for name in names}
        result.update({f"recycled_{r}": self.get(f"recycled_{r}") for r in RECYCLE_REASONS})
        return result

    def buckets(self) -> list[int]:
        """Handler durations per histogram bucket (not cumulative), the last one +Inf."""
        return [int(self.get(f"bucket{i}")) for i in range(len(DURATION_BUCKETS) + 1)]
