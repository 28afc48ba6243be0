"""The throughput chart's history, kept by the serving process so that a page just opened
shows the last minutes at once, not after its own second refresh.

A thread samples the status every `EVERY` seconds, through the page's shared one-second
read (an open page and the sampler share a read), and keeps the last `KEEP` seconds of
points: succeeded and failed messages a second, every queue together, computed from
differences of the workers' published counts. Memory is bounded: `KEEP / EVERY` points and
the counts of the workers last seen.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EVERY = 3.0  # seconds between samples
KEEP = 300.0  # seconds of history kept (five minutes)

Counts = dict[str, tuple[Any, int, int]]  # worker → (pid, succeeded, failed)


class History:
    """Points `{t, ok, failed}`: `t` the sample's time (epoch seconds), the rates over the
    interval that ended then."""

    def __init__(
        self,
        read: Callable[[], list[dict[str, Any]]],
        every: float = EVERY,
        keep: float = KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.read = read  # the status, as `/api/status` answers it
        self.every = every
        self.keep = keep
        self.clock = clock
        self._points: collections.deque[dict[str, float]] = collections.deque(
            maxlen=max(1, int(keep / every))
        )
        self._last: tuple[float, Counts] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a bug or Redis away: a gap in the chart, never a dead thread
                log.debug("history: sample failed", exc_info=True)
            if self._stop.wait(self.every):
                return

    def sample(self) -> None:
        """Read the status once and add the point since the previous sample."""
        now, counts = self.clock(), _counts(self.read())
        with self._lock:
            if self._last is not None and now > self._last[0]:
                before, seconds = self._last[1], now - self._last[0]
                ok = failed = 0
                for worker, (pid, succeeded, fails) in counts.items():
                    if worker not in before:
                        continue  # first seen: its past is not this interval's
                    old_pid, old_ok, old_failed = before[worker]
                    restarted = old_pid != pid or succeeded < old_ok or fails < old_failed
                    ok += succeeded if restarted else succeeded - old_ok
                    failed += fails if restarted else fails - old_failed
                self._points.append({"t": now, "ok": ok / seconds, "failed": failed / seconds})
            self._last = (now, counts)

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            points = list(self._points)
        return {"every": self.every, "keep": self.keep, "points": points}


def _counts(statuses: list[dict[str, Any]]) -> Counts:
    counts: Counts = {}
    for pair in statuses:
        for w in (pair.get("snapshot") or {}).get("workers") or []:
            key = json.dumps([pair.get("host"), pair.get("queue"), w.get("worker_id")])
            # `succeeded` (older managers: `handled`), as the page counts them.
            succeeded = _int(w.get("succeeded", w.get("handled")))
            counts[key] = (w.get("pid"), succeeded, _int(w.get("failed")))
    return counts


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
