"""What tracing costs: throughput with `[telemetry] tracing` off, on at 100% and on at 1%.

    nice -n 10 python -m bench.tracing [--messages N] [--rounds R] [--json]

One private `redis-server`, one OTLP/HTTP receiver in this process that accepts every
export and does nothing with it (the bodies are kept, and decoded only after each phase,
off the clock, to count the spans that arrived), and the real `python -m rqworkers run`
with one worker process of the no-op handler `bench.handlers:noop`, at prefetch 1 and 100.

For each prefetch, R rounds each start the service once per mode (off, 100%, 1%), in turn,
so the three modes share whatever the machine is doing; a start pushes N messages onto a
staging list while the worker blocks, RENAMEs it onto the queue, and times the drain. The
figures are the medians over the rounds: the rate, the worker's and Redis's CPU per message
(the worker's from schedstat, Redis's from INFO cpu), and the spans the receiver got, once
the stop flushed the last of them. Sampling is `OTEL_TRACES_SAMPLER=traceidratio` with
`OTEL_TRACES_SAMPLER_ARG` 1.0 or 0.01; everything else is the SDK's default (a batch
processor: 2,048 spans queued at most, 512 per export, every 5 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil

from bench.redisproc import wait_for
from bench.throughput import (
    NODE,
    QUEUE,
    STAGING,
    Processes,
    RedisServer,
    bench_env,
    cpu_seconds,
    fill,
    start_redis,
)

MODES: dict[str, dict[str, str] | None] = {
    "off": None,
    "on, 100%": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"},
    "on, 1%": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
}
PREFETCHES = (1, 100)


class Receiver:
    """A do-nothing OTLP/HTTP endpoint: every POST is answered 200 at once; bodies kept."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector's

            def do_POST(self) -> None:
                receiver.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take_spans(self) -> int:
        """The spans received since the last call (decoded now, off the clock)."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        bodies, self.bodies = self.bodies, []
        count = 0
        for body in bodies:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            count += sum(
                len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans
            )
        return count


@dataclass
class Phase:
    mode: str
    prefetch: int
    rate: float  # messages a second
    worker_us: float  # worker CPU per message, microseconds
    redis_us: float  # Redis CPU per message, microseconds
    spans: int


def _config(workdir: Path, redis: RedisServer, prefetch: int, tracing: bool) -> Path:
    path = workdir / f"tracing-p{prefetch}-{tracing}.toml"
    path.write_text(
        f"""
[manager]
check_interval = 1.0
shutdown_timeout = 20.0
node = "{NODE}"

[logging]
level = "WARNING"

[telemetry]
tracing = {"true" if tracing else "false"}

[hosts]
bench = "{redis.url}"

[[workers]]
host = "bench"
queue = "{QUEUE}"
handler = "bench.handlers:noop"
processes = 1
prefetch = {prefetch}
max_requests = 0
timeout = 30.0
"""
    )
    return path


def _redis_cpu(redis: RedisServer) -> float:
    info = redis.client().info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_phase(
    procs: Processes,
    redis: RedisServer,
    receiver: Receiver,
    workdir: Path,
    mode: str,
    prefetch: int,
    n: int,
) -> Phase:
    client = redis.client()
    client.flushdb()
    sampler = MODES[mode]
    env = bench_env(redis.url)
    env.update(
        {
            "OTEL_SERVICE_NAME": "bench",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        }
    )
    env.update(sampler or {})
    config = _config(workdir, redis, prefetch, sampler is not None)
    args = [sys.executable, "-m", "rqworkers", "run", "--config", str(config)]
    log = workdir / "rqworkers.log"
    proc = procs.start(args, env=env, log=log)
    keys = [f"{QUEUE}:{kind}:{NODE}:1" for kind in ("processing", "landing")]
    try:

        def blocked() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"rqworkers exited {proc.returncode}; see {log}")
            return any(c.get("cmd") == "blmove" for c in client.client_list())

        wait_for(blocked, timeout=30, what="the worker to block in BLMOVE")
        fill(client, STAGING, n)
        children = psutil.Process(proc.pid).children()
        worker = next(c.pid for c in children if c.name().startswith("rqworkers: worker"))
        cpu_before, redis_before = cpu_seconds(worker) or 0.0, _redis_cpu(redis)
        began = time.monotonic()
        client.rename(STAGING, QUEUE)

        def drained() -> bool:
            pipe = client.pipeline(transaction=False)
            for key in (QUEUE, *keys):
                pipe.llen(key)
            return not any(pipe.execute())

        wait_for(drained, timeout=120 + n / 100, what="the queue to drain", interval=0.005)
        seconds = time.monotonic() - began
        worker_cpu = (cpu_seconds(worker) or cpu_before) - cpu_before
        redis_cpu = _redis_cpu(redis) - redis_before
    finally:
        procs.stop(proc)  # SIGTERM: the worker flushes its last spans on its way out
    return Phase(
        mode,
        prefetch,
        n / seconds,
        worker_cpu / n * 1e6,
        redis_cpu / n * 1e6,
        receiver.take_spans(),
    )


def render(phases: list[Phase], n: int, rounds: int) -> str:
    lines = [
        f"{n:,} messages per start, {rounds} round(s); medians over the rounds",
        "",
        "| prefetch | tracing | msgs/s | / off | worker µs/msg | Redis µs/msg | spans exported |",
        "|---|---|---|---|---|---|---|",
    ]
    for prefetch in PREFETCHES:
        base = statistics.median(
            p.rate for p in phases if p.prefetch == prefetch and p.mode == "off"
        )
        for mode in MODES:
            mine = [p for p in phases if p.prefetch == prefetch and p.mode == mode]
            rate = statistics.median(p.rate for p in mine)
            lines.append(
                f"| {prefetch} | {mode} | {rate:,.0f} | {rate / base:.2f} "
                f"| {statistics.median(p.worker_us for p in mine):.1f} "
                f"| {statistics.median(p.redis_us for p in mine):.1f} "
                f"| {statistics.median(p.spans for p in mine) / n:.0%} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per start (20,000)")
    parser.add_argument("--rounds", type=int, default=3, help="starts per mode (3)")
    parser.add_argument("--json", action="store_true", help="also print every phase as JSON")
    args = parser.parse_args()
    procs = Processes()
    receiver = Receiver()
    phases: list[Phase] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tracing-") as scratch:
            workdir = Path(scratch)
            redis = start_redis(procs, workdir)
            load = psutil.getloadavg()[0]
            for prefetch in PREFETCHES:
                for _ in range(args.rounds):
                    for mode in MODES:
                        phase = run_phase(
                            procs, redis, receiver, workdir, mode, prefetch, args.messages
                        )
                        phases.append(phase)
                        print(f"  {phase}", file=sys.stderr)
            load = max(load, psutil.getloadavg()[0])
    finally:
        procs.kill_all()
    print(render(phases, args.messages, args.rounds))
    print(f"\n1-minute load average: up to {load:.1f} on {psutil.cpu_count()} CPUs")
    if args.json:
        print(json.dumps([asdict(p) for p in phases], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
