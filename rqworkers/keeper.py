"""The keeper: a child of the manager that holds its workers' leases and reclaims orphans.

A lease's value is the worker's status (JSON: name, node, pid, state, counts, RSS, last
exit), so `rqworkers status` can show every worker of every node from Redis alone.

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
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from types import FrameType

import psutil

from rqworkers.backoff import Outage
from rqworkers.config import redact
from rqworkers.connections import connect
from rqworkers.errors import ExitCode
from rqworkers.metrics import Metrics, Target, health, serve
from rqworkers.queue import (
    TRANSIENT_ERRORS,
    ReliableQueue,
    Snapshot,
    lease_alive,
    registered_workers,
    renew_leases,
    snapshot,
)
from rqworkers.scoreboard import Scoreboard

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0  # seconds between status updates (and lease renewals)


@dataclass(frozen=True)
class Lease:
    url: str
    queue: str
    worker_id: str
    name: str
    host: str  # the host's name in the config, for metric labels
    board: Scoreboard  # the slot's; its pid says whether the worker lives


@dataclass(frozen=True)
class KeeperSpec:
    node: str
    manager_pid: int
    lease_ttl: float
    reclaim_interval: float
    leases: tuple[Lease, ...]
    metrics_address: str | None = None
    started: float = 0.0  # wall-clock start of the manager


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
    server = keeper.serve_metrics() if spec.metrics_address else None
    try:
        while not stop.set:
            if os.getppid() != spec.manager_pid:
                return ExitCode.ORPHANED
            keeper.tick(time.monotonic())
            deadline = keeper.next_due()
            while not stop.set and time.monotonic() < deadline:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        keeper.close()
    return ExitCode.OK


class Keeper:
    def __init__(self, spec: KeeperSpec) -> None:
        self.spec = spec
        self.clients = {url: connect(url) for url in {lease.url for lease in spec.leases}}
        self.queues = sorted({(lease.url, lease.queue) for lease in spec.leases})
        self.outages = {url: Outage(f"keeper: redis at {redact(url)}") for url in self.clients}
        # Often enough to keep leases (a third of their TTL) and status fresh.
        self.renew_every = min(spec.lease_ttl / 3, STATUS_INTERVAL)
        self.processes: dict[int, psutil.Process] = {}
        self.next_renew = 0.0
        self.next_reclaim = 0.0
        self.snapshots: dict[tuple[str, str], Snapshot] = {}  # for metrics only

    def serve_metrics(self) -> ThreadingHTTPServer | None:
        targets = tuple(Target(x.host, x.queue, x.name, x.board) for x in self.spec.leases)
        collector = Metrics(targets, lambda: dict(self.snapshots), self.spec.started, self.rss)
        try:
            return serve(
                str(self.spec.metrics_address),
                collector,
                lambda: health(targets, self.spec.manager_pid),
            )
        except OSError as exc:  # the port is taken: keep the leases going regardless
            log.error("cannot serve metrics on %s: %s", self.spec.metrics_address, exc)
            return None

    def next_due(self) -> float:
        return min(self.next_renew, self.next_reclaim)

    def tick(self, now: float) -> None:
        """Renew leases first, then reclaim: a live worker's lease is fresh before any check."""
        if now >= self.next_renew:
            self.next_renew = now + self.renew_every
            for url in self.clients:
                self.guarded(url, self.renew)
                if self.spec.metrics_address:
                    self.guarded(url, self.read_queues)
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

    def read_queues(self, url: str) -> None:
        """Refresh the queue lengths that `/metrics` reports."""
        hosts = {(x.url, x.queue): x.host for x in self.spec.leases}
        for queue_url, queue in self.queues:
            if queue_url == url:
                self.snapshots[(hosts[(url, queue)], queue)] = snapshot(self.clients[url], queue)

    def renew(self, url: str) -> None:
        """Renew the lease of every live worker; its value is the worker's status."""
        values = {
            (lease.queue, lease.worker_id): json.dumps(self.status(lease))
            for lease in self.spec.leases
            if lease.url == url and lease.board.pid
        }
        if values:
            renew_leases(self.clients[url], values, self.spec.lease_ttl)

    def status(self, lease: Lease) -> dict[str, object]:
        board = lease.board
        return {
            "name": lease.name,
            "node": self.spec.node,
            "manager_pid": self.spec.manager_pid,
            "pid": board.pid,
            "state": board.state(),
            "handled": board.handled,
            "failed": board.failed,
            "current_age": round(board.busy_for(), 3),
            "rss": self.rss(board.pid),
            "since": board.get("since"),
            "last_exit": board.last_exit,
            "at": time.time(),
        }

    def rss(self, pid: int) -> int:
        process = self.processes.get(pid)
        try:
            if process is None:
                process = self.processes[pid] = psutil.Process(pid)
            return int(process.memory_info().rss)
        except psutil.Error:
            self.processes.pop(pid, None)
            return 0

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
