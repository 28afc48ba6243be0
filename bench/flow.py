"""Flow control (issue 19) measured: accuracy of the limits, their cost, fairness, recovery.

    python -m bench.flow [--only accuracy overhead fairness recovery] [--topology single cluster]
                         [--rounds R] [--tiny] [--json]
    python -m bench.flow --render run.json

Every case starts the real `python -m rqworkers run` (one or several managers, each a node
of its own) on a private redis-server, or on a private 3-master Redis Cluster, and judges
the limits from inside the handlers (`bench/flowapp.py`), which record each start and end
in a separate bookkeeping redis-server.

- accuracy: 3 managers x 2 processes x `concurrency` 4 (24 handlers) on one queue, with
  `max_running` 5 and 50 ms handlers, then with `rate_limit = "50/s"` and 10 ms handlers,
  then the same per group (`group_max_running` 2, `group_rate_limit = "20/s"`, 3 groups).
  Reported: the most handlers ever running at once (a counter in the bookkeeping Redis,
  and again from the start and end times, per group where there are groups), the most
  starts in any sliding 1 s window, and how close the fleet came to the limit: the run's
  length against the least the limit allows. On the Cluster the queue is `{flow}:q`: its
  limits' keys share its slot.
- overhead: one worker process, no-op handler, prefetch 1 and 100, with no limit, with
  `max_running = 1000000` and with `rate_limit = "1000000/s"` (limits that never bind), as
  `bench/throughput.py` times rqworkers (messages RENAMEd onto the queue while the worker
  blocks, rate = N / (last handler return - RENAME)). The three cases of a prefetch run back
  to back in each round, each a fresh start of the service; a ratio is taken within its
  round, and the median of the rounds is reported. Redis CPU per message is the change of
  INFO cpu (used_cpu_user + used_cpu_sys) over the drain, divided by N; rqworkers' is that
  of its manager, worker and keeper (/proc schedstat).
- fairness: a flood of one group, then a few messages of another, 4 workers, with
  `group_by` (and `group_max_running`) and without (FIFO, the yardstick): when the small
  group's messages start and finish, against their fair share of the workers.
- recovery: the time from a SIGKILL to the next handler start anywhere, `max_running = 1`,
  when the holder of the only permit is killed (its replacement starts on the same node),
  or its whole node is (the manager's session, with `lease_ttl` 3 s and `reclaim_interval`
  1 s on both nodes); and the most handlers running at once when a manager alone is killed
  (its workers, orphaned, finish their message) and started again at once on the same
  node, or not started again while another node reclaims.

Exit code 1 if a limit was exceeded anywhere (the report says where), else 0.

Run it under `nice`: the machine may be shared. Every process it starts is killed on the
way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from bench import flowapp
from bench.redisproc import free_port, wait_for
from bench.throughput import (
    QUEUE,
    STAGING,
    Bench,
    Processes,
    RedisServer,
    ServiceRun,
    _session,
    _terminate,
    bench_env,
    cpu_seconds,
    fill,
    machine_info,
    no_message_logs,
    start_redis,
)
from bench.windows import most_in_window

HOST = "127.0.0.1"
SECTIONS = ("accuracy", "overhead", "fairness", "recovery")
TOPOLOGIES = ("single", "cluster")
HANDLER = "bench.flowapp:Measure"
MAX_RUNNING = 5
RATE = 50  # starts per second
GROUPS = 3  # in the group cases, each limited to:
GROUP_MAX_RUNNING = 2
GROUP_RATE = 20
OVERHEAD_LIMITS = {  # case -> the pair's limit line: high enough never to bind
    "no limit": "",
    "max_running = 1000000": "max_running = 1000000",
    'rate_limit = "1000000/s"': 'rate_limit = "1000000/s"',
}
LEASE_TTL = 3.0  # the node-loss case's lease settings, short to keep the run short
RECLAIM_INTERVAL = 1.0
ORPHANS_NOTE = (
    "its workers are orphaned (SIGTERM on the manager's death: they finish the message in "
    "hand); most running at once, orphans included, from the handlers' start and end "
    "times, an orphan's exit ending its run if it ends itself mid-message"
)


# -- results --------------------------------------------------------------------------------


@dataclass
class Accuracy:
    topology: str
    limit: str  # "max_running = 5" or 'rate_limit = "50/s"'
    fleet: str  # "3 managers x 2 processes x concurrency 4"
    messages: int
    handler_ms: float
    groups: int = 0  # with groups, the figures below are of the group nearest its limit
    handled: int = 0  # distinct messages started
    starts: int = 0  # handler starts (a message started twice counts twice)
    pids: int = 0  # worker processes that started at least one
    nodes: int = 0  # managers whose workers started at least one
    per_process: list[int] = field(default_factory=list)  # starts per process, most first
    peak_counted: int = 0  # the bookkeeping counter's peak
    peak_overlap: int = 0  # the most handler intervals overlapping, from their times
    most_in_window: int = 0  # the most starts in any sliding 1 s window
    # How close the fleet came to the limit: the run's length, first start to last end
    # (max_running) or to last start (rate), against the least the limit allows: N /
    # max_running rounds of the handler's time, or a full window per N starts after the first N.
    seconds: float = 0.0
    least_seconds: float = 0.0
    ok: bool = False  # the limit held


@dataclass
class Overhead:
    prefetch: int
    case: str
    rates: list[float] = field(default_factory=list)  # messages/s, one per round
    n: int = 0  # messages per run
    redis_us: list[float] = field(default_factory=list)  # Redis CPU µs per message
    worker_us: list[float] = field(default_factory=list)  # rqworkers' CPU µs per message
    ratios: list[float] = field(default_factory=list)  # against "no limit", same round


@dataclass
class Recovery:
    case: str
    seconds: list[float] = field(default_factory=list)  # kill -> next start
    replacement: list[float] = field(default_factory=list)  # kill -> replacement's setup
    peaks: list[int] = field(default_factory=list)  # most running at once, where counted
    over: list[float] = field(default_factory=list)  # seconds with more than `limit` running
    limit: int = 1  # max_running
    note: str = ""


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    load: dict[str, list[float]] = field(default_factory=dict)
    accuracy: list[Accuracy] = field(default_factory=list)
    overhead: list[Overhead] = field(default_factory=list)
    fairness: list[dict[str, Any]] = field(default_factory=list)
    recovery: list[Recovery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- analysis -------------------------------------------------------------------------------


def time_over(intervals: Iterable[tuple[float, float]], limit: int) -> float:
    """How long more than `limit` of the intervals were open at once, in all."""
    events = sorted(e for start, end in intervals for e in ((start, 1), (end, -1)))
    now, since, total = 0, 0.0, 0.0
    for at, step in events:
        if now > limit:
            total += at - since
        now, since = now + step, at
    return total


def peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at once; an end at the same instant as a start comes first."""
    events = sorted(e for start, end in intervals for e in ((start, 1), (end, -1)))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


@dataclass(frozen=True)
class Start:
    at: float
    id: int
    group: str
    pid: int
    node: int  # the session of the worker's manager


def read_starts(book: redis.Redis) -> list[Start]:
    out = []
    for raw in book.lrange(flowapp.STARTS, 0, -1):
        at, number, group, pid, node = raw.decode().split()
        out.append(Start(float(at), int(number), group, int(pid), int(node)))
    return sorted(out, key=lambda s: s.at)


def read_ends(book: redis.Redis) -> dict[tuple[int, int], float]:
    """(message id, pid) -> when that process's run of it ended: twins have one id."""
    ends: dict[tuple[int, int], float] = {}
    for raw in book.lrange(flowapp.ENDS, 0, -1):
        at, number, pid = raw.decode().split()
        ends[(int(number), int(pid))] = float(at)
    return ends


# -- Redis: one server, or a cluster --------------------------------------------------------


class Cluster:
    """Three masters, no replicas, slots split by hand (CLUSTER ADDSLOTSRANGE, MEET)."""

    ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no")  # fmt: skip

    def __init__(self, procs: Processes, workdir: Path, binary: str, size: int = 3) -> None:
        self.ports: list[int] = []
        buses: list[int] = []
        self.pids: list[int] = []
        for i in range(size):
            port, bus = free_port(), free_port()
            folder = workdir / f"cluster{i}"
            folder.mkdir()
            args = [binary, "--port", str(port), "--bind", HOST, "--dir", str(folder),
                    "--cluster-port", str(bus), *self.ARGS]  # fmt: skip
            self.pids.append(procs.start(args, log=folder / "redis.log").pid)
            self.ports.append(port)
            buses.append(bus)
        nodes = [redis.Redis(host=HOST, port=p) for p in self.ports]
        for node in nodes:
            wait_for(lambda n=node: _pings(n), timeout=20, what="a cluster node to answer")
        share = 16384 // size
        for i, node in enumerate(nodes):
            last = 16383 if i == size - 1 else (i + 1) * share - 1
            node.execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
        for node in nodes[1:]:
            node.execute_command("CLUSTER MEET", HOST, self.ports[0], buses[0])
        for node in nodes:
            wait_for(lambda n=node: n.cluster("INFO").get("cluster_state") == "ok",
                     timeout=30, interval=0.1, what="cluster_state:ok")  # fmt: skip

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=HOST, port=self.ports[0], socket_timeout=10)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


# -- a fleet of managers --------------------------------------------------------------------


@dataclass
class Fleet:
    """Managers of one pair, each a node of its own, on one queue."""

    bench: FlowBench
    url: str
    queue: str
    pair: str  # the pair's lines beside host, queue and handler
    managers: int = 1
    processes: int = 1
    manager_lines: str = ""
    leaders: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def config(self, node: str) -> Path:
        path = self.bench.workdir / f"flow-{node}.toml"
        path.write_text(
            f"""
[manager]
check_interval = 0.2
shutdown_timeout = 5.0
node = "{node}"
{self.manager_lines}

[logging]
level = "INFO"
{no_message_logs()}

[hosts]
flow = "{self.url}"

[defaults]
max_requests = 0
soft_memory_limit = 0
hard_memory_limit = 0
timeout = 60.0

[[workers]]
host = "flow"
queue = "{self.queue}"
handler = "{HANDLER}"
processes = {self.processes}
{self.pair}
"""
        )
        return path

    @contextmanager
    def running(self) -> Iterator[Fleet]:
        """Start every manager; yield once each worker's setup has run; stop them all."""
        book = self.bench.book
        try:
            for i in range(self.managers):
                self.leaders.append(self.start_manager(i))
            want = self.managers * self.processes

            def ready() -> bool:
                for leader in self.leaders:
                    if leader.poll() is not None:
                        raise RuntimeError(f"a manager exited {leader.returncode}: see its log")
                return int(book.llen(flowapp.READY)) >= want

            wait_for(ready, timeout=60, what=f"{want} workers to run setup()", interval=0.05)
            yield self
        finally:
            for leader in self.leaders:  # all at once: their graceful stops overlap
                with suppress(ProcessLookupError):
                    leader.send_signal(signal.SIGTERM)
            for leader in self.leaders:
                self.bench.procs.stop(leader, timeout=10)
            self.leaders.clear()

    def start_manager(self, index: int) -> subprocess.Popen[bytes]:
        """The `index`-th node's manager (node `flow-a`, `flow-b`...), started."""
        node = f"flow-{chr(ord('a') + index)}"
        args = [sys.executable, "-m", "rqworkers", "run", "--config", str(self.config(node))]
        env = bench_env(self.bench.redis.url) | {flowapp.URL_ENV: self.bench.book_url}
        log = self.bench.workdir / f"{node}.log"
        return self.bench.procs.start(args, env=env, log=log)

    def kill_node(self, index: int) -> None:
        """SIGKILL a manager's whole session at once: manager, keeper and workers (each
        worker leads a process group of its own, so a group kill would miss them)."""
        leader = self.leaders[index]
        for pid in [leader.pid, *_session(leader.pid)]:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def node_of(self, pid: int) -> int:
        """Which manager's session a worker pid belongs to."""
        sid = os.getsid(pid)
        return next(i for i, leader in enumerate(self.leaders) if leader.pid == sid)


def messages(count: int, sleep: float, group: str | None = None, first: int = 0) -> list[bytes]:
    """Distinct JSON payloads, in the order they should be taken."""
    extra = {"group": group} if group else {}
    return [json.dumps({"id": first + i, "sleep": sleep, **extra}).encode() for i in range(count)]


def push(client: Any, queue: str, payloads: list[bytes]) -> None:
    """LPUSH in chunks, the first payload at the right end (taken first)."""
    for i in range(0, len(payloads), 1000):
        client.lpush(queue, *payloads[i : i + 1000])


# -- the bench ------------------------------------------------------------------------------


class FlowBench(Bench):
    """`Bench`'s redis-server (the queue's) and processes, a bookkeeping redis-server beside."""

    def __init__(self, args: argparse.Namespace, workdir: Path, procs: Processes) -> None:
        super().__init__(args, workdir, procs)
        self.out = Report(command=" ".join(["python -m bench.flow", *sys.argv[1:]]))
        self.bookkeeper: RedisServer = start_redis(procs, workdir / "book")
        self.book = self.bookkeeper.client()
        self.book_url = self.bookkeeper.url
        self.cluster: Cluster | None = None

    def note(self, text: str) -> None:
        self.out.notes.append(text)
        self.log(text)

    def run_all(self) -> Report:
        self.out.machine = machine_info(self.redis.binary)
        for name in SECTIONS:
            if self.args.only and name not in self.args.only:
                continue
            self.out.load[name] = list(os.getloadavg())
            getattr(self, name)()
        self.out.load["end"] = list(os.getloadavg())
        return self.out

    def target(self, topology: str) -> tuple[str, str, Any]:
        """The queue Redis's URL, a queue name there and a client for it."""
        if topology == "single":
            return self.redis.url, "flow:q", self.client
        if self.cluster is None:
            self.cluster = Cluster(self.procs, self.workdir, self.redis.binary)
        return self.cluster.url, "{flow}:q", self.cluster.client()

    def clean(self, client: Any) -> None:
        self.book.flushdb()
        if isinstance(client, redis.RedisCluster):
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        else:
            client.flushdb()

    # -- accuracy -------------------------------------------------------------------------

    def accuracy(self) -> None:
        tiny = self.args.tiny
        managers, processes, concurrency = (2, 1, 4) if tiny else (3, 2, 4)
        fleet = f"{managers} managers x {processes} processes x concurrency {concurrency}"
        for topology in self.args.topology:
            # limit lines, handler seconds, messages, groups (their messages interleaved)
            cases = [
                (f"max_running = {MAX_RUNNING}", 0.05, 40 if tiny else 400, 0),
                (f'rate_limit = "{RATE}/s"', 0.01, 60 if tiny else 200, 0),
            ]
            if not tiny:
                cases += [
                    (f'group_by = "group"\ngroup_max_running = {GROUP_MAX_RUNNING}', 0.05,
                     300, GROUPS),
                    (f'group_by = "group"\ngroup_rate_limit = "{GROUP_RATE}/s"', 0.01, 180,
                     GROUPS),
                ]  # fmt: skip
            for lines, sleep, n, groups in cases:
                limit = lines.replace("\n", ", ")
                self.log(f"accuracy: {topology}, {limit}, {fleet}, {n} messages")
                url, queue, client = self.target(topology)
                self.clean(client)
                pair = f"concurrency = {concurrency}\nprefetch = 10\n{lines}"
                case = Fleet(self, url, queue, pair, managers, processes)
                row = Accuracy(topology, limit, fleet, n, sleep * 1000, groups=groups)
                with case.running():
                    if groups:
                        payloads = [
                            json.dumps({"id": i, "sleep": sleep, "group": f"g{i % groups}"})
                            for i in range(n)
                        ]
                        push(client, queue, [p.encode() for p in payloads])
                    else:
                        push(client, queue, messages(n, sleep))
                    wait_for(lambda n=n: self.book.llen(flowapp.ENDS) >= n,
                             timeout=60 + n * sleep, what=f"{n} messages handled",
                             interval=0.05)  # fmt: skip
                self.judge_accuracy(row)
                self.out.accuracy.append(row)
                self.log(
                    f"  peak {row.peak_counted} (overlap {row.peak_overlap}), most in 1 s "
                    f"{row.most_in_window}, took {row.seconds:.2f} s "
                    f"(least {row.least_seconds:.2f}), "
                    f"starts per process {row.per_process} on {row.nodes} node(s), "
                    f"limit held: {row.ok}"
                )

    def judge_accuracy(self, row: Accuracy) -> None:
        """The limit's figures; with groups, those of the group that came closest to it
        (the counter's peak stays the whole queue's)."""
        starts, ends = read_starts(self.book), read_ends(self.book)
        times = [s.at for s in starts]
        row.starts, row.handled = len(starts), len({s.id for s in starts})
        row.pids = len({s.pid for s in starts})
        row.nodes = len({s.node for s in starts})
        row.per_process = sorted(Counter(s.pid for s in starts).values(), reverse=True)
        row.peak_counted = int(self.book.get(flowapp.PEAK) or 0)
        by_group: dict[str, list[Start]] = {}
        for start in starts:
            by_group.setdefault(start.group if row.groups else "-", []).append(start)
        row.peak_overlap = max(
            peak_overlap((s.at, ends.get((s.id, s.pid), s.at)) for s in group)
            for group in by_group.values()
        )
        row.most_in_window = max(
            most_in_window([s.at for s in group], 1.0) for group in by_group.values()
        )
        per_group = row.messages / max(1, row.groups)
        if "max_running" in row.limit:
            most = GROUP_MAX_RUNNING if row.groups else MAX_RUNNING
            row.seconds = max(ends.values()) - times[0]
            row.least_seconds = math.ceil(per_group / most) * row.handler_ms / 1000
            row.ok = row.peak_overlap <= most and (row.groups or row.peak_counted <= most)
        else:
            most = GROUP_RATE if row.groups else RATE
            row.seconds = times[-1] - times[0]
            row.least_seconds = math.ceil(per_group / most) - 1.0
            row.ok = row.most_in_window <= most
        if row.handled != row.messages:
            row.ok = False
            self.note(f"accuracy {row.topology} {row.limit}: {row.handled}/{row.messages} ran")

    # -- overhead -------------------------------------------------------------------------

    def overhead(self) -> None:
        slow, fast = (2_000, 20_000) if self.args.tiny else (20_000, 200_000)
        rows = {(p, case): Overhead(p, case) for p in (1, 100) for case in OVERHEAD_LIMITS}
        for round_ in range(self.args.rounds):
            for prefetch in (1, 100):
                base = 0.0
                for case, line in OVERHEAD_LIMITS.items():  # interleaved, every round
                    # A rate limit takes one message per take at any prefetch: prefetch 1's
                    # pace, so prefetch 1's N keeps its run as short.
                    n = fast if prefetch == 100 and not line.startswith("rate") else slow
                    row = rows[(prefetch, case)]
                    row.n = n
                    rate, redis_us, worker_us = self.drain(prefetch, line, n)
                    row.rates.append(rate)
                    row.redis_us.append(redis_us)
                    row.worker_us.append(worker_us)
                    base = base or rate
                    row.ratios.append(rate / base)
                    self.log(
                        f"overhead round {round_ + 1}, prefetch {prefetch}, {case}: "
                        f"{rate:,.0f}/s ({rate / base:.2f}x), Redis {redis_us:.1f} µs/msg, "
                        f"worker {worker_us:.1f} µs/msg"
                    )
        self.out.overhead = list(rows.values())

    def drain(self, prefetch: int, limit_line: str, n: int) -> tuple[float, float, float]:
        """One start of the service, one batch of n drained: messages/s, and the CPU µs per
        message of Redis (INFO cpu) and of the rqworkers processes (manager, worker, keeper)."""
        run = ServiceRun(
            self, prefetch, 1, 0, work=f'handler = "bench.handlers:Noop"\n{limit_line}'
        )
        run.name = f"overhead-p{prefetch}-" + (limit_line.split()[0] if limit_line else "none")
        self.client.flushdb()
        fill(self.client, STAGING, n)
        with run.service() as manager:
            pids = [manager.pid, *(c.pid for c in psutil.Process(manager.pid).children())]
            before, ours = redis_cpu(self.client), sum(cpu_seconds(p) or 0.0 for p in pids)
            t0 = time.time()
            self.client.rename(STAGING, QUEUE)
            wait_for(run.drained, timeout=120 + n / 100, what="the queue to drain", interval=0.02)
            spent = redis_cpu(self.client) - before
            ours = sum(cpu_seconds(p) or 0.0 for p in pids) - ours
        stats = [self.client.hgetall(k) for k in self.client.keys("bench:stats:*")]
        handled = sum(int(st.get(b"0:count", 0)) for st in stats)
        if handled != n:
            raise RuntimeError(f"overhead: handled {handled} of {n}")
        last = max(float(st.get(b"0:last", 0)) for st in stats)
        return n / (last - t0), spent / n * 1e6, ours / n * 1e6

    # -- fairness -------------------------------------------------------------------------

    def fairness(self) -> None:
        """A flood of group A, then a few of group B: when B's start and finish.

        One node, `processes` 4 (prefetch 1): 4 workers. The flood is pushed first, then
        B's messages at once; times are from B's push. The fair share: round-robin between
        two groups gives B every other start, so its n messages start within about n / 2
        handler periods (a period: 4 workers' time per start, measured on A's starts before
        B arrived) and end one handler time later. FIFO (no `group_by`) is the yardstick: B
        waits for the whole flood.
        """
        flood, few = (1_000, 10) if self.args.tiny else (10_000, 10)
        sleep, workers = 0.005, 4
        url, queue, client = self.target("single")
        cases = [
            ("no group_by (FIFO)", ""),
            ('group_by = "group"', 'group_by = "group"'),
            ('group_by = "group", group_max_running = 2',
             'group_by = "group"\ngroup_max_running = 2'),
        ]  # fmt: skip
        for label, lines in cases:
            self.log(f"fairness: {label}: {flood} of A, then {few} of B, {workers} workers")
            self.clean(client)
            fleet = Fleet(self, url, queue, f"prefetch = 1\n{lines}", processes=workers)
            with fleet.running():
                push(client, queue, messages(flood, sleep, "A"))
                wait_for(lambda: self.book.llen(flowapp.STARTS) >= 4 * workers, timeout=30,
                         what="the flood to start")  # fmt: skip
                time.sleep(1.0)  # A runs alone a while: its pace is the yardstick
                pushed = time.time()
                push(client, queue, messages(few, sleep, "B", first=flood))
                wait_for(lambda: self.b_ended(flood) >= few, timeout=120 + flood * sleep,
                         what="B's messages to end", interval=0.01)  # fmt: skip
            self.out.fairness.append(self.judge_fairness(label, flood, few, pushed, workers))
            f = self.out.fairness[-1]
            self.log(
                f"  B: first start {f['b_first_start_s']:.3f} s, last start "
                f"{f['b_last_start_s']:.3f} s, last end {f['b_last_end_s']:.3f} s after its "
                f"push (fair share {f['fair_s']:.3f} s, FIFO {f['fifo_s']:.1f} s); A started "
                f"meanwhile {f['a_before_b']}"
            )

    def b_ended(self, first_b: int) -> int:
        return sum(1 for i, _ in read_ends(self.book) if i >= first_b)

    def judge_fairness(
        self, label: str, flood: int, few: int, pushed: float, workers: int
    ) -> dict[str, Any]:
        """B's times from its push, in seconds and in handler periods: a worker's time per
        message (handler, bookkeeping, take and ack), the median gap between one worker's
        successive starts of A in the second before B's push. The fair share: B's `few`
        on half the workers, `few / (workers / 2)` periods; FIFO: the rest of the flood
        first, at A's start rate, then one period."""
        starts, ends = read_starts(self.book), read_ends(self.book)
        a = [s for s in starts if s.group == "A"]
        b = sorted(s.at for s in starts if s.group == "B")
        b_ends = sorted(at for (i, _), at in ends.items() if i >= flood)
        recent = [s for s in a if pushed - 1.0 <= s.at < pushed]
        gaps = []
        for pid in {s.pid for s in recent}:
            times = [s.at for s in recent if s.pid == pid]
            gaps += [later - earlier for earlier, later in itertools.pairwise(times)]
        period = statistics.median(gaps)
        waiting = flood - sum(1 for s in a if s.at < pushed)
        fair = few / (workers / 2) * period
        fifo = waiting / max(1, len(recent)) + period
        return {
            "case": label,
            "flood": flood,
            "few": few,
            "workers": workers,
            "period_ms": period * 1000,
            "a_per_s_before": len(recent),
            "a_waiting_at_push": waiting,
            "b_first_start_s": b[0] - pushed,
            "b_last_start_s": b[-1] - pushed,
            "b_last_end_s": b_ends[-1] - pushed,
            "fair_s": fair,
            "fifo_s": fifo,
            "a_before_b": sum(1 for s in a if pushed <= s.at < b[0]),
        }

    # -- recovery -------------------------------------------------------------------------

    def recovery(self) -> None:
        repeats = 1 if self.args.tiny else self.args.rounds
        url, queue, client = self.target("single")
        pair = "max_running = 1\nprefetch = 1"
        holder = Recovery("SIGKILL of the permit holder (2 processes, one node)")
        for _ in range(repeats):
            fleet = Fleet(self, url, queue, pair, managers=1, processes=2)
            killed, nxt, ready = self.kill_holder(fleet, client, whole_node=False)
            holder.seconds.append(nxt - killed)
            holder.replacement.append(ready - killed)
            self.log(f"recovery, holder killed: next start after {nxt - killed:.3f} s")
        self.out.recovery.append(holder)
        lease = f"lease_ttl = {LEASE_TTL}\nreclaim_interval = {RECLAIM_INTERVAL}"
        node = Recovery(f"the holder's whole node SIGKILLed ({lease.replace(chr(10), ', ')})")
        node.note = (
            f"expected within lease_ttl + reclaim_interval = {LEASE_TTL + RECLAIM_INTERVAL:g} s"
        )
        for _ in range(repeats):
            fleet = Fleet(self, url, queue, pair, managers=2, processes=1, manager_lines=lease)
            killed, nxt, _ = self.kill_holder(fleet, client, whole_node=True)
            node.seconds.append(nxt - killed)
            self.log(f"recovery, node lost: next start after {nxt - killed:.3f} s")
        self.out.recovery.append(node)
        cases = [  # label, managers, limit and concurrency, the long message's seconds, restart
            ("the manager alone SIGKILLed and started again at once on the same node "
             "(`max_running = 2`, `concurrency` 2, 4 s handlers)", 1, 2, 4.0, True),
            ("the manager alone SIGKILLed, not started again; another node (both with "
             f"{lease.replace(chr(10), ', ')}) reclaims; 8 s handler, `max_running = 1`",
             2, 1, 8.0, False),
        ]  # fmt: skip
        for label, managers, limit, seconds, restart in cases:
            orphans = Recovery(label, limit=limit, note=ORPHANS_NOTE)
            pair = f"max_running = {limit}\nconcurrency = {limit}\nprefetch = 1"
            lines = "" if restart else lease
            for _ in range(repeats):
                fleet = Fleet(self, url, queue, pair, managers, 1, manager_lines=lines)
                killed, nxt, peak, over = self.orphan_manager(
                    fleet, client, limit, seconds, restart
                )
                orphans.seconds.append(nxt - killed)
                orphans.peaks.append(peak)
                orphans.over.append(over)
                self.log(f"recovery, manager killed ({'restarted' if restart else 'not restarted'})"
                         f": next start after {nxt - killed:.3f} s, most running at once {peak} "
                         f"(max_running {limit}) for {over:.3f} s")  # fmt: skip
            self.out.recovery.append(orphans)
            if any(peak > limit for peak in orphans.peaks):
                self.note(
                    f"FINDING: {label}: up to {max(orphans.peaks)} handlers ran at once under "
                    f"max_running {limit}: the orphaned workers run on while their permits "
                    "are given back (by the new workers' replay, or by the other node's "
                    "reclaim once the lease lapses) and their messages run again"
                )

    def orphan_manager(
        self, fleet: Fleet, client: Any, limit: int, seconds: float, restart: bool
    ) -> tuple[float, float, int, float]:
        """`limit` long messages hold every permit; SIGKILL the holders' manager alone, and
        start it again at once (as systemd's Restart=always would) or not. Returns the kill's
        time, the next start's, the most handlers running at once and for how many seconds
        more than `limit` ran, orphans included. From the handlers' own start and end times:
        an orphan that ends itself mid-message records no end, so its exit, watched here every
        few ms, ends its run (the counter would count it running for ever)."""
        self.clean(client)
        with fleet.running():
            push(client, fleet.queue, messages(limit, seconds))
            wait_for(lambda: len(read_starts(self.book)) >= limit, timeout=30,
                     what="the long messages to start")  # fmt: skip
            first = read_starts(self.book)
            push(client, fleet.queue, messages(4, 0.5, first=limit))
            time.sleep(0.3)
            index = fleet.node_of(first[0].pid)
            old = fleet.leaders[index]
            orphans = {s.pid for s in first if fleet.node_of(s.pid) == index}
            killed = time.time()
            os.kill(old.pid, signal.SIGKILL)
            old.wait()
            if restart:
                fleet.leaders[index] = fleet.start_manager(index)
            exits: dict[int, float] = {}
            try:
                deadline = time.monotonic() + seconds + 30
                while len(exits) < len(orphans) or len(read_starts(self.book)) <= limit:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the orphans did not end, or nothing started")
                    for pid in orphans - exits.keys():
                        if not _alive(pid):
                            exits[pid] = time.time()
                    time.sleep(0.005)
            finally:
                for pid in _session(old.pid):  # orphans left, if any
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            starts, ends, now = read_starts(self.book), read_ends(self.book), time.time()
        spans = [(s.at, ends.get((s.id, s.pid)) or exits.get(s.pid, now)) for s in starts]
        return killed, starts[limit].at, peak_overlap(spans), time_over(spans, limit)

    def kill_holder(
        self, fleet: Fleet, client: Any, whole_node: bool
    ) -> tuple[float, float, float]:
        """Start `fleet`, let one message hold the only permit, push a second, SIGKILL the
        holder (or its node). Returns the kill's time, the next start's, and when the
        holder's replacement ran setup() (0 for a whole node)."""
        self.clean(client)
        with fleet.running():
            push(client, fleet.queue, messages(1, 60.0))
            first = wait_for(lambda: read_starts(self.book), timeout=30, what="the first start")
            victim = first[0].pid
            push(client, fleet.queue, messages(1, 0.0, first=1))
            time.sleep(0.5)  # the other workers settle into their wait for a permit
            if len(read_starts(self.book)) != 1:
                raise RuntimeError("a second message started while the only permit was held")
            ready_before = int(self.book.llen(flowapp.READY))
            killed = time.time()
            if whole_node:
                fleet.kill_node(fleet.node_of(victim))
            else:
                os.kill(victim, signal.SIGKILL)
            second = wait_for(lambda: read_starts(self.book)[1:], timeout=30,
                              what="the next start", interval=0.002)  # fmt: skip
            ready = killed
            if not whole_node:
                wait_for(lambda: self.book.llen(flowapp.READY) > ready_before, timeout=30,
                         what="the replacement's setup")  # fmt: skip
                ready = float((self.book.lindex(flowapp.READY, -1) or b"0 0").split()[1])
        return killed, second[0].at, ready


def redis_cpu(client: redis.Redis) -> float:
    """Seconds of CPU redis-server has spent, user + system (INFO cpu)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# -- printing -------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(report: Report) -> str:
    lines = ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    shown = "; ".join(f"{name} {values[0]:.2f}" for name, values in report.load.items())
    lines += [f"- 1-minute load average when each section started: {shown}", ""]
    lines += [f"Command: `{report.command}`", ""]
    if report.accuracy:
        lines += ["### Accuracy", ""]
        lines += ["| Redis | limit | fleet | N | handler | peak running (counter / times; "
                  "with groups, the queue's / the busiest group's) "
                  "| most starts in any 1 s (of a group) | took / least possible "
                  "| starts per process (nodes) | held |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for a in report.accuracy:
            lines.append(
                f"| {a.topology} | `{a.limit}` | {a.fleet} | {a.messages} | {a.handler_ms:g} ms "
                f"| {a.peak_counted} / {a.peak_overlap} | {a.most_in_window} "
                f"| {a.seconds:.2f} / {a.least_seconds:.2f} s "
                f"| {'+'.join(map(str, a.per_process))} ({a.nodes}) "
                f"| {'yes' if a.ok else '**NO**'} |"
            )
        lines.append("")
    if report.overhead:
        lines += ["### Overhead (limits that never bind)", ""]
        lines += ["ratio: msgs/s against no limit at the same prefetch in the same round; "
                  "the median of the rounds, then each round's. CPU: µs per message, "
                  "median of the rounds.", ""]  # fmt: skip
        lines += ["| prefetch | limit | N | msgs/s | ratio (each round) | Redis CPU "
                  "| rqworkers CPU |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for o in report.overhead:
            each = ", ".join(f"{r:.2f}" for r in o.ratios)
            lines.append(
                f"| {o.prefetch} | `{o.case}` | {o.n:,} | {_median(o.rates):,.0f} "
                f"| {_median(o.ratios):.2f}x ({each}) | {_median(o.redis_us):.1f} "
                f"| {_median(o.worker_us):.1f} |"
            )
        lines.append("")
    if report.fairness:
        lines += ["### Fairness", "", "Seconds from B's push. period: a worker's time per "
                  "message (median gap between one worker's starts of A just before). Fair "
                  "share: B's messages on half the workers, few / (workers / 2) periods. "
                  "FIFO: the waiting flood at A's start rate, then a period.", ""]  # fmt: skip
        lines += ["| case | A waiting at B's push, then B | workers | period | B first start "
                  "| B last start | B last end | fair share | FIFO "
                  "| A started between B's push and B's first start |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for f in report.fairness:
            lines.append(
                f"| {f['case']} | {f['a_waiting_at_push']:,}, then {f['few']} | {f['workers']} "
                f"| {f['period_ms']:.1f} ms | {f['b_first_start_s']:.3f} "
                f"| {f['b_last_start_s']:.3f} | {f['b_last_end_s']:.3f} | {f['fair_s']:.3f} "
                f"| {f['fifo_s']:.1f} | {f['a_before_b']:,} |"
            )
        lines.append("")
    if report.recovery:
        lines += ["### Recovery", "", "| case | kill -> next start (s) | kill -> replacement's "
                  "setup (s) | most running at once / max_running | note |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in report.recovery:
            each = ", ".join(f"{s:.3f}" for s in r.seconds)
            setup = ", ".join(f"{s:.3f}" for s in r.replacement) or "-"
            peaks = ", ".join(map(str, r.peaks)) + f" / {r.limit}" if r.peaks else "-"
            if r.over:
                peaks += " (over it for " + ", ".join(f"{t:.3f}" for t in r.over) + " s)"
            if any(p > r.limit for p in r.peaks):
                peaks += " **EXCEEDED**"
            lines.append(f"| {r.case} | {each} | {setup} | {peaks} | {r.note} |")
        lines.append("")
    if report.notes:
        lines += ["Notes:", "", *(f"- {n}" for n in report.notes), ""]
    return "\n".join(lines)


def load_report(path: Path) -> Report:
    data = json.loads(path.read_text())
    data["accuracy"] = [Accuracy(**a) for a in data["accuracy"]]
    data["overhead"] = [Overhead(**o) for o in data["overhead"]]
    data["recovery"] = [Recovery(**r) for r in data["recovery"]]
    return Report(**data)


def main() -> int:
    parser = argparse.ArgumentParser(description="rqworkers flow-control bench (see module doc)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--topology", nargs="+", choices=TOPOLOGIES, default=list(TOPOLOGIES),
                        help="where the accuracy cases run (default: both)")  # fmt: skip
    parser.add_argument("--rounds", type=int, choices=range(1, 10), default=3, metavar="R",
                        help="overhead rounds and recovery repeats (default 3)")  # fmt: skip
    parser.add_argument(
        "--tiny", action="store_true", help="few messages, small fleets: a smoke run"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    parser.add_argument("--render", metavar="JSON", help="print the tables of a saved --json run")
    args = parser.parse_args()
    if args.render:
        print(render(load_report(Path(args.render))), end="")
        return 0
    args.messages, args.quick, args.repeat, args.peers_python = None, False, 1, sys.executable
    signal.signal(signal.SIGTERM, _terminate)
    procs = Processes()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="rqworkers-flow-") as tmp:
            (Path(tmp) / "book").mkdir()
            report = FlowBench(args, Path(tmp), procs).run_all()
    finally:
        procs.kill_all()
    print(f"bench took {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(json.dumps(asdict(report)) if args.json else render(report), end="\n")
    held = all(a.ok for a in report.accuracy) and not any(
        p > r.limit for r in report.recovery for p in r.peaks
    )
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
