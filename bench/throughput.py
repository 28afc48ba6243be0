"""Throughput, latency and cost of rqworkers beside raw Redis, plain redis-py and peer queues.

    python -m bench.throughput [--messages N] [--quick] [--png out.png] [--json]

Everything runs in one go against one private `redis-server` (127.0.0.1, a free port, no
persistence), so every ratio printed compares figures taken on the same machine minutes
apart. The yardsticks are the point: rqworkers is judged against the best a plain redis-py
consumer with the same reliability achieves here, not against absolute numbers.

How rqworkers is timed: the real `python -m rqworkers run` starts on an empty queue and waits
until its workers block in BLMOVE; then the N messages, pushed beforehand onto a staging
list, are RENAMEd onto the queue in one O(1) command, which wakes the workers at once. The
rate is N / (time of the last handler return - time of the RENAME): start-up is not
counted, the first fetch is. The handlers (`bench/handlers.py`) keep their timings in memory
and write them in `teardown`. Latency is a separate phase of the same service run: a paced
producer LPUSHes stamped messages at half the rate just measured, and the handler records
stamp → start.

Peers (RQ, Celery, Dramatiq, arq) run from the interpreter given by `--peers-python`
(default `$BENCH_PEERS_PYTHON`, else ~/.cache/rqworkers-bench/peers/bin/python if present,
else this one): `bench/requirements.txt` pins them, and arq pins redis-py < 6, so they belong
in their own virtualenv. A peer that cannot be imported or run is reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, cast

import psutil
import redis

from bench.redisproc import free_port, redis_server_binary, wait_for

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
QUEUE = "bench:q"
STAGING = "bench:staging"
NODE = "bench"
# The paired section's ratios (issue 8's targets, and the yardstick's own scaling), with the
# least each must reach (None: reported, no target).
PAIRED: dict[str, float | None] = {
    "prefetch 1 / (b)": 0.9,
    "prefetch 100 / (c)": 0.5,
    "prefetch 100, 2 proc / 1 proc": 1.8,
    "yardstick (c), 2 proc / 1 proc": None,
}
PAYLOAD_SIZE = 100
DEFAULT_PEERS_PYTHON = Path.home() / ".cache" / "rqworkers-bench" / "peers" / "bin" / "python"


# -- processes ------------------------------------------------------------------------------


class Processes:
    """Every process the bench starts, each in its own process group, all killed at exit."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (child keeps it)
        try:
            proc = subprocess.Popen(
                args,
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        """SIGTERM the leader (a graceful stop), wait for its whole session to end, then
        SIGKILL whatever is left of it. rqworkers' workers lead process groups of their
        own: one left running would take the next run's messages."""
        deadline = time.monotonic() + timeout
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: not _session(proc.pid),
                timeout=max(0.1, deadline - time.monotonic()),
                interval=0.05,
            )
        for pid in _session(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._kill_group(proc)

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)

    def kill_all(self) -> None:
        for proc in reversed(self.started):
            self._kill_group(proc)
        self.started.clear()


def _session(leader: int) -> list[int]:
    """The live processes of the session `leader` started (zombies are not alive)."""
    found = []
    for process in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(OSError, psutil.Error):
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(process.pid) == leader:
                found.append(process.pid)
    return found


# -- redis-server ---------------------------------------------------------------------------


@dataclass
class RedisServer:
    binary: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port)


def start_redis(procs: Processes, workdir: Path, extra: Sequence[str] = ()) -> RedisServer:
    """A redis-server of our own: the INFO pid must be our child's, never someone else's.
    `extra`: more arguments (a cluster node's, say)."""
    binary = redis_server_binary()
    for _ in range(5):
        port = free_port()
        args = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(workdir), "--protected-mode", "yes", *extra]
        proc = procs.start(args, log=workdir / f"redis-{port}.log")
        client = redis.Redis(host=HOST, port=port)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                pid = int(client.info("server")["process_id"])
            except redis.ConnectionError:
                time.sleep(0.02)
                continue
            if pid != proc.pid:
                raise RuntimeError(f"port {port} answered with a redis-server that is not ours")
            return RedisServer(binary, port, proc)
        procs.stop(proc)
    raise RuntimeError("could not start redis-server (see its log in the work directory)")


# -- payloads and queues --------------------------------------------------------------------


def throughput_payloads(n: int, phase: int = 0, size: int = PAYLOAD_SIZE) -> Iterator[bytes]:
    """`T`, the phase as one digit (see bench/handlers.py), a counter: distinct payloads."""
    for i in range(n):
        yield (b"T%d%08d" % (phase, i)).ljust(size, b"x")


def fill(
    client: redis.Redis,
    key: str,
    n: int,
    phase: int = 0,
    size: int = PAYLOAD_SIZE,
    right: bool = False,
) -> None:
    """Push n distinct `size`-byte payloads, oldest at the right (where consumers take);
    with `right`, onto the right end: ahead of whatever the list already holds.

    Sent in pipelines of at most ~16 MB: a batch of 1 MB payloads is not held twice over
    in this process's memory."""
    chunk: list[bytes] = []
    pipe = client.pipeline(transaction=False)
    per_command = max(1, min(1000, (1 << 20) // size))
    held = 0
    for payload in throughput_payloads(n, phase, size):
        chunk.append(payload)
        if len(chunk) == per_command:
            (pipe.rpush if right else pipe.lpush)(key, *chunk)
            chunk = []
            held += per_command * size
            if held >= 16 << 20:
                pipe.execute()
                held = 0
    if chunk:
        (pipe.rpush if right else pipe.lpush)(key, *chunk)
    pipe.execute()


def paced_produce(client: redis.Redis, rate: float, seconds: float) -> int:
    """LPUSH stamped messages at `rate` per second for `seconds`; all due ones in one LPUSH."""
    total = max(1, int(rate * seconds))
    start = time.perf_counter()
    sent = 0
    while sent < total:
        elapsed = time.perf_counter() - start
        due = min(total, int(elapsed * rate) + 1)
        if due > sent:
            now = time.time()
            batch = [
                (b"L%17.6f|%09d" % (now, i)).ljust(PAYLOAD_SIZE, b"x") for i in range(sent, due)
            ]
            client.lpush(QUEUE, *batch)
            sent = due
        else:
            time.sleep(max(0.0, min(0.0005, sent / rate - elapsed)))
    return sent


# -- CPU and memory -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """On-CPU time of a process's live threads, in nanosecond resolution from schedstat.

    psutil's cpu_times counts clock ticks (10 ms): too coarse for an idle process over 10 s.
    """
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle, over all cores."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class MemorySampler:
    """Peak RSS and USS of a set of processes, sampled every `interval` seconds in a thread.

    `memory_full_info` reads /proc/PID/smaps, a few milliseconds per process, so the
    interval is kept long: the sampler must not eat the CPU it is measuring. With `tree`,
    the pids are those of `tree` and its descendants, listed again at every sample: a
    peer's supervisor forks its workers after it starts.
    """

    def __init__(self, pids: list[int], interval: float = 0.5, tree: int | None = None) -> None:
        self.pids = pids
        self.tree = tree
        self.interval = interval
        self.peak_rss: dict[int, int] = {}
        self.peak_uss: dict[int, int] = {}
        self.peak_pss: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        if self.tree is not None:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.tree)
                self.pids = [self.tree, *(c.pid for c in root.children(recursive=True))]
        for pid in self.pids:
            try:
                info = psutil.Process(pid).memory_full_info()
            except psutil.Error:
                continue
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), int(info.rss))
            self.peak_uss[pid] = max(self.peak_uss.get(pid, 0), int(info.uss))
            self.peak_pss[pid] = max(self.peak_pss.get(pid, 0), int(getattr(info, "pss", 0)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- results --------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    case: str
    n: int = 0
    rate: float | None = None  # messages or jobs per second
    vs: str | None = None  # key of the yardstick this row is compared with
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_per_100k: float | None = None  # CPU seconds, manager + workers
    redis_core: float | None = None  # redis-server CPU / wall time over the run
    busy_cores: float | None = None  # whole machine, over the run
    note: str = ""


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    sizes: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    yardsticks: dict[str, float] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    respawn: dict[str, list[float]] = field(default_factory=dict)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)
    load: dict[str, list[float]] = field(default_factory=dict)
    paired: dict[str, list[float]] = field(default_factory=dict)  # target -> ratio per round


@dataclass(frozen=True)
class Sizes:
    fast: int  # messages per 0 ms case
    slow: int  # messages per 1 ms case
    peer: int  # jobs per peer run
    rq_fork: int  # jobs for RQ's forking worker
    latency_seconds: float
    idle_seconds: float
    respawn_repeats: int
    respawn_queue: int
    prefetches: tuple[int, ...] = (1, 10, 100)
    repeats: int = 3  # throughput phases per rqworkers case and runs per yardstick: medians
    roundtrip: int = 20_000  # Executor tasks per round-trip throughput phase
    roundtrip_peer: int = 2_000  # the same for a peer with results
    roundtrip_latency: int = 1_000  # tasks run one at a time for p50/p99 (peers: half)


def sizes_for(messages: int | None, quick: bool, repeats: int | None = None) -> Sizes:
    sizes = _sizes_for(messages, quick)
    return sizes if repeats is None else replace(sizes, repeats=repeats)


def _sizes_for(messages: int | None, quick: bool) -> Sizes:
    if quick:
        fast = messages or 5_000
        return Sizes(
            fast,
            max(100, fast // 20),
            max(200, fast // 10),
            max(100, fast // 50),
            latency_seconds=0.5,
            idle_seconds=1.0,
            respawn_repeats=1,
            respawn_queue=1_000,
            prefetches=(1, 100),  # prefetch 10 only in full runs: the smoke run stays < 60 s
            repeats=1,
            roundtrip=2_000,
            roundtrip_peer=200,
            roundtrip_latency=200,
        )
    fast = messages or 100_000
    return Sizes(
        fast,
        max(500, fast // 40),
        max(1_000, fast // 10),
        max(500, fast // 50),
        latency_seconds=3.0,
        idle_seconds=10.0,
        respawn_repeats=3,
        respawn_queue=3_000,
    )


@dataclass(frozen=True)
class YardstickDrain:
    rate: float  # messages per second, over the union of the processes' runs
    cpu: float  # CPU seconds the yardstick processes spent over their runs, all together


def run_yardsticks(
    client: redis.Redis,
    url: str,
    mode: str,
    n: int,
    processes: int,
    sleep_ms: int = 0,
    before_go: Callable[[], object] | None = None,
    burn_us: float = 0.0,
) -> YardstickDrain:
    """`processes` runs of `bench.yardsticks` sharing the n messages already on QUEUE, started
    at one signal (`before_go` is called just before it), each handler burning `burn_us` of
    CPU a message. Returns once every one of them has exited."""
    client.delete("bench:go", "bench:go:ready")
    args = [sys.executable, "-m", "bench.yardsticks", "--url", url]
    args += ["--queue", QUEUE, "--mode", mode, "--n", str(n), "--go", "bench:go"]
    args += ["--sleep", str(sleep_ms / 1000), "--burn", str(burn_us)]
    runs = [
        subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(processes)
    ]
    try:
        wait_for(
            lambda: client.llen("bench:go:ready") == processes,
            timeout=60,
            what="the yardstick processes to connect",
        )
        if before_go is not None:
            before_go()
        client.lpush("bench:go", *["go"] * processes)
        results = []
        for run in runs:
            out, err = run.communicate(timeout=900)
            if run.returncode:
                raise RuntimeError(f"yardstick {mode} failed: {err.decode()[-2000:]}")
            results.append(json.loads(out))
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    handled = sum(r["handled"] for r in results)
    if handled != n or any(r["left"] for r in results):
        raise RuntimeError(f"yardstick {mode} x{processes} handled {results}")
    began = min(r["began"] for r in results)
    ended = max(r["ended"] for r in results)
    return YardstickDrain(n / (ended - began), sum(r["cpu"] for r in results))


# -- the bench ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, procs: Processes) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = procs
        self.sizes = sizes_for(args.messages, args.quick, args.repeat)
        self.report = Report(command=" ".join(["python -m bench.throughput", *sys.argv[1:]]))
        self.report.sizes = asdict(self.sizes)
        self.redis = start_redis(procs, workdir)
        self.client = self.redis.client()
        self.peers_python = args.peers_python

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> None:
        self.report.rows.append(row)
        rate = f"{row.rate:,.0f}/s" if row.rate else "-"
        self.log(f"  {row.section}: {row.case}: {rate} {row.note}".rstrip())

    def run(self) -> Report:
        self.report.machine = machine_info(self.redis.binary)
        for section in (
            self.raw_redis,
            self.yardsticks,
            self.paired,
            self.rqworkers,
            self.resources_idle_python,
            self.respawn,
            self.peers,
            self.executor,
        ):
            if self.args.only and section.__name__ not in self.args.only:
                continue
            # Other work on the machine skews every figure: say how busy it was.
            self.report.load[section.__name__] = list(os.getloadavg())
            section()
        self.report.load["end"] = list(os.getloadavg())
        self.report.targets = judge(self.report)
        return self.report

    # -- 1. raw Redis --------------------------------------------------------------------

    def raw_redis(self) -> None:
        self.log("redis-benchmark")
        binary = Path(self.redis.binary).with_name("redis-benchmark")
        found = str(binary) if binary.exists() else shutil.which("redis-benchmark")
        n = self.sizes.fast
        for clients in (1, 50):
            for command in ("LPUSH", "LMOVE"):
                case = f"{command}, {clients} client{'s' if clients > 1 else ''}"
                if found is None:
                    self.add(Row("redis-benchmark", case, n, note="not run: no redis-benchmark"))
                    continue
                self.client.flushdb()
                args = [found, "-h", HOST, "-p", str(self.redis.port), "-n", str(n)]
                args += ["-c", str(clients), "--csv"]
                if command == "LPUSH":
                    args += ["-d", str(PAYLOAD_SIZE), "-t", "lpush"]
                else:
                    fill(self.client, "bench:a", n)
                    args += ["LMOVE", "bench:a", "bench:b", "RIGHT", "LEFT"]
                out = subprocess.run(args, capture_output=True, text=True, timeout=600)
                rate = parse_benchmark_csv(out.stdout)
                note = "" if rate else f"not run: {out.stderr.strip()[:80]}"
                self.add(Row("redis-benchmark", case, n, rate, vs="a0", note=note))

    # -- 2. yardsticks -------------------------------------------------------------------

    def yardsticks(self) -> None:
        self.log("yardsticks")
        labels = {
            "a": "(a) BLMOVE + LREM, one at a time",
            "b": "(b) ack + next fetch, one pipeline",
            "c": "(c) Lua: 100 LMOVEs, one LTRIM ack",
        }
        for sleep_ms, n in ((0, self.sizes.fast), (1, self.sizes.slow)):
            rates: dict[str, list[float]] = {mode: [] for mode in labels}
            for _ in range(self.sizes.repeats):
                for mode in labels:  # interleaved, so a slow minute hits all three alike
                    rates[mode].append(self.yardstick(mode, n, sleep_ms))
            for mode, label in labels.items():
                rate = statistics.median(rates[mode])
                self.report.yardsticks[f"{mode}{sleep_ms}"] = rate
                row = Row("yardstick", f"{label}, {sleep_ms} ms", n, rate, vs=f"a{sleep_ms}")
                row.note = spread(rates[mode])
                self.add(row)
        # What two processes of the batched yardstick reach on this machine: the ceiling a
        # 2-process rqworkers pair is up against, Redis sharing the same cores.
        n = self.sizes.fast
        two = [self.yardsticks_together("c", n, 2) for _ in range(self.sizes.repeats)]
        rate = statistics.median(two)
        self.report.yardsticks["c0x2"] = rate
        row = Row("yardstick", f"{labels['c']}, 0 ms, 2 proc", n, rate, vs="c0")
        row.note = spread(two)
        self.add(row)

    def yardstick(self, mode: str, n: int, sleep_ms: int) -> float:
        """One run of `bench.yardsticks` in its own process on n pre-filled messages."""
        return self.yardsticks_together(mode, n, 1, sleep_ms)

    def yardsticks_together(self, mode: str, n: int, processes: int, sleep_ms: int = 0) -> float:
        """`processes` runs of `bench.yardsticks` sharing n pre-filled messages, started at
        one signal; the rate is over the union of their runs."""
        self.client.flushdb()
        fill(self.client, QUEUE, n)
        return run_yardsticks(self.client, self.redis.url, mode, n, processes, sleep_ms).rate

    # -- 2b. the issue-8 ratios, paired ---------------------------------------------------

    def paired(self) -> None:
        """Each ratio target measured as pairs of runs back to back, round after round.

        This VM's speed drifts by tens of percent within minutes, and the sections above
        run all the yardsticks first and rqworkers minutes later: a ratio of two medians
        taken apart measures the drift too. Here each round runs both sides of every ratio
        within seconds of each other, and the figure is the median of the rounds' ratios.
        Every rqworkers run is a fresh start of the service, measured as in section 3.
        """
        self.log("paired ratios")
        n = self.sizes.fast
        n1 = max(10_000, n // 10)  # prefetch 1 runs 30-50x slower than prefetch 100

        def service(prefetch: int, processes: int, messages: int) -> float:
            row = ServiceRun(self, prefetch, processes, 0).measure(messages, 1, 0.0, False, 0.0)
            if not row.rate or row.rate <= 0 or "MISMATCH" in row.note:
                raise RuntimeError(f"prefetch {prefetch}, {processes} proc: {row.note}")
            return row.rate

        ratios: dict[str, list[float]] = {name: [] for name in PAIRED}
        for _ in range(self.sizes.repeats):
            b = self.yardstick("b", n1, 0)
            ratios["prefetch 1 / (b)"].append(service(1, 1, n1) / b)
            c = self.yardstick("c", n, 0)
            one = service(100, 1, n)
            ratios["prefetch 100 / (c)"].append(one / c)
            ratios["prefetch 100, 2 proc / 1 proc"].append(service(100, 2, n) / one)
            ratios["yardstick (c), 2 proc / 1 proc"].append(self.yardsticks_together("c", n, 2) / c)
        self.report.paired = ratios
        for name, values in ratios.items():
            shown = ", ".join(f"{r:.2f}" for r in values)
            self.log(f"  paired: {name}: median {statistics.median(values):.2f}x ({shown})")

    # -- 3. rqworkers --------------------------------------------------------------------

    def rqworkers(self) -> None:
        self.log("rqworkers")
        for sleep_ms, n in ((0, self.sizes.fast), (1, self.sizes.slow)):
            for processes in (1, 2):
                for prefetch in self.sizes.prefetches:
                    resources = prefetch == 1 and sleep_ms == 0
                    idle = self.sizes.idle_seconds if resources and processes == 1 else 0.0
                    run = ServiceRun(self, prefetch, processes, sleep_ms)
                    row = run.measure(
                        n, self.sizes.repeats, self.sizes.latency_seconds, resources, idle
                    )
                    vs = {1: "b", 100: "c"}.get(prefetch, "a")
                    row.vs = f"{vs}{sleep_ms}"
                    self.add(row)
                    if resources:
                        self.report.resources[f"prefetch 1, {processes} process(es)"] = (
                            run.resources
                        )

    def resources_idle_python(self) -> None:
        """USS of a python that imported redis and sleeps: what a worker is compared with."""
        proc = self.procs.start([sys.executable, "-c", "import redis, time; time.sleep(30)"])
        try:
            ps = psutil.Process(proc.pid)
            time.sleep(1.0)
            wait_for(lambda: ps.cpu_times().user + ps.cpu_times().system > 0, 10, "python start")
            previous = -1.0
            while True:  # until its import is over: CPU time stops moving
                now = sum(ps.cpu_times()[:2])
                if now == previous:
                    break
                previous = now
                time.sleep(0.3)
            info = ps.memory_full_info()
            self.report.resources["idle python + import redis"] = {
                "rss_mb": info.rss / 1e6,
                "pss_mb": getattr(info, "pss", 0) / 1e6,
                "uss_mb": info.uss / 1e6,
            }
        finally:
            self.procs.stop(proc, timeout=0)

    # -- 7. respawn ----------------------------------------------------------------------

    def respawn(self) -> None:
        self.log("respawn")
        for prefetch in (1, 100):
            times: list[float] = []
            for _ in range(self.sizes.respawn_repeats):
                run = ServiceRun(self, prefetch, 1, 1)  # 1 ms: the queue outlives the kill
                times.append(run.respawn(self.sizes.respawn_queue))
            self.report.respawn[f"prefetch {prefetch}"] = times
            shown = ", ".join(f"{t * 1000:.0f} ms" for t in times)
            self.log(f"  respawn, prefetch {prefetch}: {shown}")

    # -- 4. peers ------------------------------------------------------------------------

    def peers(self) -> None:
        self.log(f"peers (python: {self.peers_python})")
        s = self.sizes
        url = self.redis.url
        rq = f"-m rq.cli worker --burst --logging_level WARNING --url {url}"
        celery = "-m celery -A bench.peers.celery_app worker --pool solo --concurrency 1 -Q bench"
        celery += " --loglevel WARNING --without-gossip --without-mingle --without-heartbeat"
        dramatiq = "-m dramatiq bench.peers.dramatiq_app --processes 1 --threads 1"
        arq = "-m bench.peers.arq_app"
        tuned = {"BENCH_ARQ_POLL_DELAY": "0"}
        # package, system (for the enqueuer), label, N, worker arguments, extra environment
        cases: list[tuple[str, str, str, int, str, dict[str, str]]] = [
            ("rq", "rq", "RQ Worker (forks per job), rq worker --burst", s.rq_fork,
             f"{rq} bench", {}),
            ("rq", "rq-simple", "RQ SimpleWorker, rq worker --burst", s.peer,
             f"{rq} -w rq.worker.SimpleWorker bench", {}),
            ("celery", "celery", "Celery, solo pool, acks_late", s.peer, celery, {}),
            ("dramatiq", "dramatiq", "Dramatiq, 1 process, 1 thread", s.peer, dramatiq, {}),
            ("arq", "arq", "arq, defaults (max_jobs 10, poll_delay 0.5 s)", s.peer, arq, {}),
            ("arq", "arq", "arq, poll_delay 0 (tuned)", s.peer, arq, tuned),
        ]  # fmt: skip
        versions: dict[str, str] = {}
        for package, system, label, n, worker_args, extra_env in cases:
            if package not in versions:
                versions[package] = self.peer_version(package)
            version = versions[package]
            if version.startswith("not run"):
                self.add(Row("peer", label, n, note=version))
                continue
            try:
                rate = self.run_peer(system, n, worker_args.split(), extra_env)
            except Exception as exc:  # a peer that fails is reported, the bench goes on
                self.add(Row("peer", label, n, note=f"not run: {exc}"[:160]))
                continue
            note = f"{package} {version}" + (
                ", +1 round trip/job to time it" if system == "rq" else ""
            )
            self.add(Row("peer", label, n, rate, vs="a0", note=note))

    def peer_version(self, package: str) -> str:
        code = f"import importlib.metadata as m, {package}; print(m.version({package!r}))"
        try:
            out = subprocess.run(
                [self.peers_python, "-c", code], capture_output=True, text=True, timeout=60
            )
        except OSError as exc:
            return f"not run: {exc}"
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            return f"not run: {package} cannot be imported by {self.peers_python}: {last}"
        return out.stdout.strip()

    def run_peer(
        self,
        system: str,
        n: int,
        worker_args: list[str],
        extra: dict[str, str],
        job: str = "noop",
        sampler: MemorySampler | None = None,
    ) -> float:
        """Jobs/s of one peer worker on n jobs enqueued first. With `sampler` (its pids
        unset), the worker's process tree is sampled for memory while it runs."""
        self.client.flushdb()
        env = bench_env(self.redis.url) | {"BENCH_EXPECT": str(n)} | extra
        enqueue = [self.peers_python, "-m", "bench.peers", "enqueue", system, str(n)]
        enqueue += ["--job", job]
        out = subprocess.run(
            enqueue, cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
        if out.returncode:
            raise RuntimeError(f"enqueue failed: {out.stderr.strip().splitlines()[-1:]}")
        log = self.workdir / f"peer-{system}.log"
        proc = self.procs.start([self.peers_python, *worker_args], env=env, log=log)
        try:

            def done() -> bool:
                if (
                    proc.poll() is not None
                    and int(self.client.hget("bench:peer", "count") or 0) < n
                ):
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"worker exited {proc.returncode}: {' | '.join(tail)}")
                return int(self.client.hget("bench:peer", "count") or 0) >= n

            if sampler is not None:
                sampler.tree = proc.pid
            with sampler or contextlib.nullcontext():
                wait_for(
                    done, timeout=max(120.0, n / 20), what=f"{system} to run {n} jobs",
                    interval=0.05,
                )  # fmt: skip
            first = float(self.client.hget("bench:peer", "first") or 0)
            last = float(self.client.hget("bench:peer", "last") or 0)
        finally:
            self.procs.stop(proc, timeout=10)
        return n / (last - first)

    # -- 8. Executor round trips ----------------------------------------------------------

    def executor(self) -> None:
        """Tasks with results: submit → worker → reply → future, the rqworkers Executor beside
        `ProcessPoolExecutor` (one machine, no Redis) and the peers with their result stores.

        Rate: N tasks sent by `map`, until the last result is in. Latency: tasks one at a
        time, submit to result, so p50/p99 are of a round trip, not of a backlog.
        """
        self.log("executor round trips")
        s = self.sizes
        for prefetch, processes in ((1, 1), (100, 1), (100, 2)):
            run = ServiceRun(self, prefetch, processes, 0, work='tasks = ["bench.tasks:*"]')
            with run.service():
                rate, trips = executor_roundtrip(self.redis.url, s.roundtrip, s.roundtrip_latency,
                                                 s.repeats)  # fmt: skip
            row = Row("executor", f"rqworkers Executor, prefetch {prefetch}, {processes} proc",
                      s.roundtrip, rate, note=f"{spread_of(trips)}")  # fmt: skip
            row.p50_ms, row.p99_ms = percentiles(trips)
            self.add(row)
        rate, trips = pool_roundtrip(s.roundtrip, s.roundtrip_latency)
        row = Row("executor", "ProcessPoolExecutor(1), no Redis", s.roundtrip, rate,
                  note="the program before the one-line change")  # fmt: skip
        row.p50_ms, row.p99_ms = percentiles(trips)
        self.add(row)
        url = self.redis.url
        celery = "-m celery -A bench.peers.celery_results_app worker --pool solo --concurrency 1"
        celery += " -Q bench-rt --loglevel WARNING --without-gossip --without-mingle"
        celery += " --without-heartbeat"
        rq = f"-m rq.cli worker -w rq.worker.SimpleWorker --logging_level WARNING --url {url}"
        rq += " bench-rt"
        dramatiq = "-m dramatiq bench.peers.dramatiq_results_app --processes 1 --threads 1"
        cases = [
            ("celery", "Celery, solo pool, Redis result backend", celery),
            ("rq", "RQ SimpleWorker, results (latest_result)", rq),
            ("dramatiq", "Dramatiq, 1 process, 1 thread, Results", dramatiq),
        ]
        for package, label, worker_args in cases:
            version = self.peer_version(package)
            if version.startswith("not run"):
                self.add(Row("executor peer", label, s.roundtrip_peer, note=version))
                continue
            try:
                found = self.peer_roundtrip(package, worker_args.split())
            except Exception as exc:  # a peer that fails is reported, the bench goes on
                self.add(
                    Row("executor peer", label, s.roundtrip_peer, note=f"not run: {exc}"[:160])
                )
                continue
            row = Row("executor peer", label, s.roundtrip_peer, found["rate"],
                      note=f"{package} {version}")  # fmt: skip
            row.p50_ms, row.p99_ms = found["p50_ms"], found["p99_ms"]
            self.add(row)

    def peer_roundtrip(self, system: str, worker_args: list[str]) -> dict[str, float]:
        self.client.flushdb()
        env = bench_env(self.redis.url)
        log = self.workdir / f"peer-rt-{system}.log"
        worker = self.procs.start([self.peers_python, *worker_args], env=env, log=log)
        try:
            n, m = self.sizes.roundtrip_peer, max(50, self.sizes.roundtrip_latency // 2)
            args = [self.peers_python, "-m", "bench.peers", "roundtrip", system, str(n), str(m)]
            out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=900)  # fmt: skip
            if out.returncode:
                tail = (out.stderr.strip().splitlines() or ["?"])[-1]
                raise RuntimeError(f"round trips failed: {tail}")
            return cast(dict[str, float], json.loads(out.stdout))
        finally:
            self.procs.stop(worker, timeout=10)


def executor_roundtrip(url: str, n: int, m: int, repeats: int) -> tuple[float, list[float]]:
    """The median rate of `repeats` maps of N, and M single round trips in ms."""
    from bench.tasks import echo
    from rqworkers import Executor

    with Executor(url, QUEUE) as executor:
        return _roundtrip(executor, echo, n, m, repeats)


def pool_roundtrip(n: int, m: int) -> tuple[float, list[float]]:
    """The same with `concurrent.futures.ProcessPoolExecutor(1)`: the program as it was."""
    from concurrent.futures import ProcessPoolExecutor

    from bench.tasks import echo

    with ProcessPoolExecutor(1) as executor:
        return _roundtrip(executor, echo, n, m, 1)


def _roundtrip(executor: Any, fn: Any, n: int, m: int, repeats: int) -> tuple[float, list[float]]:
    if executor.submit(fn, -1).result(timeout=60) != -1:  # warm up
        raise RuntimeError("echo returned something else")
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = list(executor.map(fn, range(n), timeout=900))
        rates.append(n / (time.perf_counter() - started))
        if results != list(range(n)):
            raise RuntimeError("results do not match the arguments")
    trips = []
    for i in range(m):
        one = time.perf_counter()
        executor.submit(fn, i).result(timeout=60)
        trips.append((time.perf_counter() - one) * 1000)
    return statistics.median(rates), trips


def percentiles(trips_ms: list[float]) -> tuple[float, float]:
    """p50 and p99 of round trips, in ms."""
    return statistics.median(trips_ms), statistics.quantiles(trips_ms, n=100)[98]


def spread_of(trips_ms: list[float]) -> str:
    return f"{len(trips_ms)} single trips, max {max(trips_ms):.2f} ms"


def no_message_logs() -> str:
    """The setting that turns per-message log lines off, in this version of the config."""
    from rqworkers.config import LoggingSettings

    fields = LoggingSettings.model_fields
    if "messages" in fields:
        return "messages = false"
    if "handled" in fields:
        return "handled = 0.0"
    return ""


def spread(rates: list[float]) -> str:
    """`median of 3: 8,100..9,900/s`: how far apart the repeats of one figure were."""
    if len(rates) < 2:
        return "1 run"
    return f"median of {len(rates)}: {min(rates):,.0f}..{max(rates):,.0f}/s"


def bench_env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["BENCH_REDIS_URL"] = url
    return env


def phase_results(
    client: redis.Redis, starts: list[float], n: int
) -> tuple[list[int], list[float], list[int]]:
    """What the bench handlers wrote at teardown (bench/handlers.py): the pids of the
    workers that handled anything, and per phase (`starts[phase]` its RENAME time) the rate
    n / (its last handler return - its start) and how many messages it handled."""
    first_calls = {int(k): float(v) for k, v in client.hgetall("bench:first").items()}
    workers = sorted(first_calls)
    stats = [client.hgetall(f"bench:stats:{pid}") for pid in workers]
    rates: list[float] = []
    counts: list[int] = []
    for phase, t0 in enumerate(starts):
        tag = str(phase).encode()
        last = max((float(st.get(tag + b":last", 0)) for st in stats), default=0.0)
        counts.append(sum(int(st.get(tag + b":count", 0)) for st in stats))
        rates.append(n / (last - t0) if last > t0 else 0.0)
    return workers, rates, counts


def parse_benchmark_csv(text: str) -> float | None:
    """The requests per second of the last line of `redis-benchmark --csv`."""
    for line in reversed(text.strip().splitlines()):
        cells = [c.strip('"') for c in line.split('","')]
        if len(cells) >= 2:
            with contextlib.suppress(ValueError):
                return float(cells[1])
    return None


class ServiceRun:
    """One start of the real `python -m rqworkers run`, measured and stopped."""

    def __init__(
        self, bench: Bench, prefetch: int, processes: int, sleep_ms: int, work: str = ""
    ) -> None:
        self.bench = bench
        self.work = work  # the pair's handler line; default: the no-op or 1 ms handler
        self.prefetch = prefetch
        self.processes = processes
        self.sleep_ms = sleep_ms
        self.client = bench.client
        self.resources: dict[str, Any] = {}
        self.name = f"p{prefetch}-x{processes}-{sleep_ms}ms" + ("-tasks" if work else "")

    @property
    def worker_keys(self) -> list[str]:
        """Where the workers hold messages: private lists, and the landing lists a
        blocking fetch fills (a message there is not handled yet either)."""
        ids = [f"{NODE}:{i}" for i in range(1, self.processes + 1)]
        return [f"{QUEUE}:{kind}:{worker}" for worker in ids for kind in ("processing", "landing")]

    def config(self) -> Path:
        handler = "bench.handlers:Noop" if self.sleep_ms == 0 else "bench.handlers:Sleep1ms"
        work = self.work or f'handler = "{handler}"'
        path = self.bench.workdir / f"rqworkers-{self.name}.toml"
        path.write_text(
            f"""
[manager]
check_interval = 1.0
shutdown_timeout = 20.0
node = "{NODE}"

[logging]
level = "INFO"
{no_message_logs()}

[hosts]
bench = "{self.bench.redis.url}"

[defaults]
max_requests = 0
soft_memory_limit = 0
hard_memory_limit = 0
timeout = 30.0

[[workers]]
host = "bench"
queue = "{QUEUE}"
{work}
processes = {self.processes}
prefetch = {self.prefetch}
"""
        )
        return path

    @contextlib.contextmanager
    def service(self) -> Iterator[subprocess.Popen[bytes]]:
        """Start rqworkers and wait until every worker blocks in BLMOVE on the empty queue."""
        args = [sys.executable, "-m", "rqworkers", "run", "--config", str(self.config())]
        log = self.bench.workdir / f"rqworkers-{self.name}.log"
        proc = self.bench.procs.start(args, env=bench_env(self.bench.redis.url), log=log)
        try:

            def ready() -> bool:
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                    raise RuntimeError(f"rqworkers exited {proc.returncode}: {' | '.join(tail)}")
                clients = self.client.client_list()
                return sum(1 for c in clients if c.get("cmd") == "blmove") >= self.processes

            wait_for(ready, timeout=30, what="rqworkers workers to block in BLMOVE")
            yield proc
        finally:
            self.bench.procs.stop(proc)

    def drained(self) -> bool:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(QUEUE)
        for key in self.worker_keys:
            pipe.llen(key)
        return not any(pipe.execute())

    def measure(
        self, n: int, repeats: int, latency_seconds: float, resources: bool, idle: float
    ) -> Row:
        """`repeats` throughput phases of n messages, a latency phase, an optional idle phase.

        The service starts once; each phase's messages are pushed onto the staging list
        while the workers wait, then RENAMEd onto the queue. The rate reported is the
        median of the phases: this machine's speed wanders by tens of percent from one
        run to the next, so one sample would say as much about the machine as about us.
        """
        self.client.flushdb()
        busy: dict[int, float] = {}
        walls: list[float] = []
        starts: list[float] = []
        redis_busy = machine = 0.0
        sampler: MemorySampler | None = None
        with self.service() as proc:
            manager = psutil.Process(proc.pid)
            children = [c.pid for c in manager.children()]
            pids = [proc.pid, *children]
            if resources:
                sampler = MemorySampler(pids).__enter__()
            for phase in range(repeats):
                fill(self.client, STAGING, n, phase)
                before = {pid: cpu_seconds(pid) or 0.0 for pid in pids}
                redis_before = cpu_seconds(self.bench.redis.process.pid) or 0.0
                machine_before = machine_busy()
                t0 = time.time()
                self.client.rename(STAGING, QUEUE)
                timeout = 120 + n / 100
                wait_for(self.drained, timeout, what="the queue to drain", interval=0.02)
                t_drained = time.time()
                for pid in pids:
                    spent = (cpu_seconds(pid) or before[pid]) - before[pid]
                    busy[pid] = busy.get(pid, 0.0) + spent
                redis_busy += (cpu_seconds(self.bench.redis.process.pid) or 0.0) - redis_before
                machine += machine_busy() - machine_before
                starts.append(t0)
                walls.append(t_drained - t0)
            if sampler is not None:
                sampler.__exit__()
            latency_rate = 0.5 * n / statistics.median(walls)
            sent = paced_produce(self.client, latency_rate, latency_seconds)
            wait_for(self.drained, timeout=60, what="the latency messages to drain")
            idle_cpu: dict[int, float] = {}
            if idle:
                time.sleep(0.5)
                start = {pid: cpu_seconds(pid) or 0.0 for pid in pids}
                time.sleep(idle)
                idle_cpu = {pid: ((cpu_seconds(pid) or 0.0) - start[pid]) / idle for pid in pids}
        workers, rates, counts = phase_results(self.client, starts, n)
        first_calls = set(workers)
        handled = sum(counts)
        latencies = array("d")
        for pid in workers:
            latencies.frombytes(cast(bytes, self.client.get(f"bench:latency:{pid}") or b""))
        p50 = p99 = None
        if len(latencies) >= 2:
            cuts = statistics.quantiles(latencies, n=100, method="inclusive")
            p50, p99 = cuts[49] * 1000, cuts[98] * 1000
        total = n * repeats
        worker_cpu = sum(busy.get(pid, 0.0) for pid in workers)
        keepers = [pid for pid in children if pid not in first_calls]
        cpu_100k = (busy[proc.pid] + worker_cpu) / total * 100_000
        note = spread(rates) + f"; latency: {sent:,} msgs at {latency_rate:,.0f}/s"
        if handled != total or len(latencies) != sent:
            note += (
                f"; COUNT MISMATCH: handled {handled}/{total}, latencies {len(latencies)}/{sent}"
            )
        if sampler is not None:

            def memory(pid: int) -> dict[str, float]:
                return {
                    "peak_rss_mb": sampler.peak_rss.get(pid, 0) / 1e6,
                    "peak_pss_mb": sampler.peak_pss.get(pid, 0) / 1e6,
                    "peak_uss_mb": sampler.peak_uss.get(pid, 0) / 1e6,
                }

            self.resources = {
                "manager": memory(proc.pid),
                "workers": [memory(pid) for pid in workers],
                "keeper": [memory(pid) for pid in keepers],
                "cpu_s_per_100k": {
                    "manager": busy[proc.pid] / total * 100_000,
                    "workers": worker_cpu / total * 100_000,
                    "keeper": sum(busy.get(p, 0.0) for p in keepers) / total * 100_000,
                },
                "messages": total,
            }
            if idle_cpu:
                self.resources["idle_core_percent"] = {
                    "seconds": idle,
                    "manager": idle_cpu[proc.pid] * 100,
                    "workers": [idle_cpu[pid] * 100 for pid in workers],
                    "keeper": [idle_cpu[pid] * 100 for pid in keepers],
                }
        return Row(
            "rqworkers",
            f"prefetch {self.prefetch}, {self.processes} proc, {self.sleep_ms} ms",
            n,
            statistics.median(rates),
            p50_ms=p50,
            p99_ms=p99,
            cpu_per_100k=cpu_100k,
            redis_core=redis_busy / sum(walls),
            busy_cores=machine / sum(walls),
            note=note,
        )

    def respawn(self, queue_size: int) -> float:
        """SIGKILL the worker mid-queue; seconds until its replacement's first handled message."""
        self.client.flushdb()
        fill(self.client, STAGING, queue_size)
        with self.service():
            self.client.rename(STAGING, QUEUE)
            first = wait_for(lambda: self.client.hgetall("bench:first"), 10, "a first message")
            victim = int(next(iter(first)))
            time.sleep(0.2)
            if not self.client.llen(QUEUE):
                raise RuntimeError("the queue drained before the kill: raise respawn_queue")
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)

            def replacement() -> float | None:
                calls = self.client.hgetall("bench:first")
                new = [float(v) for k, v in calls.items() if int(k) != victim]
                return new[0] if new else None

            handled_at = wait_for(replacement, 10, "the replacement's first message", 0.002)
        return handled_at - killed_at


# -- judging and printing -------------------------------------------------------------------


def judge(report: Report) -> list[tuple[str, bool | None, str]]:
    """Each target with met (True), missed (False) or not measurable (None), and the numbers."""
    y = report.yardsticks
    rq = {r.case: r for r in report.rows if r.section == "rqworkers" and r.rate}
    peers = [r for r in report.rows if r.section == "peer" and r.rate]
    out: list[tuple[str, bool | None, str]] = []

    def rate(case: str) -> float | None:
        row = rq.get(case)
        return row.rate if row else None

    p1, p100 = rate("prefetch 1, 1 proc, 0 ms"), rate("prefetch 100, 1 proc, 0 ms")
    if p1 and "b0" in y:
        r = p1 / y["b0"]
        out.append(("prefetch 1 >= 0.9 x (b)", r >= 0.9, f"{p1:,.0f} vs {y['b0']:,.0f}: {r:.2f}x"))
    if p100 and "c0" in y:
        r = p100 / y["c0"]
        out.append(
            ("prefetch 100 >= 0.5 x (c)", r >= 0.5, f"{p100:,.0f} vs {y['c0']:,.0f}: {r:.2f}x")
        )
    for peer in peers:
        assert peer.rate
        if p100:
            r = p100 / peer.rate
            out.append((f">= 10x {peer.case} at prefetch 100", r >= 10, f"{r:.1f}x"))
        if p1:
            r = p1 / peer.rate
            out.append((f"ahead of {peer.case} at prefetch 1", r > 1, f"{r:.1f}x"))
    for sleep_ms in (0, 1):
        for prefetch in (1, 10, 100):
            one = rq.get(f"prefetch {prefetch}, 1 proc, {sleep_ms} ms")
            two = rq.get(f"prefetch {prefetch}, 2 proc, {sleep_ms} ms")
            if one and two and one.rate and two.rate:
                r = two.rate / one.rate
                detail = (
                    f"{r:.2f}x; Redis {two.redis_core or 0:.0%} of a core, "
                    f"machine {two.busy_cores or 0:.2f} of 2 cores busy"
                )
                out.append(
                    (
                        f"2 processes >= 1.6 x 1 (prefetch {prefetch}, {sleep_ms} ms)",
                        r >= 1.6,
                        detail,
                    )
                )
    single, double = rate("prefetch 100, 1 proc, 0 ms"), rate("prefetch 100, 2 proc, 0 ms")
    if single and double:  # issue 8 asks more of prefetch 100 than the 1.6x above
        r = double / single
        detail = f"{r:.2f}x"
        if "c0" in y and "c0x2" in y:  # the same ratio of the yardstick, for context
            detail += f"; yardstick (c) with 2 processes: {y['c0x2'] / y['c0']:.2f}x"
        out.append(("2 processes >= 1.8 x 1 (prefetch 100, 0 ms; issue 8)", r >= 1.8, detail))
    for name, values in report.paired.items():
        least = PAIRED.get(name)
        median = statistics.median(values)
        shown = f"median {median:.2f}x of {len(values)} rounds: " + ", ".join(
            f"{r:.2f}" for r in values
        )
        met = None if least is None else median >= least
        out.append((f"paired: {name}" + (f" >= {least}" if least else ""), met, shown))
    trips = {r.case: r for r in report.rows if r.section == "executor" and r.rate}
    trip_peers = [r for r in report.rows if r.section == "executor peer" and r.rate]
    best = max(trip_peers, key=lambda r: r.rate or 0.0, default=None)
    for case, row in trips.items():
        if case.startswith("rqworkers") and row.rate and best and best.rate:
            r = row.rate / best.rate
            what = f"{case}: round trips >= 10x the best peer ({best.case})"
            out.append((what, r >= 10, f"{row.rate:,.0f} vs {best.rate:,.0f}/s: {r:.1f}x"))
    idle = report.resources.get("prefetch 1, 1 process(es)", {}).get("idle_core_percent")
    if idle:
        out.append(
            ("idle manager < 1% of a core", idle["manager"] < 1.0, f"{idle['manager']:.3f}%")
        )
        worst = max(idle["workers"], default=0.0)
        out.append(("idle workers ~0 (< 0.1% of a core)", worst < 0.1, f"{worst:.3f}%"))
        keeper = max(idle["keeper"], default=0.0)
        out.append(("idle keeper (reported, no target)", None, f"{keeper:.3f}%"))
    base = report.resources.get("idle python + import redis", {}).get("uss_mb")
    for name, res in report.resources.items():
        if not name.startswith("prefetch") or base is None:
            continue
        for i, worker in enumerate(res["workers"], 1):
            extra = worker["peak_uss_mb"] - base
            out.append(
                (
                    f"worker USS <= idle python+redis + 15 MB ({name}, worker {i})",
                    extra <= 15,
                    f"{worker['peak_uss_mb']:.1f} MB vs {base:.1f} MB: {extra:+.1f} MB",
                )
            )
    for name, times in report.respawn.items():
        if times:
            worst = max(times)
            out.append(
                (
                    f"respawn < 0.5 s ({name})",
                    worst < 0.5,
                    "; ".join(f"{t * 1000:.0f} ms" for t in times),
                )
            )
    return out


def load_report(path: Path) -> Report:
    """A report saved with --json, to print its table again."""
    data = json.loads(path.read_text())
    data["rows"] = [Row(**row) for row in data["rows"]]
    data["targets"] = [tuple(target) for target in data["targets"]]
    return Report(**data)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(report: Report) -> str:
    y = report.yardsticks
    lines = ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    if report.load:
        shown = "; ".join(f"{name} {values[0]:.2f}" for name, values in report.load.items())
        lines.append(f"- 1-minute load average when each section started: {shown}")
    lines += ["", f"Command: `{report.command}`", ""]
    s = report.sizes
    lines.append(
        f"N: {s['fast']:,} messages for 0 ms cases, {s['slow']:,} for 1 ms cases, "
        f"{s['peer']:,} jobs per peer ({s['rq_fork']:,} for RQ's forking worker); latency phase "
        f"{s['latency_seconds']:g} s at 50% of the measured rate; idle {s['idle_seconds']:g} s. "
        f"Yardstick and rqworkers rates: median of {s.get('repeats', 1)} runs (spread in the note)."
    )
    lines += ["", "## Throughput", ""]
    header = (
        f"{'section':<16} {'case':<48} {'N':>8} {'msgs/s':>10} {'ratio':>11} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'CPU s/100k':>10} {'Redis':>6} {'busy':>5}  note"
    )
    lines += ["```", header, "-" * len(header)]
    for r in report.rows:
        ratio = "-"
        if r.rate and r.vs and r.vs in y:
            ratio = f"{r.rate / y[r.vs]:.2f}x({r.vs[0]})"
        redis_core = "-" if r.redis_core is None else f"{r.redis_core:.0%}"
        lines.append(
            f"{r.section:<16} {r.case:<48} {r.n:>8,} {_fmt(r.rate, ',.0f'):>10} {ratio:>11} "
            f"{_fmt(r.p50_ms, '.2f'):>7} {_fmt(r.p99_ms, '.2f'):>7} "
            f"{_fmt(r.cpu_per_100k, '.1f'):>10} {redis_core:>6} "
            f"{_fmt(r.busy_cores, '.2f'):>5}  {r.note}".rstrip()
        )
    lines += ["```", ""]
    lines.append(
        "ratio: to yardstick (a), (b) or (c) of this run with the same handler duration "
        "(prefetch 1 vs (b), prefetch 100 vs (c), everything else vs (a)). CPU s/100k: "
        "rqworkers manager + workers. Redis: redis-server CPU over the run, as a share of one "
        "core. busy: cores busy on the whole machine over the run (2 = saturated)."
    )
    lines += ["", "## Resources", "", "```"]
    for name, res in report.resources.items():
        lines.append(f"{name}: {json.dumps(res, default=_round)}")
    for name, times in report.respawn.items():
        shown = ", ".join(f"{t * 1000:.1f} ms" for t in times)
        lines.append(f"respawn ({name}), SIGKILL -> replacement's first handled message: {shown}")
    lines += ["```", "", "## Targets", "", *target_lines(report.targets)]
    return "\n".join(lines) + "\n"


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """--json, --peers-python and --render, which every bench with peers takes."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--peers-python",
        default=os.environ.get("BENCH_PEERS_PYTHON")
        or (str(DEFAULT_PEERS_PYTHON) if DEFAULT_PEERS_PYTHON.exists() else sys.executable),
        help="interpreter with bench/requirements.txt installed",
    )
    parser.add_argument("--render", metavar="JSON", help="print the table of a saved --json run")


def target_lines(targets: list[tuple[str, bool | None, str]]) -> list[str]:
    """One line per target: MET, MISSED, or info where there is nothing to judge."""
    marks = {True: "MET   ", False: "MISSED", None: "info  "}
    return [f"- {marks[met]} {what}: {detail}" for what, met, detail in targets]


def _round(value: object) -> object:
    return round(value, 3) if isinstance(value, float) else str(value)


def machine_info(redis_binary: str) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1) if match else "?"
    version = subprocess.run([redis_binary, "--version"], capture_output=True, text=True).stdout
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    def v(name: str) -> str:
        try:
            return pkg_version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "redis-server": version.strip(),
        "redis-py": v("redis"),
        "hiredis": v("hiredis"),
        "psutil": v("psutil"),
        "rqworkers source": git_state(),
    }


def git_state() -> str:
    """The commit the measured rqworkers/ comes from, and whether it had local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "rqworkers"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    if not head:
        return f"{REPO} is not a git checkout"
    return f"commit {head}" + (" + uncommitted changes in rqworkers/" if dirty else "")


def draw_png(report: Report, path: str) -> str:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "matplotlib is not installed: no chart drawn"
    rows = [r for r in report.rows if r.rate]
    colors = {
        "redis-benchmark": "#999999",
        "yardstick": "#4c72b0",
        "rqworkers": "#dd8452",
        "peer": "#55a868",
    }
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
    labels = [f"{r.section}: {r.case}" for r in rows]
    ax.barh(
        range(len(rows)),
        [r.rate or 0 for r in rows],
        color=[colors.get(r.section, "#333333") for r in rows],
    )
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("messages (jobs) per second, log scale")
    ax.set_title("rqworkers bench: one run, one redis-server, 100-byte payloads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart written to {path}"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # runs every `finally`, which kills what we started


SECTIONS = ("raw_redis", "yardsticks", "paired", "rqworkers", "resources_idle_python", "respawn",
            "peers", "executor")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description="rqworkers throughput bench (see module doc)")
    parser.add_argument("--messages", type=int, help="messages per 0 ms case (default 100000)")
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run under 60 s")
    parser.add_argument(
        "--repeat",
        type=int,
        choices=range(1, 10),
        metavar="R",
        help="runs of each throughput figure, median reported (default 3; 1 with --quick)",
    )
    parser.add_argument("--png", help="draw a bar chart here (needs matplotlib)")
    add_report_arguments(parser)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args()
    if args.render:
        saved = load_report(Path(args.render))
        saved.targets = judge(saved)  # judged again: targets added since the run show too
        print(render(saved), end="")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    procs = Processes()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="rqworkers-bench-") as tmp:
            bench = Bench(args, Path(tmp), procs)
            try:
                report = bench.run()
            finally:
                procs.kill_all()
    finally:
        procs.kill_all()
    elapsed = time.monotonic() - started
    print(f"bench took {elapsed:.0f} s", file=sys.stderr)
    if args.png:
        print(draw_png(report, args.png), file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(render(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
