"""What idle pairs cost: Redis commands and CPU with no message at all (issue 9).

    python -m bench.idle [--pairs 0 25 100] [--seconds 30] [--settle 10] [--json]

For each count of pairs, the real `python -m rqworkers run` starts with that many pairs
(one process each, on queues that stay empty) against a private redis-server. Once every
worker blocks in BLMOVE, and `--settle` seconds more have let start-up traffic pass
(leases, registration, replays, the keeper's first passes), a window of `--seconds`
measures:

- Redis commands/s: the delta of `INFO stats` `total_commands_processed`, which counts the
  commands Lua scripts run too, less the bench's own two INFO calls; the commands that
  make it up come from `INFO commandstats`;
- Redis CPU: the redis-server process's on-CPU time over the window, as a share of a core;
- the CPU of the workers and keeper (and of the manager apart), from the kernel's
  per-thread schedstat (nanoseconds: psutil's 10 ms ticks are too coarse for idle).

0 pairs is Redis alone: its own cron, the floor under every other row. Windows are taken
in one go, minutes apart, on the same redis-server, so the rows compare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import redis

from bench.redisproc import wait_for
from bench.throughput import (
    Processes,
    RedisServer,
    _terminate,
    bench_env,
    cpu_seconds,
    machine_info,
    start_redis,
)

HANDLER = "rqworkers.examples:log_message"  # never called: the queues stay empty
OWN_COMMANDS = 2  # the INFO stats and INFO commandstats that open the window


@dataclass
class Row:
    pairs: int
    seconds: float
    commands_per_s: float
    redis_core: float  # share of one core
    workers_keeper_core: float
    manager_core: float
    processes: int  # worker processes found
    top_commands: dict[str, float] = field(default_factory=dict)  # command -> calls/s

    @property
    def per_pair(self) -> float | None:
        return self.commands_per_s / self.pairs if self.pairs else None


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    rows: list[Row] = field(default_factory=list)
    load: dict[str, list[float]] = field(default_factory=dict)


def write_config(path: Path, url: str, pairs: int) -> None:
    """`pairs` pairs with every default a user would leave alone, logs at WARNING."""
    workers = "".join(
        f'\n[[workers]]\nhost = "main"\nqueue = "idle:{i}"\nhandler = "{HANDLER}"\n'
        for i in range(pairs)
    )
    path.write_text(
        f'[manager]\nnode = "idle"\n\n[logging]\nlevel = "WARNING"\n\n'
        f'[hosts]\nmain = "{url}"\n{workers}'
    )


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def measure(
    procs: Processes, server: RedisServer, workdir: Path, pairs: int, seconds: float, settle: float
) -> Row:
    client = server.client()
    client.flushdb()
    service = None
    if pairs:
        config = workdir / f"idle-{pairs}.toml"
        write_config(config, server.url, pairs)
        args = [sys.executable, "-m", "rqworkers", "run", "--config", str(config)]
        log = workdir / f"idle-{pairs}.log"
        service = procs.start(args, env=bench_env(server.url), log=log)

        def blocked() -> bool:
            if service.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"rqworkers exited {service.returncode}: {' | '.join(tail)}")
            return sum(1 for c in client.client_list() if c.get("cmd") == "blmove") >= pairs

        wait_for(blocked, timeout=60 + pairs, what=f"{pairs} workers to block in BLMOVE")
    try:
        time.sleep(settle)  # start-up traffic passes; nothing to wait on but the clock
        children = psutil.Process(service.pid).children() if service else []
        others = [c.pid for c in children]
        workers = [c.pid for c in children if "rqworkers: worker " in " ".join(c.cmdline())]
        before_total = int(client.info("stats")["total_commands_processed"])
        before_calls = command_calls(client)
        cpu_before = {pid: cpu_seconds(pid) or 0.0 for pid in [server.process.pid, *others]}
        manager_before = cpu_seconds(service.pid) or 0.0 if service else 0.0
        started = time.monotonic()
        time.sleep(seconds)  # the measurement window
        wall = time.monotonic() - started
        total = int(client.info("stats")["total_commands_processed"]) - before_total
        after_calls = command_calls(client)
        cpu = {pid: (cpu_seconds(pid) or 0.0) - was for pid, was in cpu_before.items()}
        manager = (cpu_seconds(service.pid) or 0.0) - manager_before if service else 0.0
    finally:
        if service is not None:
            procs.stop(service)
    calls = {
        name: (n - before_calls.get(name, 0)) / wall
        for name, n in after_calls.items()
        if n > before_calls.get(name, 0)
    }
    calls["info"] = calls.get("info", 0.0) - OWN_COMMANDS / wall
    top = dict(sorted(((k, v) for k, v in calls.items() if v > 0.005), key=lambda kv: -kv[1]))
    return Row(
        pairs=pairs,
        seconds=wall,
        commands_per_s=(total - OWN_COMMANDS) / wall,
        redis_core=cpu[server.process.pid] / wall,
        workers_keeper_core=sum(cpu[pid] for pid in others) / wall,
        manager_core=manager / wall,
        processes=len(workers),
        top_commands=top,
    )


def render(report: Report) -> str:
    lines = [f"Command: `{report.command}`", ""]
    lines += [f"- {k}: {v}" for k, v in report.machine.items()]
    shown = "; ".join(f"{name} {values[0]:.2f}" for name, values in report.load.items())
    lines += [f"- 1-minute load average when each window's service started: {shown}", ""]
    lines.append(
        "| idle pairs | Redis commands/s | per pair | Redis CPU | CPU of workers + keeper "
        "| manager CPU | window |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for r in report.rows:
        per_pair = "-" if r.per_pair is None else f"{r.per_pair:.3f}"
        lines.append(
            f"| {r.pairs} | {r.commands_per_s:.2f} | {per_pair} | {r.redis_core:.2%} "
            f"| {r.workers_keeper_core:.2%} of a core | {r.manager_core:.2%} | {r.seconds:.0f} s |"
        )
    lines += ["", "Commands per second in the window (INFO commandstats, the bench's own INFO"]
    lines += ["calls taken out):", ""]
    for r in report.rows:
        shown = ", ".join(f"{name} {rate:.2f}" for name, rate in r.top_commands.items())
        lines.append(f"- {r.pairs} pairs: {shown or 'none'}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[0, 25, 100])
    parser.add_argument("--seconds", type=float, default=30.0, help="the measurement window")
    parser.add_argument("--settle", type=float, default=10.0, help="wait after start-up")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    report = Report(command=" ".join(["python -m bench.idle", *sys.argv[1:]]))
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="rqworkers-idle-") as tmp:
            workdir = Path(tmp)
            server = start_redis(procs, workdir)
            report.machine = machine_info(server.binary)
            for pairs in args.pairs:
                report.load[f"{pairs} pairs"] = list(os.getloadavg())
                print(f"[{time.strftime('%H:%M:%S')}] {pairs} idle pairs", file=sys.stderr)
                report.rows.append(
                    measure(procs, server, workdir, pairs, args.seconds, args.settle)
                )
    finally:
        procs.kill_all()
    if args.json:
        rows = [asdict(r) | {"per_pair": r.per_pair} for r in report.rows]
        print(json.dumps(asdict(report) | {"rows": rows}, indent=2))
    else:
        print(render(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
