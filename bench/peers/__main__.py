"""`python -m bench.peers enqueue SYSTEM N [--job wait50]`: put N jobs (no-op, or the 50 ms
wait) on a peer's queue, then exit.
`python -m bench.peers roundtrip SYSTEM N M`: round trips with results (see `roundtrip`).

Enqueueing is done before the worker starts and is not timed as part of consumption.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

SYSTEMS = ("rq", "rq-simple", "celery", "dramatiq", "arq")
JOBS = ("noop", "wait50")  # RQ has no concurrency: it runs `noop` only
_CHUNK = 500


def enqueue(system: str, n: int, job: str = "noop") -> None:
    from bench.peers.common import URL, payloads

    items = payloads(n)
    chunks = [items[i : i + _CHUNK] for i in range(0, n, _CHUNK)]
    if system in ("rq", "rq-simple"):
        import redis
        from rq import Queue

        from bench.peers.rq_tasks import noop, noop_forked

        func = noop_forked if system == "rq" else noop
        queue = Queue("bench", connection=redis.Redis.from_url(URL))
        for chunk in chunks:
            queue.enqueue_many([Queue.prepare_data(func, args=(p,)) for p in chunk])
    elif system == "celery":
        from bench.peers import celery_app

        task = getattr(celery_app, job)
        for item in items:
            task.apply_async(args=(item,))
    elif system == "dramatiq":
        from bench.peers import dramatiq_app

        actor = getattr(dramatiq_app, job)
        for item in items:
            actor.send(item)
    elif system == "arq":
        asyncio.run(_enqueue_arq(chunks, job))


async def _enqueue_arq(chunks: list[list[str]], job: str) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings

    from bench.peers.arq_app import QUEUE
    from bench.peers.common import URL

    pool = await create_pool(RedisSettings.from_dsn(URL))
    try:
        for chunk in chunks:
            for i in range(0, len(chunk), 50):
                part = chunk[i : i + 50]
                await asyncio.gather(*(pool.enqueue_job(job, p, _queue_name=QUEUE) for p in part))
    finally:
        await pool.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["enqueue", "roundtrip"])
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("n", type=int)
    parser.add_argument("m", type=int, nargs="?", default=0, help="roundtrip: latency trips")
    parser.add_argument("--job", choices=JOBS, default="noop", help="enqueue: which job")
    args = parser.parse_args()
    if args.command == "roundtrip":
        from bench.peers.roundtrip import roundtrip

        print(json.dumps(roundtrip(args.system, args.n, args.m)))
        return
    started = time.perf_counter()
    if args.job != "noop" and args.system.startswith("rq"):
        parser.error("RQ runs one job at a time: only the noop job is set up for it")
    enqueue(args.system, args.n, args.job)
    print(json.dumps({"enqueued": args.n, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
