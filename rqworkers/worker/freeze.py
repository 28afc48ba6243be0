"""A worker frozen past its lease, or orphaned, must not run on past `max_running`.

A process stopped long enough (SIGSTOP, a paused VM, a host under swap) loses its lease;
another node then reclaims its messages and gives its permits back, and others start what
those permits allow. The frozen handler, when it wakes, is still mid-message: left alone it
would run beside them, one past the limit. So a worker of a queue with `max_running` keeps
a small thread that notices such a gap in time and, if the worker held a permit and a
reclaim took its list meanwhile (its `owner` key is gone), ends the process at once (exit 75, as a
worker whose list another process took over). What it ran is not lost: the reclaim moved
it, charged, to the retry set, and it runs again elsewhere.

An orphan is the same case: a manager SIGKILLed alone leaves its workers finishing the
message in hand, while a new manager's workers (the same worker ids) replay their lists and
give their permits back, or another node reclaims them. So an orphaned worker holding a
permit looks too, every tick, and ends itself once its list is someone else's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from rqworkers.errors import ExitCode
from rqworkers.store.connections import Client, connect
from rqworkers.store.keys import Keys
from rqworkers.store.outage import REDIS_ERRORS

log = logging.getLogger(__name__)

TICK = 0.2  # seconds between two looks at the clock


def _clock() -> float:
    """Seconds that also count while the machine is suspended (CLOCK_BOOTTIME on Linux)."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class FreezeWatch:
    """Watches for a gap of at least `lease_ttl / 2` between two ticks; then asks Redis
    whether this worker's permits are still its own, and exits if they are not."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        lease_ttl: float,
        holds_permit: Callable[[], bool],
        manager_pid: int,
        owner: bytes,
    ) -> None:
        self.url = url
        self.keys = keys
        self.gap = lease_ttl / 2
        self.holds_permit = holds_permit
        self.manager_pid = manager_pid
        self.owner = owner  # what `<queue>:owner:<worker-id>` says while the list is ours
        self._client: Client | None = None
        self.last = _clock()  # when the clock was last looked at, by either thread
        self.thread = threading.Thread(target=self.run, name="freeze-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        self.last = _clock()
        while True:
            time.sleep(TICK)
            self.check(orphaned=os.getppid() != self.manager_pid)

    def check(self, orphaned: bool = False) -> None:
        """Exit if this process was frozen (no tick for half a lease) or is `orphaned`, and
        its list was taken over meanwhile. The worker's own thread calls it too, before
        each take: woken from a freeze, it may get there before this thread's next tick,
        and its take would make the list its own again."""
        now = _clock()
        frozen = now - self.last - TICK >= self.gap
        if (frozen or orphaned) and self.revoked():
            why = f"frozen {now - self.last:.1f}s, past its lease" if frozen else "orphaned"
            log.error(
                "this worker was %s, and its list and permits were taken over meanwhile: "
                "exiting before it runs beside those who took them",
                why,
            )
            os._exit(ExitCode.SUPERSEDED)
        self.last = now

    def revoked(self) -> bool:
        """True if this worker holds a permit in its own view, but a reclaim gave it away."""
        if not self.holds_permit():
            return False
        try:
            if self._client is None:
                self._client = connect(self.url, timeout=2.0)
            # A reclaim strikes the list's owner, a new manager's replay names its own
            # worker owner (each gives the permits back); the worker itself is mid-message,
            # so no take of its own has named it owner again.
            return self._client.get(self.keys.owner) != self.owner
        except REDIS_ERRORS:
            return False  # Redis cannot say: the worker's own next take will
