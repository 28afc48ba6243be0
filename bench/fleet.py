"""A measured fleet: what coordination costs Redis per node as the fleet grows (issue 21).

    nice -n 10 python -m bench.fleet [--nodes 1 10 50 200] [--redis single cluster] [--json]

Each node is a real `python -m rqworkers run` with a node name of its own and one pair of
`processes = 1` (a manager, its keeper, one worker), all on this machine, against a fresh
redis-server (`single`) or a fresh 3-master Redis Cluster (`cluster`) per fleet size. On
a cluster, each node serves one of three queues whose hash tags land on the three masters.
For each fleet size, in this order:

- idle: once every worker blocks in BLMOVE and `--settle` seconds have passed, a window
  of `--window` seconds reads Redis commands/s (delta of `total_commands_processed`, the
  commands Lua scripts run included, summed over masters, less the bench's own INFO
  calls) and Redis CPU (`used_cpu_user` + `used_cpu_sys` of INFO cpu), and the keepers'
  CPU (the kernel's per-thread schedstat of every keeper process);
- the keepers' commands: a MONITOR sample of `--monitor` seconds on every master, each
  command's client port mapped to its process (psutil), so that what the keepers send is
  counted apart from what the workers send (a script call is one command sent);
- loaded: the same window while a producer pushes `--rate` messages a second per node,
  the producer's own LPUSHes taken out; then the queue drains;
- reclaim: 20% of the nodes (at least one, none for a fleet of 1) are made to hold
  messages (the handler sleeps on `hold:` messages on those nodes only, and the worker
  has prefetched up to `--prefetch`), then every process of those nodes is SIGKILLed at
  once. The time is measured from the kill to every message their private and landing
  lists held having been handled by another node;
- the count: every message carries a unique id (its payload), the handler counts each
  handling in a separate bookkeeping redis-server (HINCRBY), so after the survivors stop,
  a message handled twice is a duplicate and one never handled (nor dead-lettered) is
  lost. Both must be 0.

`--reclaim-under idle` kills with no producer running (every survivor idle in its blocking
fetch: the worst case for the pickup); `--metrics` gives every node `/metrics` and the
status page, as deploy/kubernetes runs every pod. bench/RESULTS.md has the figures.

Leases are short (`--lease-ttl`, default 6 s) so that a reclaim is measured in seconds.
Run it under `nice -n 10` on a shared machine; 200 nodes are about 600 Python processes
(forked, so they share most pages): the bench refuses a size the free memory cannot hold.
Everything it starts runs in its own session and is killed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil
import redis
from redis.crc import key_slot

from bench.chaos import kill_groups
from bench.redisproc import free_port, wait_for
from bench.throughput import (
    Processes,
    RedisServer,
    _terminate,
    bench_env,
    cpu_seconds,
    machine_info,
    start_redis,
)
from rqworkers.store.keys import Keys
from rqworkers.store.queue import read_private_list

# -- the handler the nodes run ---------------------------------------------------------------

BOOK_ENV = "FLEET_BOOK_URL"  # the bookkeeping redis-server, never the one measured
NODE_ENV = "FLEET_NODE"
HANDLED_KEY = "fleet:handled"  # hash: payload -> times handled
VICTIMS_KEY = "fleet:victims"  # set: nodes whose worker holds `hold:` messages
HOLDING_KEY = "fleet:holding"  # hash: node -> the payload its handler holds
HOLD = b"hold:"
HOLD_SECONDS = 300.0  # far past any run: a holding worker is SIGKILLed long before

_book: redis.Redis | None = None


def record(message: bytes) -> None:
    """Count one handling of `message` in the bookkeeping Redis; on a victim node, a `hold:`
    message is held (the handler sleeps) until the node is killed."""
    global _book
    if _book is None:
        _book = redis.Redis.from_url(os.environ[BOOK_ENV], socket_timeout=30)
    node = os.environ.get(NODE_ENV, "")
    if message.startswith(HOLD) and _book.sismember(VICTIMS_KEY, node):
        _book.hset(HOLDING_KEY, node, message)
        time.sleep(HOLD_SECONDS)
    _book.hincrby(HANDLED_KEY, message, 1)


# -- settings --------------------------------------------------------------------------------

MIB = 2**20
MEMORY_PER_NODE = 120 * MIB  # a pessimistic guess until a run has measured it
CLUSTER_MASTERS = 3


@dataclass(frozen=True)
class Settings:
    nodes: tuple[int, ...]
    topologies: tuple[str, ...]
    lease_ttl: float
    reclaim_interval: float
    window: float
    settle: float
    monitor: float
    rate: float  # messages per second per node while loaded
    prefetch: int
    victims: float  # share of the nodes that vanish
    reclaim_under: str  # "load": the producer runs meanwhile; "idle": survivors block
    metrics: bool  # every node serves /metrics
    json: bool
    keep: bool


def config_text(node: str, url: str, queue: str, s: Settings) -> str:
    """One node: one pair, one process, short leases, logs at WARNING (reclaims show), and
    `/metrics` on a port of its own with `--metrics`, as deploy/kubernetes runs every pod."""
    metrics = f'metrics_address = "127.0.0.1:{free_port()}"\n' if s.metrics else ""
    return f"""\
[manager]
node = "{node}"
{metrics}check_interval = 1.0
shutdown_timeout = 5.0
lease_ttl = {s.lease_ttl}
reclaim_interval = {s.reclaim_interval}

[logging]
level = "WARNING"

[hosts]
main = "{url}"

[[workers]]
host = "main"
queue = "{queue}"
handler = "bench.fleet:record"
processes = 1
prefetch = {s.prefetch}
timeout = {HOLD_SECONDS * 2}
max_attempts = 1000
"""


def queue_names(masters: int) -> list[str]:
    """One queue per master: hash tags whose slots fall in the ranges `redis-cli --cluster
    create` gives each master (16384 slots split evenly, in order)."""
    if masters == 1:
        return ["{fleet}"]
    share = 16384 // masters
    names: dict[int, str] = {}
    n = 0
    while len(names) < masters:
        name = f"{{fleet{n}}}"
        names.setdefault(min(key_slot(name.encode()) // share, masters - 1), name)
        n += 1
    return [names[i] for i in range(masters)]


# -- Redis: one server or a cluster ----------------------------------------------------------


@dataclass
class Data:
    """The Redis being measured: one server, or the masters of a cluster."""

    servers: list[RedisServer]
    url: str

    def clients(self) -> list[redis.Redis]:
        return [s.client() for s in self.servers]

    def info(self) -> tuple[int, float]:
        """Commands processed and Redis CPU seconds so far, summed over the servers: two
        INFO calls on each (`OWN_COMMANDS`)."""
        commands, cpu = 0, 0.0
        for client in self.clients():
            with contextlib.closing(client):
                commands += int(client.info("stats")["total_commands_processed"])
                usage = client.info("cpu")
                cpu += float(usage["used_cpu_user"]) + float(usage["used_cpu_sys"])
        return commands, cpu

    def blocked(self) -> int:
        """Clients blocked in BLMOVE right now, on every server."""
        total = 0
        for client in self.clients():
            with contextlib.closing(client):
                total += sum(1 for c in client.client_list() if c.get("cmd") == "blmove")
        return total

    def client_for(self, key: str) -> redis.Redis:
        """The server holding `key` (a cluster's master for its slot)."""
        if len(self.servers) == 1:
            return self.servers[0].client()
        share = 16384 // len(self.servers)
        index = min(key_slot(key.encode()) // share, len(self.servers) - 1)
        return self.servers[index].client()


_MONITOR_LINE = re.compile(rb'^\+[\d.]+ \[\d+ [\d.]+:(\d+)\] "([^"]+)"')
OWN_COMMANDS = 2  # per server per reading: INFO stats, INFO cpu


def start_data(procs: Processes, workdir: Path, topology: str) -> Data:
    if topology == "single":
        server = start_redis(procs, workdir)
        return Data([server], server.url)
    servers = []
    for i in range(CLUSTER_MASTERS):
        extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                 "--cluster-config-file", f"nodes-{os.getpid()}-{time.monotonic_ns()}-{i}.conf",
                 "--cluster-port", str(free_port())]  # fmt: skip
        servers.append(start_redis(procs, workdir, extra))
    addresses = [f"127.0.0.1:{s.port}" for s in servers]
    subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *addresses,
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )

    def ready() -> bool:
        return all(s.client().cluster("INFO").get("cluster_state") == "ok" for s in servers)

    wait_for(ready, timeout=30, interval=0.1, what="cluster_state:ok on every master")
    return Data(servers, "redis+cluster://" + ",".join(addresses))


# -- nodes -----------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    queue: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def worker_id(self) -> str:
        return f"{self.name}:1"  # `rqworkers.manager.supervisor.build_slots`, one pair

    def pids(self) -> dict[int, str]:
        """Every live process of the node: pid -> its title (manager, keeper, worker)."""
        found: dict[int, str] = {}
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(self.process.pid)
            for proc in [leader, *leader.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    found[proc.pid] = " ".join(proc.cmdline())
        return found

    def keeper_pids(self) -> list[int]:
        return [pid for pid, title in self.pids().items() if "rqworkers: keeper" in title]


# -- one fleet -------------------------------------------------------------------------------


@dataclass
class Row:
    topology: str
    nodes: int
    start_seconds: float = 0.0  # from the first start to every worker blocking
    memory_per_node_mib: float = 0.0  # system memory used, per node
    idle_commands_per_s: float = 0.0
    idle_redis_cpu: float = 0.0  # share of one core
    idle_keeper_cpu: float = 0.0  # all keepers, share of one core
    keeper_commands_per_s: float = 0.0  # all keepers (MONITOR sample)
    worker_commands_per_s: float = 0.0  # all workers, idle (MONITOR sample)
    keeper_commands: dict[str, float] = field(default_factory=dict)  # command -> /s
    # Commands of connections gone by the time they were mapped to processes: short-lived
    # ones, such as the status page sampler's in a keeper with `--metrics` (command -> /s).
    other_commands: dict[str, float] = field(default_factory=dict)
    loaded_rate: float = 0.0  # messages/s pushed
    loaded_commands_per_s: float = 0.0  # producer's own taken out
    loaded_redis_cpu: float = 0.0
    loaded_keeper_cpu: float = 0.0
    victims: int = 0
    reclaimed_messages: int = 0
    reclaim_seconds: float | None = None
    produced: int = 0
    handled: int = 0
    duplicates: int = 0
    lost: int = 0
    load: float = 0.0  # 1-minute load average at the start
    notes: list[str] = field(default_factory=list)

    def per_node(self, value: float) -> float:
        return value / self.nodes


class Fleet:
    """One fleet size on one topology: start, measure, kill some, count, stop."""

    def __init__(self, s: Settings, topology: str, n: int, workdir: Path, book: RedisServer):
        self.s = s
        self.n = n
        self.workdir = workdir
        self.book = book.client()
        self.book_url = book.url
        self.procs = Processes()
        self.row = Row(topology, n, load=os.getloadavg()[0])
        self.topology = topology
        self.nodes: list[Node] = []
        self.started_at = time.time()
        self.produced: list[bytes] = []
        self.data: Data | None = None

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.topology} {self.n}: {text}", file=sys.stderr)

    def run(self) -> Row:
        self.book.flushall()
        self.data = start_data(self.procs, self.workdir, self.topology)
        self.start_nodes()
        self.idle()
        self.monitor()
        self.loaded()
        self.reclaim()
        self.stop_and_count()
        return self.row

    def cleanup(self) -> None:
        kill_groups([node.process.pid for node in self.nodes], self.started_at)
        self.procs.kill_all()

    # -- phases --

    def start_nodes(self) -> None:
        assert self.data is not None
        # On a cluster, one queue per master, but two nodes at least on each: a queue whose
        # only node is lost has nobody left to reclaim and handle its messages.
        queues = queue_names(len(self.data.servers))[: max(1, self.n // 2)]
        env = bench_env(self.data.url)
        env[BOOK_ENV] = self.book_url
        env.pop("RQWORKERS_CONFIG", None)
        available = psutil.virtual_memory().available
        t0 = time.monotonic()
        for i in range(self.n):
            name = f"fleet-{i:03d}"
            queue = queues[i % len(queues)]
            path = self.workdir / f"{name}.toml"
            path.write_text(config_text(name, self.data.url, queue, self.s))
            log = self.workdir / f"{name}.log"
            args = [sys.executable, "-m", "rqworkers", "run", "--config", str(path)]
            process = self.procs.start(args, env={**env, NODE_ENV: name}, log=log)
            self.nodes.append(Node(name, queue, process, log))
            if i % 10 == 9:  # a pause now and then: 2 cores, and the started must keep leases
                time.sleep(0.5)

        def up() -> bool:
            for node in self.nodes:
                if node.process.poll() is not None:
                    tail = node.log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"{node.name} exited: {' | '.join(tail)}")
            assert self.data is not None
            return self.data.blocked() >= self.n

        wait_for(up, timeout=60 + 3 * self.n, interval=0.5, what=f"{self.n} workers in BLMOVE")
        self.row.start_seconds = round(time.monotonic() - t0, 1)
        used = available - psutil.virtual_memory().available
        self.row.memory_per_node_mib = round(max(0, used) / self.n / MIB, 1)
        self.say(f"up in {self.row.start_seconds} s, {self.row.memory_per_node_mib} MiB/node")
        time.sleep(self.s.settle)  # start-up traffic passes: nothing to wait on but the clock

    def keeper_pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.keeper_pids()]

    def window(self, keepers: list[int]) -> tuple[float, float, float, float]:
        """(commands/s, Redis CPU, keepers' CPU, seconds) over one window of `--window` s."""
        assert self.data is not None
        before_cpu = {pid: cpu_seconds(pid) or 0.0 for pid in keepers}
        commands0, cpu0 = self.data.info()
        t0 = time.monotonic()
        time.sleep(self.s.window)
        commands1, cpu1 = self.data.info()
        wall = time.monotonic() - t0
        keeper_cpu = sum((cpu_seconds(pid) or 0.0) - was for pid, was in before_cpu.items())
        commands = commands1 - commands0 - OWN_COMMANDS * len(self.data.servers)
        return commands / wall, (cpu1 - cpu0) / wall, keeper_cpu / wall, wall

    def idle(self) -> None:
        commands, cpu, keepers, _ = self.window(self.keeper_pids())
        self.row.idle_commands_per_s = round(commands, 2)
        self.row.idle_redis_cpu = round(cpu, 4)
        self.row.idle_keeper_cpu = round(keepers, 4)
        self.say(f"idle: {commands:.1f} commands/s, Redis CPU {cpu:.1%}, keepers {keepers:.1%}")

    def monitor(self) -> None:
        """Count the commands each kind of process sends, from a MONITOR sample."""
        assert self.data is not None
        ports: list[Counter[tuple[int, str]]] = []
        threads = [
            threading.Thread(target=lambda s=server: ports.append(self._monitor_one(s)))
            for server in self.data.servers
        ]
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - t0
        owner = self._port_owners()
        keeper: Counter[str] = Counter()
        other: Counter[str] = Counter()
        worker = 0
        for counts in ports:
            for (port, command), n in counts.items():
                kind = owner.get(port, "")
                if kind == "keeper":
                    keeper[command] += n
                elif kind == "worker":
                    worker += n
                else:  # a connection closed since (the status page's sampler opens its own)
                    other[command] += n
        self.row.keeper_commands_per_s = round(sum(keeper.values()) / wall, 2)
        self.row.worker_commands_per_s = round(worker / wall, 2)
        self.row.keeper_commands = {k: round(v / wall, 2) for k, v in keeper.most_common()}
        self.row.other_commands = {k: round(v / wall, 2) for k, v in other.most_common()}
        self.say(f"keepers send {self.row.keeper_commands_per_s}/s: {self.row.keeper_commands}")

    def _monitor_one(self, server: RedisServer) -> Counter[tuple[int, str]]:
        """(client port, command) -> calls, from MONITOR on one server for `--monitor` s. A
        raw socket: redis-py drops a connection whose read timed out."""
        counts: Counter[tuple[int, str]] = Counter()
        deadline = time.monotonic() + self.s.monitor
        buffer = b""
        with socket.create_connection(("127.0.0.1", server.port), timeout=0.2) as sock:
            sock.sendall(b"MONITOR\r\n")
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                *lines, buffer = (buffer + chunk).split(b"\r\n")
                for line in lines:
                    # +<time> [<db> <address>:<port>] "<COMMAND>" ...; scripts' own: [0 lua]
                    found = _MONITOR_LINE.match(line)
                    if found:
                        counts[(int(found[1]), found[2].decode().lower())] += 1
        return counts

    def _port_owners(self) -> dict[int, str]:
        """Local port of every TCP connection of our nodes -> 'keeper', 'worker', 'manager'."""
        owners: dict[int, str] = {}
        for node in self.nodes:
            for pid, title in node.pids().items():
                kind = (
                    "keeper" if "keeper" in title else "worker" if "worker" in title else "manager"
                )
                with contextlib.suppress(psutil.Error):
                    for conn in psutil.Process(pid).net_connections("tcp"):
                        if conn.laddr:
                            owners[conn.laddr.port] = kind
        return owners

    def loaded(self) -> None:
        """A window while a producer pushes `--rate` messages/s per node, then the drain."""
        keepers = self.keeper_pids()
        with Producer(self, "m:") as producer:
            time.sleep(1.0)  # the workers are busy before the window opens
            pushed_before = producer.pushes
            commands, cpu, keeper_cpu, wall = self.window(keepers)
            own = producer.pushes - pushed_before
        self.row.loaded_rate = producer.rate
        self.row.loaded_commands_per_s = round(commands - own / wall, 2)
        self.row.loaded_redis_cpu = round(cpu, 4)
        self.row.loaded_keeper_cpu = round(keeper_cpu, 4)
        self.say(f"loaded at {producer.rate:g}/s: {commands:.1f} commands/s, Redis CPU {cpu:.1%}")
        self.wait_handled(set(self.produced), 60 + len(self.produced) / 50, "the drain")

    def wait_handled(self, payloads: set[bytes], timeout: float, what: str) -> float:
        """Wait until every one of `payloads` has been handled; the time it took."""
        t0 = time.monotonic()
        wanted = sorted(payloads)

        def done() -> bool:
            if not wanted:
                return True
            counts = cast(list[bytes | None], self.book.hmget(HANDLED_KEY, wanted))
            return all(counts)

        wait_for(done, timeout=timeout, interval=0.05, what=what)
        return time.monotonic() - t0

    def reclaim(self) -> None:
        """Make 20% of the nodes hold messages, SIGKILL all their processes at once, and time
        how long until every message they held is handled elsewhere."""
        assert self.data is not None
        if self.n < 2:
            self.row.notes.append("reclaim: needs 2 nodes or more")
            return
        count = max(1, round(self.s.victims * self.n))
        step = self.n / count
        victims = [self.nodes[int(i * step)] for i in range(count)]
        self.book.sadd(VICTIMS_KEY, *[v.name for v in victims])
        queues = sorted({node.queue for node in self.nodes})
        number = 0

        def holding() -> bool:
            nonlocal number
            if int(self.book.hlen(HOLDING_KEY)) >= count:
                return True
            # More `hold:` messages whenever the queues ran dry: every victim must get some
            # (the survivors handle theirs at once).
            assert self.data is not None
            if any(self.data.client_for(q).llen(q) for q in queues):
                return False
            batch = [f"hold:{number + k:07d}".encode() for k in range(self.s.prefetch * self.n)]
            number += len(batch)
            for i, q in enumerate(queues):
                self.data.client_for(q).lpush(q, *batch[i :: len(queues)])
            self.produced += batch
            return False

        wait_for(holding, timeout=60 + self.n, interval=0.5, what="every victim to hold")
        # The rest of the pushed `hold:` messages go to the survivors first.
        self.wait_handled(
            {p for p in self.produced if p.startswith(HOLD)} - self.in_flight(victims, queues),
            60 + self.n,
            "the survivors to handle theirs",
        )
        load = self.s.reclaim_under == "load"
        with Producer(self, "r:") if load else contextlib.nullcontext():
            time.sleep(1.0 if load else 0.0)  # the survivors are busy before the kill
            self.kill_and_wait(victims, queues)
        self.nodes = [n for n in self.nodes if n not in victims]
        self.say(f"reclaimed and handled in {self.row.reclaim_seconds} s")

    def kill_and_wait(self, victims: list[Node], queues: Sequence[str]) -> None:
        """SIGKILL every process of `victims` at once; wait for what they held to be handled."""
        count = len(victims)
        held = self.in_flight(victims, queues)
        pids = [pid for v in victims for pid in v.pids()]
        t0 = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for v in victims:
            v.process.wait()
        self.say(f"killed {count} nodes ({len(pids)} processes) holding {len(held)} messages")
        limit = 10 * self.s.lease_ttl + 60
        try:
            self.wait_handled(held, limit, f"the {len(held)} messages of the lost nodes")
            self.row.reclaim_seconds = round(time.monotonic() - t0, 2)
        except TimeoutError as exc:
            self.row.notes.append(str(exc))
        self.row.victims = count
        self.row.reclaimed_messages = len(held)

    def in_flight(self, nodes: Iterable[Node], queues: Sequence[str]) -> set[bytes]:
        """Payloads in the private and landing lists of `nodes`."""
        assert self.data is not None
        found: set[bytes] = set()
        for node in nodes:
            client = self.data.client_for(node.queue)
            keys = Keys(node.queue, node.worker_id)
            private = cast(list[bytes], client.lrange(keys.processing, 0, -1))
            found.update(d.payload for d in read_private_list(private))
            found.update(cast(list[bytes], client.lrange(keys.landing, 0, -1)))
        return found

    def stop_and_count(self) -> None:
        assert self.data is not None
        try:
            self.wait_handled(set(self.produced), 60 + self.n, "everything to be handled")
        except TimeoutError as exc:
            self.row.notes.append(str(exc))  # counted as lost below
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(max(0.1, deadline - time.monotonic()))
        handled = {
            k: int(v) for k, v in cast(dict[bytes, bytes], self.book.hgetall(HANDLED_KEY)).items()
        }
        dead = 0
        for q in sorted({node.queue for node in self.nodes}):
            dead += int(self.data.client_for(q).llen(f"{q}:dead"))
        produced = set(self.produced)
        self.row.produced = len(produced)
        self.row.handled = sum(1 for p in produced if handled.get(p))
        self.row.lost = len(produced) - self.row.handled - dead
        self.row.duplicates = sum(n - 1 for p, n in handled.items() if p in produced and n > 1)
        extra = len(handled.keys() - produced)
        if dead:
            self.row.notes.append(f"{dead} dead-lettered")
        if extra:
            self.row.notes.append(f"{extra} handled but never produced")
        self.say(f"produced {len(produced)}, lost {self.row.lost}, dup {self.row.duplicates}")


class Producer:
    """Pushes `--rate` messages a second per node of `fleet`, round robin over its queues,
    in a thread, while the `with` block runs. Its LPUSHes are counted (`pushes`)."""

    def __init__(self, fleet: Fleet, prefix: str) -> None:
        assert fleet.data is not None
        self.fleet = fleet
        self.prefix = prefix
        self.queues = sorted({node.queue for node in fleet.nodes})
        self.clients = {q: fleet.data.client_for(q) for q in self.queues}
        self.rate = fleet.s.rate * fleet.n
        self.pushes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.produce)

    def __enter__(self) -> Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def produce(self) -> None:
        t0 = time.monotonic()
        sent = 0
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            batch = [f"{self.prefix}{n:09d}".encode() for n in range(sent, due)]
            for i, q in enumerate(self.queues):
                part = batch[i :: len(self.queues)]
                if part:
                    self.clients[q].lpush(q, *part)
                    self.pushes += 1
            self.fleet.produced += batch
            sent = due
            self.stop.wait(0.05)


# -- the report ------------------------------------------------------------------------------


@dataclass
class Report:
    command: str = ""
    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.lost == 0 and r.duplicates == 0 for r in self.rows)


def _pct(share: float) -> str:
    return f"{share:.2%}"


def render(report: Report) -> str:
    lines = [f"Command: `{report.command}`", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    lines += [f"- settings: {json.dumps(report.settings)}", ""]
    lines.append(
        "| Redis | nodes | idle cmd/s per node | idle Redis CPU per node | keeper cmd/s per node "
        "| keeper CPU per node | loaded cmd/s per node | loaded Redis CPU per node "
        "| lost nodes | messages | reclaim s | lost | dup | MiB/node | load |"
    )
    lines.append("|---" * 15 + "|")
    for r in report.rows:
        reclaim = "-" if r.reclaim_seconds is None else f"{r.reclaim_seconds:.1f}"
        lines.append(
            f"| {r.topology} | {r.nodes} | {r.per_node(r.idle_commands_per_s):.2f} "
            f"| {_pct(r.per_node(r.idle_redis_cpu))} | {r.per_node(r.keeper_commands_per_s):.2f} "
            f"| {_pct(r.per_node(r.idle_keeper_cpu))} | {r.per_node(r.loaded_commands_per_s):.2f} "
            f"| {_pct(r.per_node(r.loaded_redis_cpu))} | {r.victims} | {r.reclaimed_messages} "
            f"| {reclaim} | {r.lost} | {r.duplicates} | {r.memory_per_node_mib:.0f} "
            f"| {r.load:.1f} |"
        )
    lines += ["", "What the keepers send, per node and second (MONITOR sample, idle):", ""]
    for r in report.rows:
        shown = ", ".join(f"{c} {v / r.nodes:.2f}" for c, v in r.keeper_commands.items())
        rest = ", ".join(f"{c} {v / r.nodes:.2f}" for c, v in r.other_commands.items())
        rest = f"; short-lived connections: {rest}" if rest else ""
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        lines.append(f"- {r.topology}, {r.nodes} nodes: {shown or 'none'}{rest}{notes}")
    for skipped in report.skipped:
        lines.append(f"- skipped: {skipped}")
    lines += ["", "```", *plot(report), "```"]
    return "\n".join(lines) + "\n"


def plot(report: Report, width: int = 50) -> list[str]:
    """An ASCII bar chart: idle Redis commands/s per node and keeper commands/s per node,
    by fleet size. Flat bars are the aim."""
    rows = report.rows
    if not rows:
        return []
    top = max(max(r.per_node(r.idle_commands_per_s), 0.01) for r in rows)
    label = max(len(r.topology) for r in rows)
    out = [f"idle Redis commands/s per node (#) and the keepers' share (k); full width = {top:.2f}"]
    for r in rows:
        total = r.per_node(r.idle_commands_per_s)
        keeper = min(total, r.per_node(r.keeper_commands_per_s))
        k = round(width * keeper / top)
        rest = max(0, round(width * total / top) - k)
        out.append(f"{r.topology:>{label}} {r.nodes:>4} |{'k' * k}{'#' * rest} {total:.2f}")
    return out


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 10, 50, 200])
    parser.add_argument(
        "--redis", nargs="+", choices=["single", "cluster"], default=["single", "cluster"]
    )
    parser.add_argument("--lease-ttl", type=float, default=6.0, help="lease_ttl, seconds")
    parser.add_argument("--reclaim-interval", type=float, default=2.0, help="reclaim_interval, s")
    parser.add_argument("--window", type=float, default=10.0, help="each measuring window, s")
    parser.add_argument("--settle", type=float, default=8.0, help="wait after start-up, s")
    parser.add_argument("--monitor", type=float, default=6.0, help="MONITOR sample, s")
    parser.add_argument("--rate", type=float, default=2.0, help="messages/s per node, loaded")
    parser.add_argument("--prefetch", type=int, default=4, help="prefetch of every worker")
    parser.add_argument("--victims", type=float, default=0.2, help="share of nodes killed")
    parser.add_argument(
        "--reclaim-under",
        choices=["load", "idle"],
        default="load",
        help="whether the producer runs while the lost nodes' messages are reclaimed",
    )
    parser.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="every node serves /metrics and the status page, as on Kubernetes",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    a = parser.parse_args(argv)
    if any(n < 1 for n in a.nodes) or a.prefetch < 1 or not 0 < a.victims < 1:
        parser.error("--nodes and --prefetch must be at least 1, --victims between 0 and 1")
    if a.lease_ttl < 1 or a.window <= 0 or a.monitor <= 0 or a.rate <= 0:
        parser.error("--lease-ttl must be at least 1; --window, --monitor, --rate above 0")
    return Settings(
        tuple(a.nodes), tuple(a.redis), a.lease_ttl, a.reclaim_interval, a.window, a.settle,
        a.monitor, a.rate, a.prefetch, a.victims, a.reclaim_under, a.metrics, a.json, a.keep,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    report = Report(command="python -m bench.fleet " + " ".join(argv or sys.argv[1:]))
    settings = asdict(s)
    report.settings = {k: v for k, v in settings.items() if k not in ("json", "keep", "nodes")}
    bookkeeping = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="rqworkers-fleet-"))
    per_node = MEMORY_PER_NODE
    try:
        book = start_redis(bookkeeping, workdir)
        report.machine = machine_info(book.binary)
        for topology in s.topologies:
            for n in s.nodes:
                available = psutil.virtual_memory().available
                if n * per_node > 0.8 * available:
                    why = (f"{topology} {n} nodes: {n} x {per_node / MIB:.0f} MiB would not fit "
                           f"in 80% of the {available / 2**30:.1f} GiB available")  # fmt: skip
                    print(f"fleet: skipped {why}", file=sys.stderr)
                    report.skipped.append(why)
                    continue
                fleet = Fleet(s, topology, n, workdir / f"{topology}-{n}", book)
                fleet.workdir.mkdir()
                try:
                    row = fleet.run()
                finally:
                    fleet.cleanup()
                report.rows.append(row)
                if row.memory_per_node_mib:
                    per_node = int(max(row.memory_per_node_mib * MIB * 1.3, 40 * MIB))
    finally:
        bookkeeping.kill_all()
        if s.keep or not report.ok:
            print(f"fleet: work directory kept in {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    if s.json:
        print(render(report), file=sys.stderr)
        print(json.dumps(asdict(report) | {"ok": report.ok}))
    else:
        print(render(report), end="")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
