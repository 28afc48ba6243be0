"""I/O-bound handlers: rqworkers' `concurrency` beside peers' threads and coroutines (issue 11).

    python -m bench.concurrency [--seconds S] [--repeat R] [--concurrency C ...] [--no-peers]
                                [--json]
    python -m bench.concurrency --render run.json

Every handler and job waits 50 ms per message (`asyncio.sleep` or `time.sleep`), as one that
calls an HTTP service would, so a process's rate is bounded by how many messages it keeps
waiting at once: the ideal is concurrency / 0.05 s, capped by what Redis can move, which
is yardstick (c) of `bench/throughput.py` (batched LMOVEs in Lua, no-op handler) measured
in the same run.

- rqworkers: the real `python -m rqworkers run`, one pair, one process, `concurrency` C
  and `prefetch` C (a worker takes at most `prefetch` messages per look, and looks at most
  every 50 ms while busy: with `prefetch` 1 it would start one message per look; the row
  "prefetch 1" shows what that costs). Timed as `bench/throughput.py` times every
  rqworkers case: N messages RENAMEd onto the queue while the worker waits, rate = N /
  (last handler return - RENAME), the median of `--repeat` batches in one service run.
- Peers, one worker process each on N jobs enqueued first (one run each), from the first
  job's start to the Nth job's end, timed inside the job (`bench/peers/common.py`):
  Dramatiq with 8 (its default) and 100 threads, arq with `max_jobs` 100 at its default
  `poll_delay` (0.5 s) and at 0, Celery's threads pool with 100 threads and late acks.
- RSS: the peak resident set of the process that runs the messages (sampled every 0.5 s),
  the figure `top` shows; forked workers share part of it with their manager.

N is C x 100 (S = 5 s at the ideal; `--seconds`), at least 100 and at most 40,000.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.handlers import WAIT
from bench.throughput import (
    Bench,
    MemorySampler,
    Processes,
    ServiceRun,
    _terminate,
    add_report_arguments,
    machine_info,
    target_lines,
)

CONCURRENCIES = (1, 10, 100, 1000)
MAX_N = 40_000
AIM_CONCURRENCY = 100  # the issue's aim: >= 0.9x the ideal here, and ahead of every peer
AIM_RATIO = 0.9


@dataclass
class Row:
    section: str  # "yardstick", "rqworkers" or "peer"
    case: str
    concurrency: int
    n: int
    rate: float | None = None  # messages (jobs) per second
    ideal: float | None = None  # concurrency / WAIT, capped by Redis
    rss_mb: float | None = None  # peak RSS of the process running the messages
    p50_ms: float | None = None  # LPUSH to handler start, at half the measured rate
    note: str = ""


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    redis_cap: float = 0.0
    rows: list[Row] = field(default_factory=list)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)
    load: dict[str, list[float]] = field(default_factory=dict)


def messages_for(concurrency: int, seconds: float) -> int:
    """Enough messages to keep `concurrency` handlers waiting for `seconds` at the ideal."""
    return max(100, min(MAX_N, round(concurrency * seconds / WAIT)))


class ConcurrencyBench(Bench):
    """`Bench`'s redis-server, processes, yardstick and peer runner, with I/O-bound cases."""

    def __init__(self, args: argparse.Namespace, workdir: Path, procs: Processes) -> None:
        super().__init__(args, workdir, procs)
        self.out = Report(command=" ".join(["python -m bench.concurrency", *sys.argv[1:]]))

    def run_all(self) -> Report:
        self.out.machine = machine_info(self.redis.binary)
        sections = [self.redis_cap, self.rqworkers_cases]
        if not self.args.no_peers:
            sections.append(self.peer_cases)
        for section in sections:
            self.out.load[section.__name__] = list(os.getloadavg())
            section()
        self.out.load["end"] = list(os.getloadavg())
        self.out.targets = judge(self.out)
        return self.out

    def ideal(self, concurrency: int) -> float:
        return min(concurrency / WAIT, self.out.redis_cap)

    def redis_cap(self) -> None:
        """Yardstick (c) with a no-op handler: what Redis moves with batching, here, now."""
        self.log("redis cap: yardstick (c), 0 ms")
        n = 100_000
        rates = [self.yardstick("c", n, 0) for _ in range(self.sizes.repeats)]
        self.out.redis_cap = statistics.median(rates)
        row = Row("yardstick", "(c) Lua: 100 LMOVEs, one LTRIM ack, 0 ms", 0, n)
        row.rate, row.note = self.out.redis_cap, f"median of {len(rates)}"
        self.out.rows.append(row)
        self.log(f"  redis cap: {self.out.redis_cap:,.0f}/s")

    def rqworkers_cases(self) -> None:
        self.log("rqworkers")
        concurrencies = self.args.concurrency
        cases = [(kind, c, c) for kind in ("async", "threads") for c in concurrencies]
        if AIM_CONCURRENCY in concurrencies:  # the default prefetch, for comparison
            cases.append(("async", AIM_CONCURRENCY, 1))
        for kind, concurrency, prefetch in cases:
            n = messages_for(concurrency, self.args.seconds)
            if prefetch < concurrency:  # one start per 50 ms look: keep the run short
                n = messages_for(1, self.args.seconds) * 2
            self.out.rows.append(self.rqworkers_case(kind, concurrency, prefetch, n))

    def rqworkers_case(self, kind: str, concurrency: int, prefetch: int, n: int) -> Row:
        handler = "AsyncWait50ms" if kind == "async" else "ThreadWait50ms"
        work = f'handler = "bench.handlers:{handler}"\nconcurrency = {concurrency}'
        run = ServiceRun(self, prefetch, 1, int(WAIT * 1000), work=work)
        run.name = f"{kind}-c{concurrency}-p{prefetch}"
        measured = run.measure(n, self.sizes.repeats, 1.0, resources=True, idle=0.0)
        what = "async def, asyncio.sleep" if kind == "async" else "threads, time.sleep"
        row = Row("rqworkers", f"{what}, prefetch {prefetch}", concurrency, n, measured.rate)
        row.ideal = self.ideal(concurrency)
        row.rss_mb = run.resources["workers"][0]["peak_rss_mb"]
        row.p50_ms, row.note = measured.p50_ms, measured.note.split("; latency")[0]
        self.log(f"  {row.case}, concurrency {concurrency}: {_rate(row)} {row.note}")
        return row

    def peer_cases(self) -> None:
        self.log(f"peers (python: {self.peers_python})")
        dramatiq = "-m dramatiq bench.peers.dramatiq_app --processes 1 --threads"
        celery = "-m celery -A bench.peers.celery_app worker --pool threads -Q bench"
        celery += " --loglevel WARNING --without-gossip --without-mingle --without-heartbeat"
        arq = "-m bench.peers.arq_app"
        arq_100 = {"BENCH_ARQ_MAX_JOBS": "100"}
        # package, label, concurrency, worker arguments, extra environment
        cases: list[tuple[str, str, int, str, dict[str, str]]] = [
            ("dramatiq", "Dramatiq, 8 threads (its default)", 8, f"{dramatiq} 8", {}),
            ("dramatiq", "Dramatiq, 100 threads", 100, f"{dramatiq} 100", {}),
            ("arq", "arq, max_jobs 100, poll_delay 0.5 s (default)", 100, arq, arq_100),
            ("arq", "arq, max_jobs 100, poll_delay 0 (tuned)", 100, arq,
             arq_100 | {"BENCH_ARQ_POLL_DELAY": "0"}),
            ("celery", "Celery, threads pool, 100 threads, acks_late", 100,
             f"{celery} --concurrency 100", {}),
        ]  # fmt: skip
        versions: dict[str, str] = {}
        for package, label, concurrency, worker_args, extra in cases:
            n = messages_for(concurrency, self.args.seconds)
            row = Row("peer", label, concurrency, n, ideal=self.ideal(concurrency))
            if package not in versions:
                versions[package] = self.peer_version(package)
            row.note = versions[package]
            if not row.note.startswith("not run"):
                sampler = MemorySampler([])
                try:
                    row.rate = self.run_peer(
                        package, n, worker_args.split(), extra, job="wait50", sampler=sampler
                    )
                    row.rss_mb = max(sampler.peak_rss.values(), default=0) / 1e6
                    row.note = f"{package} {row.note}, 1 run"
                except Exception as exc:  # a peer that fails is reported, the bench goes on
                    row.note = f"not run: {exc}"[:160]
            self.out.rows.append(row)
            self.log(f"  {label}: {_rate(row)} {row.note}")


def _rate(row: Row) -> str:
    return f"{row.rate:,.0f}/s" if row.rate else "-"


def judge(report: Report) -> list[tuple[str, bool | None, str]]:
    """The issue's aim at concurrency 100: >= 0.9x the ideal, and ahead of every peer."""
    out: list[tuple[str, bool | None, str]] = []
    peers = [r for r in report.rows if r.section == "peer" and r.rate]
    best = max(peers, key=lambda r: r.rate or 0.0, default=None)
    for row in report.rows:
        if row.section != "rqworkers" or row.concurrency != AIM_CONCURRENCY or not row.rate:
            continue
        if not row.case.endswith(f"prefetch {AIM_CONCURRENCY}"):
            continue
        ideal = row.ideal or 0.0
        ratio = row.rate / ideal if ideal else 0.0
        out.append(
            (
                f"{row.case}, concurrency 100 >= {AIM_RATIO}x ideal",
                ratio >= AIM_RATIO,
                f"{row.rate:,.0f} vs {ideal:,.0f}/s: {ratio:.2f}x",
            )
        )
        if best and best.rate:
            out.append(
                (
                    f"{row.case}, concurrency 100 ahead of every peer (best: {best.case})",
                    row.rate > best.rate,
                    f"{row.rate:,.0f} vs {best.rate:,.0f}/s: {row.rate / best.rate:.2f}x",
                )
            )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(report: Report) -> str:
    lines = ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    shown = "; ".join(f"{name} {values[0]:.2f}" for name, values in report.load.items())
    lines += [f"- 1-minute load average when each section started: {shown}", ""]
    lines += [f"Command: `{report.command}`", ""]
    lines.append(
        f"Every handler waits {WAIT * 1000:.0f} ms. ideal: concurrency / {WAIT:g} s, capped by "
        f"yardstick (c) of this run ({report.redis_cap:,.0f} msgs/s). RSS: peak of the process "
        "running the messages. p50: LPUSH to handler start at half the measured rate."
    )
    header = (
        f"{'section':<10} {'case':<48} {'conc.':>5} {'N':>7} {'msgs/s':>8} {'ideal':>8} "
        f"{'x ideal':>7} {'RSS MB':>6} {'p50 ms':>7}  note"
    )
    lines += ["", "```", header, "-" * len(header)]
    for r in report.rows:
        ratio = f"{r.rate / r.ideal:.2f}x" if r.rate and r.ideal else "-"
        lines.append(
            f"{r.section:<10} {r.case:<48} {r.concurrency or '-':>5} {r.n:>7,} "
            f"{_fmt(r.rate, ',.0f'):>8} {_fmt(r.ideal, ',.0f'):>8} {ratio:>7} "
            f"{_fmt(r.rss_mb, '.1f'):>6} {_fmt(r.p50_ms, '.2f'):>7}  {r.note}".rstrip()
        )
    lines += ["```", "", "Targets:", "", *target_lines(report.targets)]
    return "\n".join(lines) + "\n"


def load_report(path: Path) -> Report:
    data = json.loads(path.read_text())
    data["rows"] = [Row(**row) for row in data["rows"]]
    data["targets"] = [tuple(target) for target in data["targets"]]
    return Report(**data)


def main() -> int:
    parser = argparse.ArgumentParser(description="rqworkers I/O-bound bench (see module doc)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="N = the messages of this long at the ideal"
    )
    parser.add_argument("--repeat", type=int, choices=range(1, 10), default=3, metavar="R")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=list(CONCURRENCIES), metavar="C",
        help="rqworkers cases to run (default: 1 10 100 1000)",
    )  # fmt: skip
    parser.add_argument("--no-peers", action="store_true", help="rqworkers and Redis only")
    add_report_arguments(parser)
    args = parser.parse_args()
    if args.render:
        print(render(load_report(Path(args.render))), end="")
        return 0
    args.messages, args.quick = None, False  # what `Bench` reads besides
    signal.signal(signal.SIGTERM, _terminate)
    procs = Processes()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="rqworkers-bench-") as tmp:
            report = ConcurrencyBench(args, Path(tmp), procs).run_all()
    finally:
        procs.kill_all()
    print(f"bench took {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(json.dumps(asdict(report), indent=2) if args.json else render(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
