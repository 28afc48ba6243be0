"""How many delayed messages one Redis holds, and how fast they are promoted (issue 20).

    python -m bench.delayed [--messages 1000000] [--spread 60] [--takers 2] [--prefetch 100]

A private redis-server (no persistence: this measures memory and speed, not durability)
gets `--messages` delayed messages through `Producer.push(at=)`, due evenly over `--spread`
seconds starting once they are all in. Then `--takers` processes take them as workers do
(the TAKE script, `prefetch` at a time, acking each batch with the next take) and note how
late each message was taken. Reported: the push rate, Redis's memory per scheduled message,
the promotion rate (messages moved out of the retry set per second while they fall due), and
the lateness of each take after its message's due time (a taker that keeps up takes each
message within milliseconds of it falling due).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.redisproc import HOST, free_port, redis_server_binary, wait_for
from rqworkers.client.producer import Producer
from rqworkers.store.keys import Keys
from rqworkers.store.queue import ReliableQueue

QUEUE = "delayed-bench"


def start_redis(workdir: Path) -> tuple[Any, int]:
    import subprocess

    port = free_port()
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", HOST, "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(host=HOST, port=port)
    wait_for(lambda: _pings(client), timeout=10, what="redis-server")
    return process, port


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def taker(port: int, index: int, prefetch: int, until: float, out: Any) -> None:
    """Take and ack as a worker does until `until` (wall clock); send back the lateness of
    each message taken (seconds after its due time, which its payload holds)."""
    client = redis.Redis(host=HOST, port=port)
    queue = ReliableQueue(client, QUEUE, f"bench:{index}")
    queue.hold_lease(600)
    late: list[float] = []
    acks: list[bytes] = []
    first = last = 0.0
    while time.time() < until:
        taken = queue.take(acks, prefetch)
        now = time.time()
        acks = [d.element for d in taken.deliveries]
        if taken.deliveries:
            first, last = first or now, now
        for delivery in taken.deliveries:
            late.append(now - float(delivery.payload.split(b" ")[0]))
        if not taken.deliveries:
            wait = (taken.next_due or now + 0.05) - time.time()
            time.sleep(min(0.05, max(0.0, wait)))  # the bench's stand-in for BLMOVE's wait
    queue.take(acks, 0)
    out.put((late, first, last))


def run(messages: int, spread: float, takers: int, prefetch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rqw-delayed-") as tmp:
        process, port = start_redis(Path(tmp))
        try:
            client = redis.Redis(host=HOST, port=port)
            base_memory = int(client.info("memory")["used_memory"])
            producer = Producer(f"redis://{HOST}:{port}/0")
            # Due times are set once the push is done: estimated, then checked.
            estimate = messages / 20_000 + 5.0
            start = time.time() + estimate
            began = time.perf_counter()
            batch = 1000
            for first in range(0, messages, batch):
                count = min(batch, messages - first)
                due = start + spread * first / messages
                payloads = [b"%r %d" % (due, first + i) for i in range(count)]
                producer.push(QUEUE, *payloads, at=due)
            push_seconds = time.perf_counter() - began
            memory = int(client.info("memory")["used_memory"]) - base_memory
            held = int(client.zcard(Keys(QUEUE).retry))
            behind = time.time() - start  # > 0: the push overran the estimate
            results: Any = multiprocessing.Queue()
            until = start + spread + 5.0
            procs = [
                multiprocessing.Process(target=taker, args=(port, i, prefetch, until, results))
                for i in range(takers)
            ]
            for proc in procs:
                proc.start()
            got = [results.get() for _ in procs]
            late = sorted(x for lateness, _, _ in got for x in lateness)
            spans = [(a, b) for _, a, b in got if a]
            took = max(b for _, b in spans) - min(a for a, _ in spans) if spans else 0.0
            for proc in procs:
                proc.join()
            left = int(client.zcard(Keys(QUEUE).retry))
        finally:
            process.kill()
            process.wait()
    q = statistics.quantiles(late, n=1000) if len(late) > 1 else [0.0] * 999
    return {
        "messages": messages,
        "held_at_once": held,
        "push_per_second": round(messages / push_seconds),
        "redis_bytes_per_message": round(memory / messages, 1),
        "redis_memory_mib": round(memory / 2**20, 1),
        "spread_seconds": spread,
        "takers": takers,
        "prefetch": prefetch,
        "push_overran_start_by_s": round(max(0.0, behind), 2),
        "promoted": len(late),
        "left_in_retry_set": left,
        "promoted_per_second_needed": round(messages / spread) if spread else None,
        "promoted_per_second": round(len(late) / took) if took else None,
        "lateness_ms_p50": round(q[499] * 1000, 1),
        "lateness_ms_p99": round(q[989] * 1000, 1),
        "lateness_ms_p999": round(q[998] * 1000, 1),
        "lateness_ms_max": round(late[-1] * 1000, 1) if late else None,
        "early": sum(1 for x in late if x < 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delayed", description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--spread", type=float, default=60.0, help="seconds they fall due over")
    parser.add_argument("--takers", type=int, default=2, help="processes taking, as workers")
    parser.add_argument("--prefetch", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(run(args.messages, args.spread, args.takers, args.prefetch), indent=2))


if __name__ == "__main__":
    main()
