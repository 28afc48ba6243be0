"""Fault injection for rqworkers: push numbered messages while breaking things, then count.

    python -m bench.chaos --messages 10000 --faults 30 --seed 1 [--json]
    python -m bench.chaos --delayed 0.5 --max-delay 3   # half of them delayed 0..3 s
    python -m bench.chaos --prioritised 0.5             # half of them at priority 1..9

With `--delayed`, that share of the messages is pushed delayed (`Producer.push(at=)`), its
due time written into the payload after an `@`; the handler counts any delivery that comes
before it (`early`), which must stay 0 as `lost` must. With `--prioritised`, that share
(of the delayed ones too) is pushed at a priority level from 1 to 9, drawn at random.

Two managers, node identities `chaos-a` and `chaos-b`, consume two queues from a private
redis-server (append-only, fsync always) while this script SIGKILLs and SIGSTOPs workers,
SIGKILLs managers alone or with their whole process group, restarts Redis, and once per
run loses a whole node for good. The handler, `record` below, counts every handling in that
same Redis, so once the queues are drained every produced message must have been handled
or dead-lettered. The claim under test is the README's "nothing is lost": exit code 0 when
`lost` is 0 and everything drained, 1 otherwise.

Everything this script starts runs in its own session and is killed on the way out, on
Ctrl-C, SIGTERM or an exception included.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import cast

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.redisproc import RedisServer
from bench.windows import most_in_window, most_overlapping
from rqworkers.store.delayed import DelayedPusher

REPO = Path(__file__).resolve().parent.parent
QUEUES = ("chaos1", "chaos2")
NODES = ("chaos-a", "chaos-b")
HANDLED_KEY = "chaos:handled"  # hash: payload -> times handled
EARLY_KEY = "chaos:early"  # hash: payload -> deliveries before its due time
URL_ENV = "CHAOS_REDIS_URL"
SLEEP_ENV = "CHAOS_SLEEP_MS"
LIMITS_ENV = "CHAOS_LIMITS"  # set: the handler logs each handling's start and end time
SPANS_KEY = "chaos:spans"  # list per queue: "<start> <end>" of each handling that ended
STARTS_KEY = "chaos:starts"  # list per queue: the start time of each handling

LEASE_TTL = 2.0
SHUTDOWN_TIMEOUT = 10.0
WORKERS_PER_NODE = 2 * len(QUEUES)  # processes = 2 on every queue
ORPHAN_GRACE = SHUTDOWN_TIMEOUT + 5.0  # how long workers may outlive a SIGKILLed manager
FAULT_PATIENCE = 15.0  # a fault with no target for this long is skipped
PHASE_SLACK = 60.0  # production and faults may overrun --duration by this much, no more

# Every kind once when the budget allows; `node_loss` exactly once per run.
FAULT_KINDS = (
    "worker_kill",
    "worker_stop",
    "manager_kill",
    "node_kill",
    "node_freeze",
    "redis_restart",
    "node_loss",
)
REPEATABLE = {  # kind -> weight when drawing the rest of the faults
    "worker_kill": 3,
    "worker_stop": 2,
    "manager_kill": 1,
    "node_kill": 1,
    "node_freeze": 1,
    "redis_restart": 1,
}

_STARTED = re.compile(rb"manager\[(\d+)\]: (\S+) (\d+) started")
_RECLAIMED = re.compile(rb"reclaimed (\d+) message\(s\)")
_ACK_MISSES = re.compile(rb"(\d+ )?ack(?:\(s\))? removed nothing")

# -- the handler the managers run ----------------------------------------------------------

_client: redis.Redis | None = None


def record(message: bytes) -> None:
    """Handle one message: "work" a few random ms, then count the handling in Redis.

    Counting last keeps the window between the count and the ack (where a crash makes a
    duplicate) as small as in real handlers that commit at the end. The client never
    retries by itself, so one handling adds exactly one; an error fails the delivery and
    rqworkers retries it.
    """
    global _client
    if _client is None:
        _client = redis.Redis.from_url(
            os.environ[URL_ENV], socket_timeout=10, retry=Retry(NoBackoff(), 0)
        )
    limits = os.environ.get(LIMITS_ENV)
    began = time.time()
    if limits:
        queue = message.split(b":", 1)[0].decode()
        _client.rpush(f"{STARTS_KEY}:{queue}", repr(began))
    _, at, due = message.partition(b"@")
    if at and time.time() < float(due):
        _client.hincrby(EARLY_KEY, message, 1)
    sleep_ms = float(os.environ.get(SLEEP_ENV) or 0)
    if sleep_ms > 0:
        time.sleep(random.uniform(0, sleep_ms) / 1000)
    if limits:
        _client.rpush(f"{SPANS_KEY}:{queue}", f"{began!r} {time.time()!r}")
    _client.hincrby(HANDLED_KEY, message, 1)


# -- settings and the config files ---------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    messages: int
    faults: int
    duration: float
    seed: int
    keep: bool
    json: bool
    max_attempts: int
    prefetch: int
    handler_sleep_ms: float
    timeout: float
    redis_downtime: float
    drain_timeout: float
    distinct: int = 0  # payload values per queue; 0: every payload unique
    concurrency: int = 1  # messages a worker of the second queue runs at once
    max_running: int = 0  # on the first queue; 0: none
    rate_limit: str = ""  # on the second queue, "N/s"; "": none
    delayed: float = 0.0  # share of the messages pushed delayed
    max_delay: float = 3.0  # seconds: each delayed message is due 0..max_delay after its push
    prioritised: float = 0.0  # share of the messages pushed at a priority level 1..9


def config_text(node: str, url: str, s: Settings) -> str:
    """One node's TOML: short leases and intervals so that recovery shows within seconds.

    The first queue takes one message at a time, the second `--prefetch` at a time (and
    runs `--concurrency` at once), so that the one-by-one, the batched (deferred acks,
    give-back) and the concurrent (out-of-order settling) paths are all broken.
    """
    prefetch = {QUEUES[0]: 1, QUEUES[1]: s.prefetch}
    concurrency = {QUEUES[0]: 1, QUEUES[1]: s.concurrency}
    limits = {
        QUEUES[0]: f"max_running = {s.max_running}\n" if s.max_running else "",
        QUEUES[1]: f'rate_limit = "{s.rate_limit}"\n' if s.rate_limit else "",
    }
    workers = "".join(
        f'\n[[workers]]\nqueue = "{queue}"\nprefetch = {prefetch[queue]}\n'
        f"concurrency = {concurrency[queue]}\n{limits[queue]}"
        for queue in QUEUES
    )
    return f"""\
[manager]
node = "{node}"
check_interval = 0.2
shutdown_timeout = {SHUTDOWN_TIMEOUT}
restart_backoff_max = 2.0
lease_ttl = {LEASE_TTL}
reclaim_interval = 0.5

[logging]
level = "INFO"

[hosts]
local = "{url}"

[defaults]
host = "local"
handler = "bench.chaos:record"
processes = 2
max_requests = 1000
max_requests_jitter = 200
timeout = {s.timeout}
timeout_grace = 2.0
max_attempts = {s.max_attempts}
retry_delay = 0.2
retry_delay_max = 2.0
{workers}"""


def payload(number: int, width: int, distinct: int = 0) -> bytes:
    """Message `number` (1-based): the queues take turns, numbers are unique across both;
    with `distinct` > 0 each queue's payloads cycle through that many values instead."""
    queue = QUEUES[(number - 1) % len(QUEUES)]
    if distinct:
        return f"{queue}:v{((number - 1) // len(QUEUES)) % distinct}".encode()
    return f"{queue}:{number:0{width}d}".encode()


def plan_faults(
    rng: random.Random, count: int, start: float, end: float
) -> list[tuple[float, str]]:
    """`count` (time, kind) pairs at random intervals in [start, end), every kind once if room.

    Intervals are exponential, so faults sometimes come in bursts, as they do in life.
    """
    if count <= 0:
        return []
    others = list(REPEATABLE)
    if count < len(FAULT_KINDS):
        kinds = ["node_loss", *rng.sample(others, count - 1)]
    else:
        weights = [REPEATABLE[k] for k in others]
        kinds = ["node_loss", *others, *rng.choices(others, weights, k=count - len(FAULT_KINDS))]
    rng.shuffle(kinds)
    gaps = [rng.expovariate(1.0) for _ in range(count + 1)]
    total, span = sum(gaps), end - start
    times = [start + span * acc / total for acc in itertools.accumulate(gaps[:-1])]
    return list(zip(times, kinds, strict=True))


# -- processes -----------------------------------------------------------------------------


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, signum: int) -> bool:
    """Signal a process we saw earlier; psutil refuses if its pid now names another one."""
    try:
        proc.send_signal(signum)
    except psutil.Error:
        return False
    return True


class Node:
    """One node identity: its config and log files, and whichever manager runs it now."""

    def __init__(self, name: str, config: Path, log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self.log = log
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.lost = False  # killed for good by the `node_loss` fault
        self.restart_at: float | None = None  # a scheduled restart after a node_kill
        self.leaders: list[int] = []  # every manager pid started, each its group's id
        self._children: dict[int, dict[int, str]] = {}  # manager pid -> {pid: slot name}
        self._offset = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rqworkers", "run", "--config", str(self.config)],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: see `signal_session`
            )
        self.leaders.append(self.process.pid)
        self.restart_at = None

    def _scan_log(self) -> None:
        """Learn `<name> <pid> started` lines written since the last scan."""
        with open(self.log, "rb") as inp:
            inp.seek(self._offset)
            data = inp.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for match in _STARTED.finditer(data[:end]):
            self._children.setdefault(int(match[1]), {})[int(match[3])] = match[2].decode()

    def workers(self) -> list[psutil.Process]:
        """Live workers of the current manager: its children logged as started, not the keeper."""
        if self.process is None or not self.alive:
            return []
        self._scan_log()
        names = self._children.get(self.process.pid, {})
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.Error:
            return []
        return [c for c in children if names.get(c.pid, "keeper") != "keeper" and _alive(c)]

    def kill_manager(self) -> list[psutil.Process]:
        """SIGKILL the manager alone; return its children, which must now exit by themselves."""
        assert self.process is not None
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.Error:
            children = []
        self.process.kill()
        self.process.wait()
        return children

    def kill_group(self) -> None:
        """SIGKILL the manager's whole session: the node vanishes at once."""
        assert self.process is not None
        signal_session(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float) -> int | None:
        """SIGTERM and wait: the graceful stop. None if it did not stop in time (then killed)."""
        if self.process is None or not self.alive:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return None


# A handler's own failure is logged with its traceback on purpose (the harness's handler
# fails while Redis restarts); only the others are anomalies.
_HANDLER_FAILURE = re.compile(r"delivery \d+/\d+ failed|dead-lettered a ")


# How Python joins the tracebacks of chained exceptions: the line two above the next one.
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def tracebacks(log: bytes) -> list[str]:
    """The exception line ending each traceback in a log that is not a handler's own
    failure, with the log line that preceded it. A chained exception's tracebacks belong
    to the record of the first."""
    lines = log.decode(errors="replace").splitlines()
    found = []
    handlers = False  # whether the traceback being read is a handler's own failure
    for i, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        chained = i >= 2 and lines[i - 2].startswith(_CHAINED)
        if not chained:
            handlers = bool(i and _HANDLER_FAILURE.search(lines[i - 1]))
        if handlers:
            continue
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j] and not lines[j][0].isspace()), None
        )
        context = lines[i - 1].split(": ", 1)[-1] if i else ""
        error = lines[end] if end is not None else "(truncated)"
        found.append(f"{error} (after: {context})" if context else error)
    return found


def signal_session(leader: int, signum: int) -> None:
    """Signal every process of the session that `leader` (a manager) started: itself, its
    keeper, and its workers, which lead process groups of their own within the session."""
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader:
                os.kill(proc.pid, signum)
        except (psutil.Error, OSError):
            continue


def kill_groups(leaders: Sequence[int], since: float) -> None:
    """SIGKILL every process still in one of our sessions (one per manager started).

    Only processes created after `since` count, so a recycled session id can never make us
    kill a stranger.
    """
    sessions = set(leaders)
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if proc.info["create_time"] >= since - 1 and os.getsid(proc.pid) in sessions:
                proc.kill()
        except (psutil.Error, OSError):
            continue


# -- the run -------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    produced: int = 0
    handled: int = 0
    lost: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    max_deliveries: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    faults_skipped: dict[str, int] = field(default_factory=dict)
    drained: bool = False
    drain_seconds: float | None = None  # from the end of the last fault (or of production)
    wall_seconds: float = 0.0
    reclaimed_messages: int = 0
    ack_misses: int = 0
    tracebacks: int = 0
    orphans: int = 0
    manager_exit_codes: dict[str, int | None] = field(default_factory=dict)
    unexpected_payloads: int = 0
    delayed: int = 0  # messages pushed delayed
    prioritised: int = 0  # messages pushed at a priority level
    early: int = 0  # deliveries before the message was due
    stuck: dict[str, int] = field(default_factory=dict)
    lost_sample: dict[str, str] = field(default_factory=dict)  # payload -> where it sits
    anomalies: list[str] = field(default_factory=list)
    # With limits: the most handlings of the first queue that overlapped (of those that
    # ended: a handler killed mid-message logs no end), and the most starts of the second
    # in any window of the rate limit's length; None without limits.
    max_running_seen: int | None = None
    most_starts_in_window: int | None = None
    limits_held: bool = True

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.drained and self.limits_held and self.early == 0


class Chaos:
    """One run: start Redis and two nodes, produce while injecting faults, drain, count."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis")
        self.client: redis.Redis = self.redis.client()
        self.redis_up = False
        self.width = max(6, len(str(settings.messages)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env[URL_ENV] = self.redis.url
        env[SLEEP_ENV] = str(settings.handler_sleep_ms)
        if settings.max_running or settings.rate_limit:
            env[LIMITS_ENV] = "1"
        env.pop("RQWORKERS_CONFIG", None)
        self.nodes: list[Node] = []
        for name in NODES:
            config = workdir / f"{name}.toml"
            config.write_text(config_text(name, self.redis.url, settings))
            self.nodes.append(Node(name, config, workdir / f"{name}.log", env))
        self.events: list[tuple[float, int, str, Callable[[], None]]] = []
        self._event_ids = itertools.count()
        self.stopped: dict[int, psutil.Process] = {}  # SIGSTOPped workers awaiting SIGCONT
        self.killed: set[psutil.Process] = set()  # SIGKILLed, maybe not dead yet: no target
        self.orphan_watch: list[tuple[float, psutil.Process]] = []
        self.report = Report(seed=settings.seed)
        self.faults: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.produced = 0
        self.made: dict[int, bytes] = {}  # the delayed messages' payloads, by number
        self.delay_rng = random.Random(settings.seed + 1)  # leaves the faults' draw alone
        self.level_rng = random.Random(settings.seed + 2)
        self.production_end = 0.0
        self.t0 = time.monotonic()
        self.last_fault_end = self.t0
        self.started_at = time.time()

    # -- helpers --

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    def schedule(self, delay: float, what: str, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (time.monotonic() + delay, next(self._event_ids), what, action))

    def run_due_events(self) -> None:
        while self.events and self.events[0][0] <= time.monotonic():
            _, _, _, action = heapq.heappop(self.events)
            action()
            self.last_fault_end = time.monotonic()

    def all_workers(self) -> list[psutil.Process]:
        """Live workers of every node, except those we SIGKILLed a moment ago."""
        return [w for node in self.nodes for w in node.workers() if w not in self.killed]

    def leaders(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.leaders]

    # -- phases --

    def run(self) -> Report:
        self.redis.start()
        self.redis_up = True
        self.client = self.redis.client()
        for node in self.nodes:
            node.start()
        self.wait_for_workers()
        self.t0 = self.last_fault_end = time.monotonic()
        self.say(
            f"redis on {self.redis.url}, nodes {', '.join(NODES)} up; producing "
            f"{self.s.messages} messages over {self.s.duration:g}s with {self.s.faults} faults"
        )
        self.produce_and_inject()
        drained_at = self.drain()
        if drained_at is not None:
            self.report.drained = True
            since = self.last_fault_end if self.faults else self.production_end
            self.report.drain_seconds = round(max(0.0, drained_at - since), 2)
        self.stop_managers()
        self.count()
        self.report.wall_seconds = round(time.monotonic() - self.t0, 1)
        return self.report

    def wait_for_workers(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while any(len(node.workers()) < WORKERS_PER_NODE for node in self.nodes):
            for node in self.nodes:
                if not node.alive:
                    raise RuntimeError(f"manager of {node.name} exited; see {node.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not all up within {timeout}s; see {self.workdir}")
            time.sleep(0.05)

    def produce_and_inject(self) -> None:
        plan = plan_faults(self.rng, self.s.faults, 1.0, self.s.duration)
        deadline = self.t0 + self.s.duration + PHASE_SLACK
        next_progress = self.t0 + 5.0
        index = 0
        while self.produced < self.s.messages or index < len(plan) or self.events:
            now = time.monotonic()
            if now > deadline:
                self.report.anomalies.append(
                    f"production and faults overran --duration by {PHASE_SLACK:g}s; "
                    f"{self.s.messages - self.produced} messages and "
                    f"{len(plan) - index} faults left undone"
                )
                break
            self.produce(now - self.t0)
            self.run_due_events()
            while index < len(plan) and plan[index][0] <= time.monotonic() - self.t0:
                due, kind = plan[index]
                if self.inject(kind, index + 1, len(plan)):
                    self.faults[kind] += 1
                    self.last_fault_end = time.monotonic()
                elif time.monotonic() - self.t0 - due < FAULT_PATIENCE:
                    break  # no target yet (say, a node is restarting): try again shortly
                else:
                    self.skipped[kind] += 1
                    self.say(f"fault {index + 1}/{len(plan)}: {kind} skipped (no target)")
                index += 1
            self.supervise()
            if now >= next_progress:
                next_progress = now + 5.0
                self.say(f"produced {self.produced}/{self.s.messages}, faults {index}/{len(plan)}")
            time.sleep(0.01)
        while self.events:  # after an overrun: resume what is stopped, restart what is down
            _, _, _, action = heapq.heappop(self.events)
            action()
            self.last_fault_end = time.monotonic()

    def produce(self, elapsed: float) -> None:
        """Push whatever the steady pace asks for by now, in pipelined batches."""
        if not self.redis_up:
            return  # catch up once Redis is back
        share = min(1.0, elapsed / self.s.duration) if self.s.duration > 0 else 1.0
        target = min(self.s.messages, math.ceil(self.s.messages * share))
        while self.produced < target:
            count = min(target - self.produced, 1000)
            batch = [
                payload(n, self.width, self.s.distinct)
                for n in range(self.produced + 1, self.produced + count + 1)
            ]
            if self.s.delayed:
                batch = self.push_delayed(batch, self.produced + 1)
            if self.s.prioritised:
                batch = self.push_prioritised(batch)
            pipe = self.client.pipeline(transaction=False)
            for queue in QUEUES:
                mine = [p for p in batch if p.startswith(queue.encode() + b":")]
                if mine:
                    pipe.lpush(queue, *mine)
            pipe.execute()  # Redis only goes down when we say so: an error here is a real one
            self.produced += count
            if self.produced == self.s.messages:
                self.production_end = time.monotonic()

    def push_delayed(self, batch: list[bytes], first: int) -> list[bytes]:
        """Push a `--delayed` share of `batch` (numbered from `first`) delayed, each due
        0..`--max-delay` s from now, written in its payload; the rest, to push at once."""
        pusher = DelayedPusher(self.client)
        now = time.time()
        rest = []
        for n, body in enumerate(batch, first):
            if self.delay_rng.random() >= self.s.delayed:
                rest.append(body)
                continue
            due = now + self.delay_rng.uniform(0, self.s.max_delay)
            self.made[n] = b"%s@%r" % (body, due)
            pusher.push(body.split(b":")[0].decode(), [self.made[n]], due, self.level())
        return rest

    def level(self) -> int:
        """A priority level for the next message: 1..9 for a `--prioritised` share, else 0."""
        if self.s.prioritised and self.level_rng.random() < self.s.prioritised:
            self.report.prioritised += 1
            return self.level_rng.randint(1, 9)
        return 0

    def push_prioritised(self, batch: list[bytes]) -> list[bytes]:
        """Push a `--prioritised` share of `batch` at a priority level, a batch per (queue,
        level); the rest, to push at once."""
        pusher = DelayedPusher(self.client)
        rest = []
        chosen: dict[tuple[str, int], list[bytes]] = {}
        for body in batch:
            level = self.level()
            if level:
                chosen.setdefault((body.split(b":")[0].decode(), level), []).append(body)
            else:
                rest.append(body)
        for (queue, level), bodies in chosen.items():
            pusher.push(queue, bodies, None, level)
        return rest

    def supervise(self) -> None:
        """Notice managers that die on their own, orphans outliving their manager, no node left."""
        now = time.monotonic()
        for node in self.nodes:
            if node.lost or node.restart_at is not None or node.alive:
                continue
            code = node.process.returncode if node.process else None
            self.report.anomalies.append(f"manager of {node.name} exited by itself (code {code})")
            self.say(f"manager of {node.name} exited by itself (code {code}); restarting it")
            node.start()
        if not any(node.alive or node.restart_at is not None for node in self.nodes):
            lost = next((node for node in self.nodes if node.lost), self.nodes[0])
            self.say(f"both nodes gone: bringing {lost.name} back")
            lost.lost = False
            lost.start()
        still = []
        for deadline, proc in self.orphan_watch:
            if not _alive(proc):
                continue
            if now < deadline:
                still.append((deadline, proc))
                continue
            self.report.orphans += 1
            self.report.anomalies.append(
                f"pid {proc.pid} outlived its SIGKILLed manager by {ORPHAN_GRACE:g}s; killed"
            )
            _signal(proc, signal.SIGKILL)
        self.orphan_watch = still

    # -- faults --

    def inject(self, kind: str, number: int, total: int) -> bool:
        """Inject one fault of `kind`; False when it has no target right now."""
        note = getattr(self, f"fault_{kind}")()
        if note is None:
            return False
        self.say(f"fault {number}/{total}: {kind} {note}")
        return True

    def fault_worker_kill(self) -> str | None:
        workers = self.all_workers()
        if not workers:
            return None
        victim = self.rng.choice(workers)
        if not _signal(victim, signal.SIGKILL):
            return None
        self.killed.add(victim)
        self.stopped.pop(victim.pid, None)
        return f"pid {victim.pid}"

    def fault_worker_stop(self) -> str | None:
        workers = [w for w in self.all_workers() if w.pid not in self.stopped]
        if not workers:
            return None
        victim = self.rng.choice(workers)
        if not _signal(victim, signal.SIGSTOP):
            return None
        self.stopped[victim.pid] = victim
        pause = self.rng.uniform(0.1, max(0.2, min(3.0, self.s.timeout / 2)))

        def resume() -> None:
            if self.stopped.pop(victim.pid, None) is not None:
                _signal(victim, signal.SIGCONT)

        self.schedule(pause, "SIGCONT", resume)
        return f"pid {victim.pid} for {pause:.2f}s"

    def _live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.alive and not n.lost and n.restart_at is None]

    def fault_manager_kill(self) -> str | None:
        nodes = self._live_nodes()
        if not nodes:
            return None
        node = self.rng.choice(nodes)
        old = node.process.pid if node.process else 0
        deadline = time.monotonic() + ORPHAN_GRACE
        self.orphan_watch.extend((deadline, child) for child in node.kill_manager())
        node.start()
        return f"{node.name} (manager {old} alone; its workers must exit by themselves)"

    def fault_node_kill(self) -> str | None:
        nodes = self._live_nodes()
        if not nodes:
            return None
        node = self.rng.choice(nodes)
        old = node.process.pid if node.process else 0
        node.kill_group()
        down = self.rng.uniform(0, 1.5 * LEASE_TTL)
        node.restart_at = time.monotonic() + down
        self.schedule(down, f"restart {node.name}", node.start)
        return f"{node.name} (group {old}; back in {down:.2f}s)"

    def fault_node_freeze(self) -> str | None:
        """SIGSTOP a whole node past its lease TTL, as a VM pause does, then let it go on.

        The other node reclaims its messages meanwhile (duplicates are expected); once it
        resumes it must register again, or a later loss of it would strand its lists.
        """
        nodes = self._live_nodes()
        if not nodes:
            return None
        node = self.rng.choice(nodes)
        assert node.process is not None
        group = node.process.pid
        signal_session(group, signal.SIGSTOP)
        pause = self.rng.uniform(1.5 * LEASE_TTL, 3 * LEASE_TTL)
        node.restart_at = time.monotonic() + pause  # not a target for other faults meanwhile

        def thaw() -> None:
            signal_session(group, signal.SIGCONT)
            node.restart_at = None

        self.schedule(pause, f"thaw {node.name}", thaw)
        return f"{node.name} (group {group}) for {pause:.2f}s"

    def fault_node_loss(self) -> str | None:
        nodes = self._live_nodes()
        if len(nodes) < len(self.nodes):
            return None  # only while both run: the other one must take over
        node = self.rng.choice(nodes)
        old = node.process.pid if node.process else 0
        node.kill_group()
        node.lost = True
        return f"{node.name} (group {old}) for good"

    def fault_redis_restart(self) -> str | None:
        if not self.redis_up:
            return None
        self.client.close()
        self.redis.stop()
        self.redis_up = False
        down = self.rng.uniform(0, self.s.redis_downtime)

        def start() -> None:
            self.redis.start()
            self.client = self.redis.client()
            self.redis_up = True

        self.schedule(down, "start redis", start)
        return f"(down {down:.2f}s)"

    # -- the end --

    def pending(self) -> dict[str, int]:
        """Messages not yet settled, by key, read in one transaction so nothing slips between."""
        pipe = self.client.pipeline(transaction=True)
        for queue in QUEUES:
            pipe.llen(queue)
            pipe.zcard(f"{queue}:retry")
        pipe.keys("chaos*:processing:*")
        *counts, private = pipe.execute()
        keys = [f"{q}{suffix}" for q in QUEUES for suffix in ("", ":retry")]
        found = {k: int(n) for k, n in zip(keys, counts, strict=True) if n}
        for key in private:
            name = key.decode()
            found[name] = int(self.client.llen(name))  # informative only: the key exists
        return found

    def drain(self) -> float | None:
        """Wait, bounded, until no queue, private list or retry set holds anything."""
        deadline = time.monotonic() + self.s.drain_timeout
        self.say(f"production and faults over; draining (at most {self.s.drain_timeout:g}s)")
        while True:
            self.supervise()
            left = self.pending()
            if not left:
                self.say("drained")
                return time.monotonic()
            if time.monotonic() > deadline:
                self.report.stuck = left
                self.say(f"NOT drained after {self.s.drain_timeout:g}s: {left}")
                return None
            time.sleep(0.1)

    def stop_managers(self) -> None:
        for node in self.nodes:
            if node.alive:
                code = node.stop(SHUTDOWN_TIMEOUT + 10.0)
                self.report.manager_exit_codes[node.name] = code
                if code != 0:
                    self.report.anomalies.append(f"manager of {node.name} stopped with {code}")
        deadline = time.monotonic() + ORPHAN_GRACE
        while self.orphan_watch and time.monotonic() < deadline:
            self.supervise()
            time.sleep(0.1)
        for _, proc in self.orphan_watch:
            if _alive(proc):
                self.report.orphans += 1
                self.report.anomalies.append(f"pid {proc.pid} outlived its manager; killed")
                _signal(proc, signal.SIGKILL)

    def count(self) -> None:
        r = self.report
        handled = {
            k: int(v) for k, v in cast(dict[bytes, bytes], self.client.hgetall(HANDLED_KEY)).items()
        }
        dead: Counter[bytes] = Counter()
        for queue in QUEUES:
            dead.update(cast(list[bytes], self.client.lrange(f"{queue}:dead", 0, -1)))
        produced = Counter(
            self.made.get(n) or payload(n, self.width, self.s.distinct)
            for n in range(1, self.produced + 1)
        )
        r.delayed = len(self.made)
        r.early = sum(int(v) for v in cast(list[bytes], self.client.hvals(EARLY_KEY)))
        # Per payload value: copies produced, handled, dead. With unique payloads this is
        # exact; with repeating ones a loss shows as fewer copies handled or dead than made.
        short = {p: n - handled.get(p, 0) - dead[p] for p, n in produced.items()}
        lost = sorted(p for p, missing in short.items() if missing > 0)
        r.produced = sum(produced.values())
        r.handled = sum(min(n, handled.get(p, 0)) for p, n in produced.items())
        r.dead_lettered = sum(
            min(dead[p], max(0, n - handled.get(p, 0))) for p, n in produced.items()
        )
        r.lost = sum(short[p] for p in lost)
        r.duplicates = sum(max(0, -missing) for missing in short.values())
        r.max_deliveries = max(handled.values(), default=0) if not self.s.distinct else 0
        r.unexpected_payloads = len(handled.keys() - produced.keys())
        r.faults = {kind: self.faults[kind] for kind in FAULT_KINDS}
        r.faults_skipped = {k: v for k, v in self.skipped.items() if v}
        self.count_limits()
        where = self.locate(set(lost[:20]))
        r.lost_sample = {p.decode(): where.get(p, "nowhere") for p in lost[:20]}
        for node in self.nodes:
            text = node.log.read_bytes() if node.log.exists() else b""
            r.reclaimed_messages += sum(int(n) for n in _RECLAIMED.findall(text))
            r.ack_misses += sum(int(n or 1) for n in _ACK_MISSES.findall(text))
            for error in tracebacks(text):
                r.tracebacks += 1
                r.anomalies.append(f"traceback in {node.log.name}: {error}")

    def count_limits(self) -> None:
        """How close the handlings came to the limits, from the handler's own log."""
        r, s = self.report, self.s
        if s.max_running:
            spans = [
                tuple(map(float, line.split()))
                for line in cast(list[bytes], self.client.lrange(f"{SPANS_KEY}:{QUEUES[0]}", 0, -1))
            ]
            r.max_running_seen = most_overlapping(spans)
            r.limits_held &= r.max_running_seen <= s.max_running
        if s.rate_limit:
            count, unit = s.rate_limit.split("/")
            seconds = {"s": 1.0, "m": 60.0, "h": 3600.0}[unit]
            starts = sorted(
                float(x)
                for x in cast(list[bytes], self.client.lrange(f"{STARTS_KEY}:{QUEUES[1]}", 0, -1))
            )
            r.most_starts_in_window = most_in_window(starts, seconds)
            r.limits_held &= r.most_starts_in_window <= int(count)

    def locate(self, wanted: set[bytes]) -> dict[bytes, str]:
        """Where each of `wanted` still sits, for the evidence of a loss."""
        found: dict[bytes, str] = {}
        if not wanted:
            return found
        for key in cast(list[bytes], self.client.keys("chaos*")):
            kind = self.client.type(key)
            if kind == b"list":
                members = cast(list[bytes], self.client.lrange(key, 0, -1))
            elif kind == b"zset":
                members = [m[8:] for m in cast(list[bytes], self.client.zrange(key, 0, -1))]
            elif kind == b"hash" and key != HANDLED_KEY.encode():
                members = list(cast(dict[bytes, bytes], self.client.hgetall(key)))
            else:
                continue
            for member in wanted.intersection(members):
                found[member] = f"{found.get(member, '')} {key.decode()}".strip()
        return found

    def cleanup(self) -> None:
        """Leave nothing behind: every group we started, stopped workers, Redis."""
        for proc in self.stopped.values():
            _signal(proc, signal.SIGKILL)
        kill_groups(self.leaders(), self.started_at)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with suppress(subprocess.TimeoutExpired):
                    node.process.wait(5)
        for _, proc in self.orphan_watch:
            _signal(proc, signal.SIGKILL)
        with suppress(redis.RedisError):
            self.client.close()
        self.redis.kill()


# -- the command ---------------------------------------------------------------------------


def render(report: Report, command: str) -> str:
    """The human-readable table."""
    faults = sum(report.faults.values())
    kinds = ", ".join(f"{k} {n}" for k, n in report.faults.items())
    skipped = ", ".join(f"{k} {n}" for k, n in report.faults_skipped.items()) or "none"
    drain = f"{report.drain_seconds:.1f} s" if report.drain_seconds is not None else "NOT DRAINED"
    codes = ", ".join(f"{k} {v}" for k, v in report.manager_exit_codes.items()) or "-"
    rows = [
        ("command", command),
        ("seed", str(report.seed)),
        ("produced", str(report.produced)),
        ("handled (each message once)", str(report.handled)),
        ("dead-lettered", str(report.dead_lettered)),
        ("LOST", str(report.lost)),
        ("pushed delayed", str(report.delayed)),
        ("pushed at a priority level", str(report.prioritised)),
        ("EARLY (handled before due)", str(report.early)),
        ("duplicates (extra handlings)", str(report.duplicates)),
        *_limit_rows(report),
        ("max deliveries of one message", str(report.max_deliveries)),
        ("faults injected", f"{faults} ({kinds})"),
        ("faults skipped (no target)", skipped),
        ("drained after the last fault", drain),
        ("wall time (production start to end)", f"{report.wall_seconds:.1f} s"),
        ("messages reclaimed from dead nodes", str(report.reclaimed_messages)),
        ("acks that found nothing to remove", str(report.ack_misses)),
        ("orphans outliving their manager", str(report.orphans)),
        ("tracebacks in the logs", str(report.tracebacks)),
        ("manager exit codes at the end", codes),
    ]
    if report.unexpected_payloads:
        rows.append(("handled but never produced", str(report.unexpected_payloads)))
    if report.stuck:
        rows.append(("stuck", json.dumps(report.stuck)))
    if report.lost_sample:
        rows.append(("lost (sample: where)", json.dumps(report.lost_sample)))
    for anomaly in report.anomalies:
        rows.append(("anomaly", anomaly))
    rows.append(("result", "PASS: nothing lost" if report.ok else "FAIL"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="Inject faults into two rqworkers nodes and prove no message is lost.",
    )
    parser.add_argument("--messages", type=int, default=10_000, help="messages to produce")
    parser.add_argument("--faults", type=int, default=30, help="faults to inject")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of production (soft bound)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--max-attempts", type=int, default=1000, help="rqworkers max_attempts")
    parser.add_argument(
        "--concurrency", type=int, default=1, help=f"rqworkers concurrency on {QUEUES[1]}"
    )
    parser.add_argument(
        "--distinct",
        type=int,
        default=0,
        help="payload values per queue, repeated (default 0: every payload unique)",
    )
    parser.add_argument(
        "--prefetch", type=int, default=10, help=f"rqworkers prefetch on {QUEUES[1]}"
    )
    parser.add_argument(
        "--handler-sleep-ms", type=float, default=2.0, help="handler sleeps 0..N ms at random"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="rqworkers message timeout")
    parser.add_argument(
        "--redis-downtime", type=float, default=2.0, help="Redis stays down 0..N s per restart"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=120.0, help="bound of the final drain wait"
    )
    parser.add_argument(
        "--max-running", type=int, default=0, help=f"rqworkers max_running on {QUEUES[0]}"
    )
    parser.add_argument(
        "--rate-limit", default="", help=f'rqworkers rate_limit on {QUEUES[1]}, as "N/s"'
    )
    parser.add_argument("--delayed", type=float, default=0.0, help="share pushed delayed, 0..1")
    parser.add_argument(
        "--max-delay", type=float, default=3.0, help="a delayed message is due 0..N s later"
    )
    parser.add_argument(
        "--prioritised", type=float, default=0.0, help="share pushed at priority 1..9, 0..1"
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.faults < 0 or args.prefetch < 1 or args.distinct < 0:
        parser.error("--messages and --prefetch must be at least 1, --faults at least 0")
    if not 0 <= args.prioritised <= 1:
        parser.error("--prioritised must be from 0 to 1")
    if not 0 <= args.delayed <= 1 or not 0 <= args.max_delay <= 3600:
        parser.error("--delayed must be from 0 to 1, --max-delay from 0 to 3600")
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be from 1 to 1000")
    # Default pace: about 500 messages and 3 faults a second at most, 10 s at least.
    duration = args.duration or max(10.0, args.messages / 500, args.faults / 3)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    return Settings(
        messages=args.messages,
        faults=args.faults,
        duration=duration,
        seed=seed,
        keep=args.keep,
        json=args.json,
        max_attempts=args.max_attempts,
        prefetch=args.prefetch,
        handler_sleep_ms=args.handler_sleep_ms,
        timeout=args.timeout,
        redis_downtime=args.redis_downtime,
        drain_timeout=args.drain_timeout,
        distinct=args.distinct,
        concurrency=args.concurrency,
        max_running=args.max_running,
        rate_limit=args.rate_limit,
        delayed=args.delayed,
        max_delay=args.max_delay,
        prioritised=args.prioritised,
    )


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into an exception, so the clean-up in `finally` runs.

    SIGINT too, explicitly: a shell starts background jobs with SIGINT ignored.
    """

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {
        s: signal.signal(s, raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    command = "python -m bench.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="rqchaos-"))
    chaos: Chaos | None = None
    report: Report | None = None
    try:
        with _stop_on_signals():
            try:
                chaos = Chaos(settings, workdir)
                report = chaos.run()
            finally:
                if chaos is not None:
                    chaos.cleanup()
    except KeyboardInterrupt as exc:
        print(f"chaos: interrupted ({exc or 'SIGINT'}); everything stopped", file=sys.stderr)
        return 1
    finally:
        keep = settings.keep or report is None or not report.ok
        if keep:
            print(f"chaos: logs and Redis data kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    assert report is not None  # every other way out has returned or raised
    table = render(report, command)
    if settings.json:
        print(table, file=sys.stderr)
        print(json.dumps({"command": command, **asdict(report), "ok": report.ok}))
    else:
        print(table)
    return 0 if report.ok else 1


def _limit_rows(report: Report) -> list[tuple[str, str]]:
    rows = []
    if report.max_running_seen is not None:
        rows.append((f"most running at once ({QUEUES[0]})", str(report.max_running_seen)))
    if report.most_starts_in_window is not None:
        rows.append((f"most starts in a window ({QUEUES[1]})", str(report.most_starts_in_window)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
