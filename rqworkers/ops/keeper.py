"""The keeper: a child of the manager that holds its workers' leases and reclaims orphans.

A lease's value is the worker's status (JSON: name, node, pid, state, counts, RSS, last
exit), so `rqworkers status` can show every worker of every node from Redis alone.

Leases live in their own process, not in the workers: a handler that runs for an hour or
holds the GIL in C code cannot renew anything, and its message must not be taken away and
run twice. Liveness comes from the manager, which sees a child's death at once and writes
each live worker's pid into its scoreboard; the keeper renews a lease for every slot with a
pid. A lease only expires when the whole node is gone (or cut off from Redis, or frozen)
for `lease_ttl` seconds.

It also fires the config's `[[schedules]]` (`schedules.Scheduler`), with no leader: every
manager's keeper tries, one enqueues each fire time.

Every `reclaim_interval` the keeper also looks, on every queue it serves, for registered
workers whose lease has expired, and hands their private lists back to the shared queue.
One node of the fleet a pass walks a queue's whole registry (it holds the queue's reclaim
turn); the others look at their own idle slots only, so that a node costs Redis the same
in a fleet of 200 as alone.
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

import psutil
import setproctitle

from rqworkers.common.backoff import RETRY_CAP
from rqworkers.common.process import StopFlag
from rqworkers.config import Config
from rqworkers.errors import ExitCode
from rqworkers.ops.metrics import Metrics, SlotView, health, liveness, serve
from rqworkers.ops.schedules import Scheduler
from rqworkers.ops.web import Site
from rqworkers.store.connections import Client, connect, redact
from rqworkers.store.flow import NO_LIMITS, Limits
from rqworkers.store.outage import REDIS_ERRORS, Outage, explain, is_outage
from rqworkers.store.queue import (
    ReliableQueue,
    Snapshot,
    expired_workers,
    publish_status,
    registered_workers,
    renew_leases,
    shared_lengths,
    take_reclaim_turn,
)
from rqworkers.worker.scoreboard import Scoreboard

log = logging.getLogger(__name__)

# Seconds between status updates (and lease renewals): one command per worker each time,
# which is most of what an idle pair costs Redis.
STATUS_INTERVAL = 5.0
# Seconds a Redis may take to connect or reply to the keeper (at most a sixth of the lease
# TTL): one that hangs delays the renewals of the others by no more, so that those still
# come at least every half TTL.
REPLY_TIMEOUT = 1.5
# A reclaim turn lasts this share of `reclaim_interval`, or of `lease_ttl` if shorter: less
# than a whole interval, so that a lone node, whose passes are one interval apart, never
# finds its own last turn still held; and no longer than a lease, so that a node configured
# with a long interval cannot hold the turn, and other nodes' reclaims, back for long.
TURN_SHARE = 0.8


@dataclass(frozen=True)
class Lease:
    url: str
    queue: str
    worker_id: str
    name: str
    host: str  # the host's name in the config, for metric labels
    board: Scoreboard  # the slot's; its pid says whether the worker lives
    concurrency: int = 1  # messages its worker may run at once
    limits: Limits = NO_LIMITS  # its pair's flow limits, for what `/metrics` shows of them


@dataclass(frozen=True)
class KeeperSpec:
    node: str
    manager_pid: int
    lease_ttl: float
    reclaim_interval: float
    leases: tuple[Lease, ...]
    metrics_address: str | None = None
    manager_start_time: float = 0.0  # wall clock
    config: Config | None = None  # what the status page shows and acts on (`rqworkers.ops.web`)


def main(spec: KeeperSpec) -> int:
    setproctitle.setproctitle("rqworkers: keeper")
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    # A terminal's Ctrl-C reaches the manager's whole group, this process included: the
    # manager stops it last, once its workers no longer need their leases.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        keeper.farewell()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        keeper.close()
    return ExitCode.OK


@dataclass
class Endpoint:
    """One Redis (one URL) that the keeper serves, on a schedule of its own.

    Endpoints are served one after the other, each call bounded by a short reply timeout:
    one that hangs holds the others' renewals back by at most one timeout per pass, and one
    that fails postpones only its own reclaims.
    """

    url: str
    client: Client
    leases: tuple[Lease, ...]
    outage: Outage
    lasting: str | None = None  # the lasting error last logged, so each is logged once
    next_renew: float = 0.0
    next_reclaim: float = 0.0

    @property
    def queues(self) -> list[str]:
        return sorted({lease.queue for lease in self.leases})


class Keeper:
    def __init__(self, spec: KeeperSpec) -> None:
        self.spec = spec
        # Often enough to keep leases (a third of their TTL) and status fresh.
        self.renew_every = min(spec.lease_ttl / 3, STATUS_INTERVAL)
        self.turn = TURN_SHARE * min(spec.reclaim_interval, spec.lease_ttl)
        timeout = min(REPLY_TIMEOUT, spec.lease_ttl / 6)
        self.endpoints = [
            Endpoint(
                url,
                connect(url, timeout=timeout),
                tuple(lease for lease in spec.leases if lease.url == url),
                Outage(f"keeper: redis at {redact(url)}"),
            )
            for url in sorted({lease.url for lease in spec.leases})
        ]
        schedules = spec.config.schedules if spec.config else ()
        self.scheduler = Scheduler(schedules, timeout) if schedules else None
        self.processes: dict[int, psutil.Process] = {}  # live workers only, for their RSS
        self.snapshots: dict[tuple[str, str], Snapshot] = {}  # for metrics only

    def serve_metrics(self) -> ThreadingHTTPServer | None:
        targets = tuple(SlotView(x.host, x.queue, x.name, x.board) for x in self.spec.leases)
        collector = Metrics(
            targets, lambda: dict(self.snapshots), self.spec.manager_start_time, self.rss
        )
        site = Site(self.spec.config) if self.spec.config else None
        try:
            server = serve(
                str(self.spec.metrics_address),
                collector,
                lambda: health(targets, self.spec.manager_pid),
                site.handle if site else None,
                lambda: liveness(self.spec.manager_pid),
            )
        except OSError as exc:  # the port is taken: keep the leases going regardless
            log.error("cannot serve metrics on %s: %s", self.spec.metrics_address, exc)
            return None
        if site:
            site.history.start()  # the chart's past, for a page opened later
        return server

    def next_due(self) -> float:
        due = [min(x.next_renew, x.next_reclaim) for x in self.endpoints]
        if self.scheduler:  # its times are wall clock
            due.append(time.monotonic() + self.scheduler.next_due() - time.time())
        return min(due, default=time.monotonic() + self.renew_every)

    def tick(self, now: float) -> None:
        """Serve every endpoint that is due: renew its leases first, then reclaim, so that a
        live worker's lease is fresh before any check. A failure ends the endpoint's turn."""
        for endpoint in self.endpoints:
            if now >= endpoint.next_renew:
                endpoint.next_renew = now + self.renew_every
                if self.guarded(endpoint, self.renew) and self.spec.metrics_address:
                    self.guarded(endpoint, self.read_queues)
            if now >= endpoint.next_reclaim:
                endpoint.next_reclaim = now + self.spec.reclaim_interval
                for queue in endpoint.queues:
                    if not self.guarded(endpoint, functools.partial(self.reclaim, queue=queue)):
                        break
        if self.scheduler:
            self.scheduler.tick(time.time())
        self.forget_processes()

    def guarded(self, endpoint: Endpoint, action: Callable[[Endpoint], None]) -> bool:
        """Run one action; an error is logged once per outage, never raised. True if it
        succeeded. The endpoint's next renewal is its retry."""
        try:
            action(endpoint)
        except REDIS_ERRORS as exc:
            if not is_outage(exc):  # never cured by retrying soon: tried at the next pass
                self.lasting_error(endpoint, exc)
                return False
            endpoint.outage.record(exc)
            now = time.monotonic()
            # Back within a second of Redis answering again, whatever the renewal period.
            endpoint.next_renew = min(endpoint.next_renew, now + RETRY_CAP)
            # Leases may have lapsed meanwhile: give every node a full TTL to renew first.
            endpoint.next_reclaim = max(endpoint.next_reclaim, now + self.spec.lease_ttl)
            return False
        endpoint.outage.over()
        endpoint.lasting = None
        return True

    def lasting_error(self, endpoint: Endpoint, exc: Exception) -> None:
        """Log an error reply that waiting cannot cure (a key of the wrong type, say) once,
        not at every renewal; the keeper goes on with its other work."""
        cause = explain(exc)
        if cause != endpoint.lasting:
            endpoint.lasting = cause
            log.error("keeper: redis at %s refused an operation: %s", redact(endpoint.url), cause)

    def read_queues(self, endpoint: Endpoint) -> None:
        """Refresh the queue lengths and flow state that `/metrics` reports: the lengths
        read by one node a renewal period and shared (`shared_lengths`), so they are at most
        two periods old; the flow state read by each node (a few commands)."""
        pairs = {lease.queue: lease for lease in endpoint.leases}
        for queue in endpoint.queues:
            lease = pairs[queue]
            read = shared_lengths(endpoint.client, queue, self.renew_every, lease.limits)
            self.snapshots[(lease.host, queue)] = read

    def renew(self, endpoint: Endpoint) -> None:
        """Renew the lease of every live worker; its value is the worker's status. A slot
        without one (in restart backoff) has its status written, its lease left to lapse."""
        live: dict[tuple[str, str], str] = {}
        idle: dict[tuple[str, str], str] = {}
        for lease in endpoint.leases:
            key = (lease.queue, lease.worker_id)
            (live if lease.board.pid else idle)[key] = json.dumps(self.status(lease))
        if live:
            renew_leases(endpoint.client, live, self.spec.lease_ttl)
        if idle:
            publish_status(endpoint.client, idle)

    def farewell(self) -> None:
        """The manager has stopped every worker: say so in their leases, rather than leave
        the last state published (`idle`, say) until they expire."""
        if any(lease.board.pid for lease in self.spec.leases):
            return  # a keeper replaced while workers run (a reload): nothing has stopped
        for endpoint in self.endpoints:
            values = {
                (x.queue, x.worker_id): json.dumps(self.status(x, "stopped"))
                for x in endpoint.leases
            }
            try:
                publish_status(endpoint.client, values)
            except REDIS_ERRORS as exc:
                log.warning("could not mark the workers of %s stopped: %s", endpoint.url, exc)

    def status(self, lease: Lease, state: str | None = None) -> dict[str, object]:
        board = lease.board
        return {
            "name": lease.name,
            "node": self.spec.node,
            "manager_pid": self.spec.manager_pid,
            "pid": board.pid,
            "state": state or board.state(),
            "waiting_for": board.waiting_reason,
            "succeeded": board.succeeded,
            "failed": board.failed,
            "current_age": round(board.busy_for(), 3),
            "in_flight": board.in_flight(),
            "concurrency": lease.concurrency,
            "rss": self.rss(board.pid),
            "since": board.get("since"),
            "last_exit": board.last_exit,
            "at": time.time(),
            "every": self.renew_every,  # seconds until the next: older news is stale
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

    def forget_processes(self) -> None:
        """Drop the cached handles of workers that are gone: only live pids stay."""
        live = {lease.board.pid for lease in self.spec.leases}
        for pid in list(self.processes):  # a copy: the metrics thread may add one meanwhile
            if pid not in live:
                self.processes.pop(pid, None)

    def reclaim(self, endpoint: Endpoint, queue: str) -> None:
        """Hand back the private lists of `queue`'s workers whose lease expired: every
        registered worker's when it is this node's turn (`take_reclaim_turn`), else only
        those of our own slots that have no live worker."""
        client = endpoint.client
        # Our own slots are included: a slot stuck in restart backoff whose lease lapsed
        # should not sit on its messages while other workers could handle them. Their
        # scoreboards tell what had started; a lost node's cannot be read.
        own = {
            (x.queue, x.worker_id): (x.board.first_unstarted, x.board.spared)
            for x in endpoint.leases
        }
        if take_reclaim_turn(client, queue, self.spec.node, self.turn):
            candidates = registered_workers(client, queue)
        else:
            candidates = [x.worker_id for x in endpoint.leases
                          if x.queue == queue and not x.board.pid]  # fmt: skip
        for worker_id in expired_workers(client, queue, candidates):
            unstarted, spared = own.get((queue, worker_id), (None, ()))
            lost = ReliableQueue(client, queue, worker_id)
            moved = lost.reclaim(unstarted or b"", spared=spared)
            if moved:
                log.warning(
                    "reclaimed %d message(s) of %s from %s (its lease expired)",
                    moved,
                    queue,
                    lost.keys.processing,
                )

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.client.close()
        if self.scheduler:
            self.scheduler.close()
