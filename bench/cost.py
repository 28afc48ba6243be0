"""The cost of one message (issue 22): throughput and Redis CPU per message, in one interleaved run.

    python -m bench.cost [--rounds R] [--quick] [--only core payload backlog grid burn] [--json]
    python -m bench.cost --render run.json

Every case runs once per round, all cases back to back, for R rounds; each figure is the
median of its rounds, and each ratio is taken within a round (both sides seconds apart) and
then the median of the rounds' ratios: this VM's speed drifts by tens of percent within
minutes, which a ratio of two medians taken apart would measure too.

Two figures per case, over one drain of N messages:
- throughput: N / (last handler return - the RENAME that handed the batch over), as
  `bench/throughput.py` times rqworkers; a yardstick's over the union of its processes' runs;
- Redis CPU per message: `used_cpu_user + used_cpu_sys` of the private redis-server's
  `INFO cpu`, read once just before the batch is handed over and once when it is all handled
  (acked), divided by N. `INFO` runs only at those two edges; the bench's own polling for
  the end of the drain (a few LLENs every 20 ms) is well under 0.1% of what it measures.

Cases (rqworkers is the real `python -m rqworkers run`, started anew for every case, as
`bench/throughput.py`'s ServiceRun starts it; the handler is the bench's no-op):
- core: yardstick (b) against prefetch 1, yardstick (c) against prefetch 100, and both with
  two processes (the targets of issue 22); then "(c) + worker CPU" at one and two processes:
  (c) whose handler burns what this round's prefetch-100 worker spent a message beyond (c)'s
  client, to tell what a client's CPU per message does to scaling from what rqworkers does;
- payload: the same pairs with 10 KB and 1 MB payloads (100 B is the core);
- backlog: prefetch 1 and 100 draining N messages off the top of a queue with 1,000 and with
  10,000,000 more waiting behind them, on a second redis-server of their own. The backlog is
  filled once by a Lua loop (timed) and parked under another key between rounds; the drain's
  window ends when the N are taken (the queue is down to the backlog), and CPU is divided by
  the messages that really left the queue in it;
- grid: 1, 2 and 4 processes, and concurrency 1, 10 and 100 (prefetch 100, no-op handler),
  with the CPU of the worker processes and of Redis as shares of a core: which one is the
  bound;
- burn: yardstick (c) at one and two processes, its handler burning 0.1 to 2 µs of CPU a
  message: its two-process ratio as the client's CPU per message grows.

Noise on a small VM: a message that goes back and forth between two processes (prefetch 1,
yardstick (b)) costs each of them about 3 times more CPU, and takes about 2.5 times longer,
when the vCPUs halt between messages (a quiet machine: waking a halted vCPU goes through the
hypervisor) than when something else keeps them busy. So a prefetch-1 figure moves with what
other tenants do, and Redis CPU per message with it; "machine busy" (every process's CPU
over the drain, 2 = both cores) says which of the two a sample saw, and a ratio is only to
be trusted in rounds where both sides saw the same. "stolen" (/proc/stat steal) tells apart a
hypervisor that takes cores away.

Exits 1 on a run failure (a message lost or handled twice, a process that did not start),
never on a missed target: targets are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil
import redis

from bench.redisproc import wait_for
from bench.throughput import (
    QUEUE,
    STAGING,
    Bench,
    Processes,
    RedisServer,
    ServiceRun,
    _terminate,
    cpu_seconds,
    fill,
    machine_busy,
    machine_info,
    phase_results,
    run_yardsticks,
    start_redis,
)

PARKED = "bench:parked"  # + the size: a backlog, between rounds
GROUPS = ("core", "payload", "backlog", "grid", "burn")
BURNS = (0.1, 0.25, 0.5, 1.0, 2.0)  # µs of CPU a message, the "burn" group's (c) handlers
WORKER_CPU = "(c) + worker CPU"  # (c), its handler burning what a worker spends beyond it
KB, MB = 10_000, 1_000_000
# Fills `KEYS[1]` with ARGV[3] LPUSHes of ARGV[2] copies of ARGV[1]: 10 M messages in ~2 s,
# where a client sending them takes ~5 s more.
_FILLER = """
local t = {}
for i = 1, tonumber(ARGV[2]) do t[i] = ARGV[1] end
for _ = 1, tonumber(ARGV[3]) do redis.call('LPUSH', KEYS[1], unpack(t)) end
return redis.call('LLEN', KEYS[1])
"""


class RunError(Exception):
    """The run itself went wrong (lost or extra messages): the figures mean nothing."""


@dataclass(frozen=True)
class Sizes:
    rounds: int
    n1: int  # messages per prefetch-1 case (and yardstick (b)), 100 B
    n100: int  # per prefetch-100 case (and yardstick (c)), 100 B
    payload: dict[int, tuple[int, int]]  # size -> (n1, n100)
    backlogs: tuple[int, int]
    grid_n: int


def sizes_for(quick: bool, rounds: int | None) -> Sizes:
    if quick:
        return Sizes(rounds or 1, 1_000, 10_000, {KB: (300, 2_000), MB: (20, 50)},
                     (1_000, 100_000), 5_000)  # fmt: skip
    return Sizes(rounds or 5, 10_000, 300_000, {KB: (5_000, 30_000), MB: (300, 500)},
                 (1_000, 10_000_000), 50_000)  # fmt: skip


@dataclass
class Target:
    """What a ServiceRun needs of a bench: one redis-server, a client, a work dir."""

    redis: RedisServer
    client: redis.Redis
    workdir: Path
    procs: Processes


@dataclass
class Sample:
    rate: float  # messages per second
    redis_us: float  # Redis CPU per message, microseconds
    redis_core: float  # Redis CPU over the drain's wall time, in cores
    busy: float  # whole machine, cores busy over the drain (stolen time included)
    worker_core: float | None = None  # all worker processes together, cores
    steal: float = 0.0  # cores the hypervisor took from this VM over the drain
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    sizes: dict[str, Any] = field(default_factory=dict)
    load: list[tuple[str, float]] = field(default_factory=list)  # when, 1-minute load average
    fill_seconds: dict[str, float] = field(default_factory=dict)
    cases: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # case -> per round
    cases_n: dict[str, int] = field(default_factory=dict)


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def machine() -> tuple[float, float]:
    """CPU seconds the whole VM has been busy, and those the hypervisor stole from it (a
    stolen moment counts as CPU time in every process it interrupted: Redis's too)."""
    return machine_busy(), float(getattr(psutil.cpu_times(), "steal", 0.0))


def _sample(
    rate: float, redis_s: float, n: float, wall: float, m0: tuple[float, float],
    m1: tuple[float, float], worker_s: float | None = None,
) -> Sample:  # fmt: skip
    """The figures of one drain: `m0`, `m1` are `machine()` at its edges. The workers' (or
    clients') `worker_s` of CPU is taken in cores over the time the rate is taken over
    (n / rate), not over `wall`, which also holds the edges' waits: so that worker cores /
    rate is exactly their CPU per message."""
    worker = None if worker_s is None else worker_s * rate / n
    busy, steal = (m1[0] - m0[0]) / wall, (m1[1] - m0[1]) / wall
    return Sample(rate, redis_s / n * 1e6, redis_s / wall, busy, worker, steal)


def size_name(size: int) -> str:
    return {100: "100 B", KB: "10 KB", MB: "1 MB"}[size]


# -- one sample of each kind ----------------------------------------------------------------


def yardstick(
    target: Target, mode: str, n: int, processes: int = 1, size: int = 100, burn_us: float = 0.0
) -> Sample:
    """n messages of `size` bytes, drained by `processes` runs of bench.yardsticks, their
    handlers burning `burn_us` of CPU a message. The clients' CPU is the sample's worker's."""
    client = target.client
    client.flushdb()
    fill(client, QUEUE, n, size=size)
    edge: dict[str, float] = {}
    edges: list[tuple[float, float]] = []

    def before() -> None:
        edge["cpu"], edge["t"] = redis_cpu(client), time.time()
        edges.append(machine())

    drain = run_yardsticks(
        client, target.redis.url, mode, n, processes, before_go=before, burn_us=burn_us
    )
    # The processes exited after their last command: nothing after it is theirs.
    wall = time.time() - edge["t"]
    spent = redis_cpu(client) - edge["cpu"]
    sample = _sample(drain.rate, spent, n, wall, edges[0], machine(), drain.cpu)
    if burn_us:
        sample.extra["burn_us"] = burn_us
    return sample


def worker_us(sample: Sample) -> float:
    """The worker's (or a yardstick client's) CPU per message, microseconds."""
    return (sample.worker_core or 0.0) / sample.rate * 1e6


def _work(concurrency: int) -> str:
    if concurrency == 1:
        return ""  # ServiceRun's default: bench.handlers:Noop
    return f'handler = "bench.handlers:ThreadNoop"\nconcurrency = {concurrency}'


@contextlib.contextmanager
def _service(run: ServiceRun) -> Iterator[list[int]]:
    """The service started, its workers waiting on the empty queue; yields its pids."""
    with run.service() as proc:
        yield [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]


def _cpu_of(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) or 0.0 for pid in pids}


def _check(client: redis.Redis, t0: float, n: int, what: str) -> tuple[float, list[int]]:
    """The rate of phase 0 and the workers that handled it; RunError unless exactly n."""
    workers, rates, counts = phase_results(client, [t0], n)
    if counts[0] != n:
        raise RunError(f"{what}: the handlers saw {counts[0]:,} of {n:,} messages")
    return rates[0], workers


def service(
    target: Target, prefetch: int, n: int, processes: int = 1, size: int = 100,
    concurrency: int = 1,
) -> Sample:  # fmt: skip
    """n messages of `size` bytes RENAMEd onto the queue of a waiting `rqworkers run`."""
    client = target.client
    client.flushdb()
    run = ServiceRun(cast(Bench, target), prefetch, processes, 0, work=_work(concurrency))
    with _service(run) as pids:
        fill(client, STAGING, n, size=size)
        cpu0, redis0, m0 = _cpu_of(pids), redis_cpu(client), machine()
        t0 = time.time()
        client.rename(STAGING, QUEUE)
        wait_for(run.drained, 120 + n / 100, what="the queue to drain", interval=0.02)
        redis1, m1, t1 = redis_cpu(client), machine(), time.time()
        cpu1 = _cpu_of(pids)
    what = f"prefetch {prefetch}, {processes} proc, concurrency {concurrency}, {size_name(size)}"
    rate, workers = _check(client, t0, n, what)
    wall = t1 - t0
    spent = redis1 - redis0
    worker = sum(cpu1[pid] - cpu0[pid] for pid in workers if pid in cpu0)
    return _sample(rate, spent, n, wall, m0, m1, worker)


def fill_backlog(client: redis.Redis, key: str, count: int, size: int = 100) -> None:
    """Grow `key` to `count` identical fillers (`Tz...`: the handlers' phase `z`)."""
    missing = count - int(client.llen(key))
    per_push = 5_000
    script = client.register_script(_FILLER)
    filler = b"Tz".ljust(size, b"f")
    while missing > 0:
        pushes = max(1, min(200, missing // per_push))
        this = min(missing, per_push)
        script(keys=[key], args=[filler, this, pushes if this == per_push else 1])
        missing = count - int(client.llen(key))


def backlog(target: Target, prefetch: int, n: int, behind: int) -> Sample:
    """n messages off the top of a queue with `behind` more waiting behind them."""
    client = target.client
    for key in client.scan_iter("bench:*"):  # the handlers' figures of the previous run
        if not key.startswith(PARKED.encode()):
            client.delete(key)
    parked = f"{PARKED}:{behind}"
    fill_backlog(client, parked, behind)  # tops up what the last round took of it
    run = ServiceRun(cast(Bench, target), prefetch, 1, 0)
    with _service(run) as pids:
        client.rename(parked, STAGING)
        fill(client, STAGING, n, right=True)  # taken first: the top of the queue
        cpu0, redis0, m0 = _cpu_of(pids), redis_cpu(client), machine()
        t0 = time.time()
        client.rename(STAGING, QUEUE)
        wait_for(lambda: client.llen(QUEUE) <= behind, 120 + n / 100, "the n to be taken",
                 interval=0.01)  # fmt: skip
        pipe = client.pipeline(transaction=False)
        pipe.info("cpu")
        pipe.llen(QUEUE)
        info, left = pipe.execute()
        redis1, m1, t1 = info["used_cpu_user"] + info["used_cpu_sys"], machine(), time.time()
        cpu1 = _cpu_of(pids)
        with contextlib.suppress(redis.ResponseError):  # empty: the 1,000 were eaten too
            client.rename(QUEUE, parked)  # the rest waits for the next round
        wait_for(run.drained, 120, what="the workers to finish what they hold")
    rate, workers = _check(client, t0, n, f"prefetch {prefetch}, backlog {behind:,}")
    moved = n + behind - int(left)
    wall = t1 - t0
    spent = redis1 - redis0
    worker = sum(cpu1[pid] - cpu0[pid] for pid in workers if pid in cpu0)
    sample = _sample(rate, spent, moved, wall, m0, m1, worker)
    sample.extra["moved"] = moved
    return sample


# -- the round ------------------------------------------------------------------------------


Case = tuple[str, int, Callable[[], Sample]]  # name, N, how to take one sample


def cases(
    main: Target, side: Target | None, s: Sizes, only: tuple[str, ...], seen: dict[str, Sample]
) -> list[Case]:
    """The cases of one round, in order; `seen` holds the samples of this round so far."""

    def burn() -> float:
        """What one rqworkers worker spent per message in this round, beyond (c)'s client."""
        return max(0.0, worker_us(seen["p100 100 B"]) - worker_us(seen["(c) 100 B"]))

    out: list[Case] = []
    if "core" in only:
        out += [
            ("(b) 100 B", s.n1, lambda: yardstick(main, "b", s.n1)),
            ("p1 100 B", s.n1, lambda: service(main, 1, s.n1)),
            ("(c) 100 B", s.n100, lambda: yardstick(main, "c", s.n100)),
            ("p100 100 B", s.n100, lambda: service(main, 100, s.n100)),
            ("(c) 100 B, 2 proc", s.n100, lambda: yardstick(main, "c", s.n100, 2)),
            ("p100 100 B, 2 proc", s.n100, lambda: service(main, 100, s.n100, 2)),
            (f"{WORKER_CPU} 100 B", s.n100,
             lambda: yardstick(main, "c", s.n100, burn_us=burn())),
            (f"{WORKER_CPU} 100 B, 2 proc", s.n100,
             lambda: yardstick(main, "c", s.n100, 2, burn_us=burn())),
        ]  # fmt: skip
    if "payload" in only:
        for size, (n1, n100) in s.payload.items():
            name = size_name(size)
            out += [
                (f"(b) {name}", n1, lambda n1=n1, z=size: yardstick(main, "b", n1, size=z)),
                (f"p1 {name}", n1, lambda n1=n1, z=size: service(main, 1, n1, size=z)),
                (f"(c) {name}", n100, lambda n=n100, z=size: yardstick(main, "c", n, size=z)),
                (f"p100 {name}", n100, lambda n=n100, z=size: service(main, 100, n, size=z)),
            ]
    if "backlog" in only and side is not None:
        for behind in s.backlogs:
            for prefetch, n in ((1, s.n1), (100, s.n100)):
                out.append((f"p{prefetch}, backlog {behind:,}", n,
                            lambda p=prefetch, n=n, b=behind: backlog(side, p, n, b)))  # fmt: skip
    if "grid" in only:
        n = s.grid_n
        out.append(("(c) 100 B, 4 proc", n, lambda: yardstick(main, "c", n, 4)))
        for processes in (1, 2, 4):
            for concurrency in (1, 10, 100):
                out.append((f"p100, {processes} proc, concurrency {concurrency}", n,
                            lambda p=processes, c=concurrency: service(main, 100, n, p,
                                                                       concurrency=c)))  # fmt: skip
    if "burn" in only:
        for us in BURNS:
            for processes in (1, 2):
                name = f"(c) + {us:g} µs 100 B" + (", 2 proc" if processes == 2 else "")
                out.append((name, s.n100, lambda p=processes, b=us: yardstick(
                    main, "c", s.n100, p, burn_us=b)))  # fmt: skip
    return out


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, workdir: Path, procs: Processes) -> Report:
    s = sizes_for(args.quick, args.rounds)
    only = tuple(args.only or GROUPS)
    report = Report(command=" ".join(["python -m bench.cost", *sys.argv[1:]]), sizes=asdict(s))
    main_redis = start_redis(procs, workdir)
    main = Target(main_redis, main_redis.client(), workdir, procs)
    report.machine = machine_info(main_redis.binary)
    side = None
    if "backlog" in only:
        side_dir = workdir / "backlog"
        side_dir.mkdir()
        side_redis = start_redis(procs, side_dir)
        side = Target(side_redis, side_redis.client(), side_dir, procs)
        started = time.perf_counter()
        fill_backlog(side.client, f"{PARKED}:{max(s.backlogs)}", max(s.backlogs))
        report.fill_seconds[f"{max(s.backlogs):,} messages"] = time.perf_counter() - started
        log(f"backlog of {max(s.backlogs):,} filled in {time.perf_counter() - started:.1f} s")
    seen: dict[str, Sample] = {}
    todo = cases(main, side, s, only, seen)
    for name, n, _ in todo:
        report.cases[name] = []
        report.cases_n[name] = n
    for number in range(1, s.rounds + 1):
        report.load.append((f"round {number}", os.getloadavg()[0]))
        log(f"round {number} of {s.rounds} (load {os.getloadavg()[0]:.2f})")
        for name, _, take in todo:
            sample = seen[name] = take()
            report.cases[name].append(asdict(sample))
            log(f"  {name}: {sample.rate:,.0f}/s, Redis {sample.redis_us:.2f} us/msg")
    report.load.append(("end", os.getloadavg()[0]))
    return report


# -- reading the report ---------------------------------------------------------------------

# ratio, numerator, denominator, least throughput ratio, most CPU-per-message ratio
RATIOS: list[tuple[str, str, str, float | None, float | None]] = [
    ("prefetch 1 / (b)", "p1 100 B", "(b) 100 B", 0.9, 1.1),
    ("prefetch 100 / (c)", "p100 100 B", "(c) 100 B", 0.6, 1.0),
    ("prefetch 100, 2 proc / 1 proc", "p100 100 B, 2 proc", "p100 100 B", None, None),
    ("(c), 2 proc / 1 proc", "(c) 100 B, 2 proc", "(c) 100 B", None, None),
    (
        f"{WORKER_CPU}, 2 proc / 1 proc",
        f"{WORKER_CPU} 100 B, 2 proc",
        f"{WORKER_CPU} 100 B",
        None,
        None,
    ),
    ("prefetch 1 / (b), 10 KB", "p1 10 KB", "(b) 10 KB", None, None),
    ("prefetch 100 / (c), 10 KB", "p100 10 KB", "(c) 10 KB", None, None),
    ("prefetch 1 / (b), 1 MB", "p1 1 MB", "(b) 1 MB", None, None),
    ("prefetch 100 / (c), 1 MB", "p100 1 MB", "(c) 1 MB", None, None),
    ("prefetch 1, 10 KB / 100 B", "p1 10 KB", "p1 100 B", None, None),
    ("prefetch 1, 1 MB / 100 B", "p1 1 MB", "p1 100 B", None, None),
    ("prefetch 100, 10 KB / 100 B", "p100 10 KB", "p100 100 B", None, None),
    ("prefetch 100, 1 MB / 100 B", "p100 1 MB", "p100 100 B", None, None),
    ("(b), 10 KB / 100 B", "(b) 10 KB", "(b) 100 B", None, None),
    ("(b), 1 MB / 100 B", "(b) 1 MB", "(b) 100 B", None, None),
    ("(c), 10 KB / 100 B", "(c) 10 KB", "(c) 100 B", None, None),
    ("(c), 1 MB / 100 B", "(c) 1 MB", "(c) 100 B", None, None),
]
_BIG, _SMALL = "backlog 10,000,000", "backlog 1,000"
for _p in (1, 100):  # "neither may depend on the backlog": read as within 10%
    RATIOS.append((f"prefetch {_p}, {_BIG} / {_SMALL}", f"p{_p}, {_BIG}", f"p{_p}, {_SMALL}",
                   0.9, 1.1))  # fmt: skip
for _proc in (2, 4):
    RATIOS.append((f"grid: {_proc} proc / 1 proc", f"p100, {_proc} proc, concurrency 1",
                   "p100, 1 proc, concurrency 1", None, None))  # fmt: skip
for _c in (10, 100):
    RATIOS.append((f"grid: concurrency {_c} / 1", f"p100, 1 proc, concurrency {_c}",
                   "p100, 1 proc, concurrency 1", None, None))  # fmt: skip
for _us in BURNS:
    RATIOS.append((f"(c) + {_us:g} µs, 2 proc / 1 proc", f"(c) + {_us:g} µs 100 B, 2 proc",
                   f"(c) + {_us:g} µs 100 B", None, None))  # fmt: skip


def per_round(report: Report, top: str, bottom: str, key: str) -> list[float]:
    a, b = report.cases.get(top, []), report.cases.get(bottom, [])
    return [x[key] / y[key] for x, y in zip(a, b, strict=False) if y[key]]


QUIET = 1.3  # machine busy below this: the vCPUs halted between messages (see the top)


def by_state(report: Report, top: str, bottom: str) -> str:
    """The ratios again, of the rounds where both sides saw the VM in the same state only:
    quiet (machine busy < QUIET on both) or busy (>= QUIET on both)."""
    a, b = report.cases.get(top, []), report.cases.get(bottom, [])
    parts = []
    for state, quiet in (("quiet", True), ("busy", False)):
        pairs = [(x, y) for x, y in zip(a, b, strict=False)
                 if (x["busy"] < QUIET) == quiet and (y["busy"] < QUIET) == quiet]  # fmt: skip
        if not pairs:
            parts.append(f"{state}: none")
            continue
        rate = statistics.median(x["rate"] / y["rate"] for x, y in pairs)
        cpu = statistics.median(x["redis_us"] / y["redis_us"] for x, y in pairs)
        parts.append(f"{state}: {rate:.3g}x, CPU {cpu:.3g}x ({len(pairs)})")
    return "; ".join(parts)


def _shown(values: list[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def bound(redis_core: float, worker_core: float, processes: int) -> str:
    """Which resource a case ran out of: a process near a whole core is a bound; worker
    and Redis together near both cores are one too, and then the side that spends more
    of them is named first."""
    if redis_core >= 0.85:
        return "Redis (a whole core)"
    if worker_core / processes >= 0.85:
        return "worker (a whole core each)"
    if redis_core + worker_core >= 1.6:
        return "the 2 cores: " + (
            "worker > Redis" if worker_core > redis_core else "Redis > worker"
        )
    side = "worker" if worker_core > redis_core else "Redis"
    return f"neither saturated, they take turns ({side} spends more)"


def render(report: Report) -> str:
    lines = ["### Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    lines.append("- 1-minute load average: " + "; ".join(f"{w} {v:.2f}" for w, v in report.load))
    for what, seconds in report.fill_seconds.items():
        lines.append(f"- backlog fill ({what}, one Lua loop): {seconds:.1f} s")
    lines += ["", f"Command: `{report.command}`", ""]
    lines += ["### Cases (median of the rounds; per round in brackets)", ""]
    lines.append("| case | N | msgs/s | Redis CPU µs/msg | worker CPU µs/msg | Redis cores | "
                 "worker cores | machine busy | stolen | bound |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, samples in report.cases.items():
        if not samples:
            continue
        rates = [x["rate"] for x in samples]
        cpus = [x["redis_us"] for x in samples]
        rc = statistics.median(x["redis_core"] for x in samples)
        wc = [x["worker_core"] for x in samples if x["worker_core"] is not None]
        busy = statistics.median(x["busy"] for x in samples)
        stolen = [x["steal"] for x in samples if "steal" in x]  # not in early saved runs
        steal = "-" if not stolen else format(max(stolen), ".2f")
        processes = 4 if "4 proc" in name else 2 if "2 proc" in name else 1
        worker = f"| - | {rc:.2f} | - | {busy:.2f} | {steal} | - |"
        if wc:
            w = statistics.median(wc)
            per = statistics.median(x["worker_core"] / x["rate"] * 1e6 for x in samples)
            worker = (f"| {per:.2f} | {rc:.2f} | {w:.2f} | {busy:.2f} | {steal} "
                      f"| {bound(rc, w, processes)} |")  # fmt: skip
        lines.append(
            f"| {name} | {report.cases_n[name]:,} "
            f"| {statistics.median(rates):,.0f} ({_shown(rates, ',.0f')}) "
            f"| {statistics.median(cpus):.2f} ({_shown(cpus, '.2f')}) " + worker
        )
    lines += ["", "### Ratios (per round, then the median)", ""]
    lines.append("| ratio | throughput | target | Redis CPU per message | target "
                 "| rounds with the VM quiet / busy on both sides |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|")
    for name, top, bottom, least, most in RATIOS:
        rates = per_round(report, top, bottom, "rate")
        cpus = per_round(report, top, bottom, "redis_us")
        if not rates:
            continue
        r, c = statistics.median(rates), statistics.median(cpus)
        met_r = "-" if least is None else _verdict(r >= least, least, ">=")
        met_c = "-" if most is None else _verdict(c <= most, most, "<=")
        lines.append(
            f"| {name} | {r:.3g}x ({_shown(rates, '.3g')}) | {met_r} "
            f"| {c:.3g}x ({_shown(cpus, '.3g')}) | {met_c} | {by_state(report, top, bottom)} |"
        )
    rq = per_round(report, "p100 100 B, 2 proc", "p100 100 B", "rate")
    for label, top, bottom, target in (
        ("(c)'s own", "(c) 100 B, 2 proc", "(c) 100 B", True),
        (f"{WORKER_CPU}'s own", f"{WORKER_CPU} 100 B, 2 proc", f"{WORKER_CPU} 100 B", False),
    ):
        yard = per_round(report, top, bottom, "rate")
        if not (rq and yard):
            continue
        quotients = [a / b for a, b in zip(rq, yard, strict=False)]
        q = statistics.median(quotients)
        verdict = _verdict(q >= 1.0, 1.0, ">=") if target else "-"
        lines.append(
            f"| 2 proc scaling, prefetch 100 / {label} | {q:.2f}x ({_shown(quotients, '.2f')}) "
            f"| {verdict} | - | - | - |"
        )
    burns = [x["extra"]["burn_us"] for x in report.cases.get(f"{WORKER_CPU} 100 B", [])
             if "burn_us" in x["extra"]]  # fmt: skip
    if burns:
        lines += [
            "",
            f"{WORKER_CPU}: yardstick (c) whose handler burns, in each round, the "
            "worker CPU per message of that round's prefetch 100 beyond (c)'s client's "
            f"(µs: {_shown(burns, '.2f')}). The same round trips and Redis work as (c), "
            "at a worker's CPU per message: what that CPU alone does to scaling here.",
        ]
    lines += ["", "Redis cores, worker cores (all worker processes together; the manager "
              "and keeper not counted), machine busy (every process on the VM, ours or not): "
              "CPU over the drain's wall time, 2 = both cores. Bound: Redis, or each worker "
              "process, at >= 0.85 of a core; else worker + Redis >= 1.6 of the 2 cores; else "
              "neither saturated: worker and Redis take turns (each waits for the other's "
              "reply), and the one that spends more per message sets the pace. Worker CPU "
              "µs/msg: the worker processes' CPU over the drain / N (for a yardstick, its client "
              "processes' CPU over their runs). Stolen: the most of any round, in cores, that "
              "the hypervisor took from this VM during the drain (/proc/stat steal); a stolen "
              "moment is counted as CPU time of the process it interrupted, Redis included. "
              f"Quiet / busy: the medians of the rounds where both sides had machine busy < "
              f"{QUIET} (quiet) or >= {QUIET} (busy), with how many rounds that was."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _verdict(met: bool, value: float, op: str) -> str:
    return f"{op} {value:g}: {'MET' if met else 'MISSED'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, choices=range(1, 20), metavar="R",
                        help="rounds of every case (default 5; 1 with --quick)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run under 60 s")
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run only these groups")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    parser.add_argument("--render", metavar="JSON", help="print the tables of a saved --json run")
    args = parser.parse_args()
    if args.render:
        try:
            data = json.loads(Path(args.render).read_text())
        except (OSError, ValueError) as exc:
            print(f"bench.cost: cannot read {args.render}: {exc}", file=sys.stderr)
            return 2
        data["load"] = [tuple(x) for x in data["load"]]
        print(render(Report(**data)), end="")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    procs = Processes()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="rqworkers-cost-") as tmp:
            report = run(args, Path(tmp), procs)
    except (RunError, RuntimeError, TimeoutError, redis.RedisError) as exc:
        print(f"bench.cost: run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.kill_all()
    print(f"bench took {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(json.dumps(asdict(report), indent=2) if args.json else render(report), end="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
