"""The keeper: a child of the manager that holds its workers' leases and reclaims orphans.

Leases live in their own process, not in the workers: a handler that runs for an hour or
holds the GIL in C code cannot renew anything, and its message must not be taken away and
run twice. Liveness comes from the manager, which sees a child's death at once and writes
each live worker's pid into its scoreboard; the keeper renews a lease for every slot with a
pid. A lease only expires when the whole node is gone (or cut off from Redis, or frozen)
for `lease_ttl` seconds.

Every `reclaim_interval` the keeper also looks, on every queue it serves, for registered
workers whose lease has expired, and hands their private lists back to the shared queue.
After an outage of its own it waits one `lease_ttl` before reclaiming, so that every live
node has had the time to renew leases Redis may have lost meanwhile.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from rqworkers.backoff import Outage
from rqworkers.config import redact
from rqworkers.errors import ExitCode
from rqworkers.queue import (
    TRANSIENT_ERRORS,
    Keys,
    ReliableQueue,
    connect,
    lease_alive,
    registered_workers,
    renew_leases,
)
from rqworkers.scoreboard import Scoreboard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    url: str
    queue: str
    worker_id: str
    board: Scoreboard  # the slot's; its pid says whether the worker lives


@dataclass(frozen=True)
class KeeperSpec:
    owner: str  # lease value: who holds it, for operators reading Redis
    manager_pid: int
    lease_ttl: float
    reclaim_interval: float
    leases: tuple[Lease, ...]


class _Stop:
    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.set = True


def main(spec: KeeperSpec) -> int:
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    keeper = Keeper(spec)
    try:
        while not stop.set:
            if os.getppid() != spec.manager_pid:
                return ExitCode.ORPHANED
            keeper.tick(time.monotonic())
            deadline = keeper.next_due()
            while not stop.set and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        keeper.close()
    return ExitCode.OK


class Keeper:
    def __init__(self, spec: KeeperSpec) -> None:
        self.spec = spec
        self.clients = {url: connect(url) for url in {lease.url for lease in spec.leases}}
        self.queues = sorted({(lease.url, lease.queue) for lease in spec.leases})
        self.outages = {url: Outage(f"keeper: redis at {redact(url)}") for url in self.clients}
        self.renew_every = spec.lease_ttl / 3
        self.next_renew = 0.0
        self.next_reclaim = 0.0

    def next_due(self) -> float:
        return min(self.next_renew, self.next_reclaim)

    def tick(self, now: float) -> None:
        """Renew leases first, then reclaim: a live worker's lease is fresh before any check."""
        if now >= self.next_renew:
            self.next_renew = now + self.renew_every
            for url in self.clients:
                self.guarded(url, self.renew)
        if now >= self.next_reclaim:
            self.next_reclaim = now + self.spec.reclaim_interval
            for url, queue in self.queues:
                self.guarded(url, functools.partial(self.reclaim, queue=queue))

    def guarded(self, url: str, action: Callable[[str], None]) -> None:
        """Run one action against `url`; an error is logged once per outage, never raised."""
        outage = self.outages[url]
        try:
            action(url)
        except TRANSIENT_ERRORS as exc:
            outage.record(exc)  # the ticks pace the retries
            # Leases may have lapsed meanwhile: give every node a full TTL to renew first.
            self.next_reclaim = max(self.next_reclaim, time.monotonic() + self.spec.lease_ttl)
            self.next_renew = min(self.next_renew, time.monotonic() + 1.0)
            return
        outage.over()

    def renew(self, url: str) -> None:
        live = [
            Keys.of(lease.queue, lease.worker_id).lease
            for lease in self.spec.leases
            if lease.url == url and lease.board.pid
        ]
        if live:
            renew_leases(self.clients[url], live, self.spec.owner, self.spec.lease_ttl)

    def reclaim(self, url: str, queue: str) -> None:
        # Our own slots are included: a slot stuck in restart backoff whose lease lapsed
        # should not sit on its messages while other workers could handle them.
        client = self.clients[url]
        for worker_id in registered_workers(client, queue):
            if lease_alive(client, queue, worker_id):
                continue
            moved = ReliableQueue(client, queue, worker_id).reclaim()
            if moved:
                log.warning(
                    "reclaimed %d message(s) of %s from %s:processing:%s (its lease expired)",
                    moved,
                    queue,
                    queue,
                    worker_id,
                )

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
