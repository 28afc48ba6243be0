"""Where a worker's time goes per message: the in-process `Worker` loop on a real Redis.

    python -m bench.profile_worker [--prefetch 1 100] [--messages N] [--repeat R] [--top K]

No manager, no fork: one `Worker` built as `rqworkers.worker.main` builds it, with the bare
no-op function `bench.handlers:noop`, calls `step()` until N pre-filled messages are
finished, against a private redis-server (no persistence). For each prefetch it prints:

- the loop's wall time per message (best of R runs, no profiler), split into the time
  spent in `Outbox.take` (the Lua round trip that acks and takes, client wall time: the
  server's work, the socket, redis-py and hiredis) and the rest, the worker's own Python;
- the redis-server's CPU per message over the same runs, the worker's and the yardstick's,
  and their ratio (the median of the runs');
- the yardstick of the same prefetch (`bench/yardsticks.py`: (b) for prefetch 1, (c)
  otherwise) run in this process before each run, on the same messages: a ratio taken
  without the service around the worker (no fork, no manager, no bench polling);
- what each piece of the per-message path costs alone (`timeit`, in the same process):
  the clock reads, the handler call under `ALARM` (and, for comparison, the two
  `setitimer` calls a timer per message would cost), the scoreboard writes (the general
  path's and the lean loop's), making a `Delivery` from a take's reply, the outbox's ack;
- a cProfile run's top functions by own time (the profiler adds its own cost per call, so
  its totals are larger than the wall time above; the proportions are what it is for).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.throughput import Processes, _terminate, cpu_seconds, fill, start_redis
from bench.yardsticks import _TAKE_BATCH, MODES, _handler
from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.store.connections import connect
from rqworkers.store.queue import Delivery, ReliableQueue
from rqworkers.worker.alarm import ALARM
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import BLOCK_TIMEOUT, Worker, WorkerSpec
from rqworkers.worker.outbox import Outbox
from rqworkers.worker.scoreboard import Scoreboard

QUEUE = "jobs"
HANDLER = "bench.handlers:noop"


def build(url: str, prefetch: int) -> Worker:
    """A `Worker` wired as `rqworkers.worker.main` wires it, minus the signals and fork."""
    pair = PairSettings(
        host="h", queue=QUEUE, handler=HANDLER, prefetch=prefetch, max_requests=0, url=url
    )
    spec = WorkerSpec(pair, f"{QUEUE}-1", "node:1", os.getppid(), None, b"", lease_ttl=30)
    queue = ReliableQueue(connect(url, BLOCK_TIMEOUT), QUEUE, "node:1", keep_connection=True)
    return Worker(spec, Handler(HANDLER), queue, Scoreboard(), StopFlag())


def drain(worker: Worker, n: int) -> float:
    """Seconds for `worker` to finish n messages (one step each, plus the takes)."""
    started = time.perf_counter()
    while worker.board.succeeded < n:
        worker.step()
    return time.perf_counter() - started


class TakeTimer:
    """Wraps `Outbox.take` of one worker to sum the wall time spent in it."""

    def __init__(self, outbox: Outbox) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._take = outbox.take
        outbox.take = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._take(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


def pieces(worker: Worker) -> dict[str, Callable[[], object]]:
    """Each piece of `Worker.deliver`'s path, as it runs per message."""
    board, outbox, handler = worker.board, worker.outbox, worker.handler
    base, payload = b"0123456789ab.1.", b"x" * 100
    delivery = Delivery(base + b"1", 0, payload, 1)
    monotonic = time.monotonic

    def ack() -> None:
        outbox.ack(delivery, 0.0)
        outbox.acks.clear()

    def scoreboard() -> None:
        board.busy(1.0)
        board.idle(False, 0.0001)

    board.mark_in(base, 1)

    def lean_scoreboard() -> None:
        board.start(2, 1.0)
        board.succeeded_in(0.0001)

    def timer() -> None:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        signal.setitimer(signal.ITIMER_REAL, 0)

    return {
        "2 clock reads (time.monotonic)": lambda: (monotonic(), monotonic()),
        "(not used) a timer per message: 2 setitimer calls": timer,
        "handler call via ALARM.call (lazy timer)": lambda: ALARM.call(
            30.0, handler.handle, delivery.payload
        ),
        "scoreboard busy + idle (general path)": scoreboard,
        "scoreboard start + succeeded_in (lean loop)": lean_scoreboard,
        "a Delivery made from a take's reply": lambda: Delivery(base + b"7", 0, payload, 7),
        "outbox ack (append)": ack,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=18, help="0: no cProfile run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="rqworkers-profile-") as tmp:
            server = start_redis(procs, Path(tmp))
            client = server.client()
            for prefetch in args.prefetch:
                report(args, server.url, server.process.pid, client, prefetch)
    finally:
        procs.kill_all()
    return 0


def report(args: argparse.Namespace, url: str, redis_pid: int, client: Any, prefetch: int) -> None:
    n = args.messages
    print(f"## prefetch {prefetch}, {n:,} messages, load {os.getloadavg()[0]:.2f}\n")
    best: tuple[float, float, int] | None = None
    redis_cpu: list[float] = []  # per run: the worker's, then the yardstick's
    yardstick_cpu: list[float] = []
    mode = "b" if prefetch == 1 else "c"
    yardstick: list[float] = []
    for _ in range(args.repeat):
        client.flushdb()  # the yardstick of this prefetch first, on the same messages
        fill(client, QUEUE, n)
        client.script_load(_TAKE_BATCH)
        before = cpu_seconds(redis_pid) or 0.0
        started = time.perf_counter()
        MODES[mode](client, QUEUE, f"{QUEUE}:processing", n, _handler(0.0))
        yardstick.append(time.perf_counter() - started)
        yardstick_cpu.append((cpu_seconds(redis_pid) or 0.0) - before)
        client.flushdb()
        fill(client, QUEUE, n)
        worker = build(url, prefetch)
        worker.step()  # lease, replay, first take: not per-message work
        timer = TakeTimer(worker.outbox)
        before = cpu_seconds(redis_pid) or 0.0
        wall = drain(worker, n)
        redis_cpu.append((cpu_seconds(redis_pid) or 0.0) - before)
        worker.finish()
        worker.queue.client.close()
        if best is None or wall < best[0]:
            best = (wall, timer.seconds, timer.calls)
    assert best is not None
    wall, in_take, takes = best
    us = 1e6 / n
    print(f"wall per message (best of {args.repeat}): {wall * us:.2f} us = {n / wall:,.0f} msgs/s")
    print(f"  in Outbox.take (Redis round trip, redis-py): {in_take * us:.2f} us ({takes:,} calls)")
    print(f"  the rest (worker Python per message): {(wall - in_take) * us:.2f} us")
    ratios = sorted(w / y for w, y in zip(redis_cpu, yardstick_cpu, strict=True))
    print(
        f"redis-server CPU per message (median of {args.repeat}): the worker "
        f"{statistics.median(redis_cpu) * us:.2f} us, yardstick ({mode}) "
        f"{statistics.median(yardstick_cpu) * us:.2f} us; the worker: "
        f"{statistics.median(ratios):.2f}x (per run: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    fastest = min(yardstick)
    print(
        f"yardstick ({mode}) in this process, interleaved (best of {args.repeat}): "
        f"{fastest * us:.2f} us = {n / fastest:,.0f} msgs/s; the worker: {fastest / wall:.2f}x\n"
    )
    worker = build(url, prefetch)
    print("pieces alone (timeit, best of 5, per call):")
    for name, fn in pieces(worker).items():
        per = min(timeit.repeat(fn, number=20_000, repeat=5)) / 20_000
        print(f"  {name:<48} {per * 1e6:6.3f} us")
    worker.queue.client.close()
    if args.top:
        profiled(args, url, client, prefetch)


def profiled(args: argparse.Namespace, url: str, client: Any, prefetch: int) -> None:
    """One more drain under cProfile: its top `--top` functions by own time."""
    n = args.messages
    client.flushdb()
    fill(client, QUEUE, n)
    worker = build(url, prefetch)
    worker.step()
    profile = cProfile.Profile()
    profile.enable()
    drain(worker, n)
    profile.disable()
    worker.finish()
    worker.queue.client.close()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(args.top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print(f"\ncProfile, top {args.top} by own time (per-call columns in seconds):")
    print("\n".join(lines[start - 1 :]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
