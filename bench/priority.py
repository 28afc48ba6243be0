"""What priorities cost the take: a direct loop of `ReliableQueue.take` (ack + take, no
handler, no service) on a private redis-server, as bench/RESULTS.md's "hot path" section.

    python -m bench.priority [--messages 20000] [--rounds 2] [--json]

Cases, each at prefetch 1 and 100: `plain` (every message LPUSHed: level 0, the queue has
no prioritised message), `levels` (every message pushed at a level from 1 to 9, drawn at
random: a prioritised backlog) and `mixed` (half each). For each: Redis CPU per message (the
change of INFO cpu's used_cpu_user + used_cpu_sys over the drain, divided by N) and takes a
second. To compare with the code before priorities, run it from a checkout of that code
(only `plain` runs there: it knows no `priority`).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.redisproc import RedisServer
from rqworkers.client.producer import Producer
from rqworkers.store.queue import ReliableQueue

QUEUE = "bench-prio"


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def fill(producer: Producer, case: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    body = b"x" * 64
    if case == "plain":
        producer.push_many(QUEUE, [body] * n)
        return
    share = 1.0 if case == "levels" else 0.5
    by_level: dict[int, int] = {}
    for _ in range(n):
        level = rng.randint(1, 9) if rng.random() < share else 0
        by_level[level] = by_level.get(level, 0) + 1
    for level, count in by_level.items():
        producer.push_many(QUEUE, [body] * count, priority=level)


def drain(queue: ReliableQueue, prefetch: int, n: int) -> tuple[float, float]:
    """(Redis CPU µs per message, takes a second) of taking all `n` messages."""
    client = queue.client
    acks: list[bytes] = []
    taken = takes = 0
    cpu, began = redis_cpu(client), time.perf_counter()
    while taken < n:
        got = queue.take(acks, prefetch).deliveries
        takes += 1
        taken += len(got)
        acks = [d.element for d in got]
        if not got:
            raise RuntimeError(f"nothing to take after {taken} of {n}")
    queue.take(acks, 0)
    seconds = time.perf_counter() - began
    return (redis_cpu(client) - cpu) / n * 1e6, takes / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", default="plain,levels,mixed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            client = server.client()
            client.config_set("appendonly", "no")  # Redis's own CPU, without the AOF's fsyncs
            producer = Producer(server.url)
            for round_ in range(args.rounds):
                for case in args.cases.split(","):
                    for prefetch in (1, 100):
                        client.flushall()
                        fill(producer, case, args.messages, round_)
                        queue = ReliableQueue(client, QUEUE, f"bench:{round_}")
                        us, rate = drain(queue, prefetch, args.messages)
                        row = {"round": round_, "case": case, "prefetch": prefetch,
                               "redis_us_per_message": round(us, 2),
                               "takes_per_s": round(rate)}  # fmt: skip
                        rows.append(row)
                        if not args.json:
                            print(row, flush=True)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
