"""Round trips with results on the peers: submit, run `echo` in the worker, get the result.

`python -m bench.peers roundtrip SYSTEM N M` (the worker already running) submits N tasks,
then waits for every result (the rate), then runs M more one at a time (the latency), and
prints `{"rate": …, "p50_ms": …, "p99_ms": …}`. The same two phases as the rqworkers
Executor's in `bench/throughput.py`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

Submit = Callable[[int], Any]  # sends echo(i), returns a handle
Wait = Callable[[Any], Any]  # the handle's result, blocking
TIMEOUT = 120  # seconds for any one result


def measure(submit: Submit, wait: Wait, n: int, m: int) -> dict[str, float]:
    if wait(submit(-1)) != -1:  # warm up; also proves the worker is there
        raise RuntimeError("echo returned something else")
    started = time.perf_counter()
    handles = [submit(i) for i in range(n)]
    results = [wait(h) for h in handles]
    elapsed = time.perf_counter() - started
    if results != list(range(n)):
        raise RuntimeError("results do not match the arguments")
    trips = []
    for i in range(m):
        one = time.perf_counter()
        wait(submit(i))
        trips.append((time.perf_counter() - one) * 1000)
    cuts = statistics.quantiles(trips, n=100)
    return {"rate": n / elapsed, "p50_ms": statistics.median(trips), "p99_ms": cuts[98]}


def celery() -> tuple[Submit, Wait]:
    from bench.peers.celery_results_app import echo

    return (lambda i: echo.apply_async(args=(i,))), (lambda r: r.get(timeout=TIMEOUT))


def rq() -> tuple[Submit, Wait]:
    import redis
    from rq import Queue

    from bench.peers.common import URL
    from bench.peers.rq_tasks import echo

    queue = Queue("bench-rt", connection=redis.Redis.from_url(URL))

    def wait(job: Any) -> Any:
        result = job.latest_result(timeout=TIMEOUT)  # blocks on the job's result stream
        if result is None or result.type != result.Type.SUCCESSFUL:
            raise RuntimeError(f"rq job {job.id} ended with {result}")
        return result.return_value

    return (lambda i: queue.enqueue(echo, i)), wait


def dramatiq() -> tuple[Submit, Wait]:
    from bench.peers.dramatiq_results_app import backend, echo

    def wait(message: Any) -> Any:
        return message.get_result(backend=backend, block=True, timeout=TIMEOUT * 1000)

    return (lambda i: echo.send(i)), wait


SYSTEMS: dict[str, Callable[[], tuple[Submit, Wait]]] = {
    "celery": celery,
    "rq": rq,
    "dramatiq": dramatiq,
}


def roundtrip(system: str, n: int, m: int) -> dict[str, float]:
    submit, wait = SYSTEMS[system]()
    return measure(submit, wait, n, m)
