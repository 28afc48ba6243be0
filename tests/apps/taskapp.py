"""Task functions for the task tests. Side effects are recorded in the Redis at
$TESTAPP_REDIS_URL, so that tests can see what ran in the workers and how often."""

from __future__ import annotations

import os
import signal
import time
from os import system  # noqa: F401 - imported, not defined here: `taskapp:*` must not allow it
from typing import Any

from testapp import client  # one Redis client per process for both test apps


def add(a: float, b: float) -> float:
    return a + b


def square(x: int) -> int:
    return x * x


def count(*items: Any) -> int:
    return len(items)


def job(job_id: int, value: int, *, scale: int = 1) -> dict[str, int]:
    """Seed 003's `Job(id, func, args, kwargs)`: a result that names its job."""
    return {"id": job_id, "result": value * scale, "pid": os.getpid()}


def sleep(seconds: float, tag: str = "") -> str:
    client().rpush("sleep:started", tag)
    time.sleep(seconds)
    return tag


def on_schedule(tag: str, *seconds: float) -> int:
    """The n-th run of `tag` (from 1) sleeps `seconds[n - 1]` (none past their end) and
    returns n: twins, the same message, that run differently, as real tasks do."""
    n = int(client().incr(f"on_schedule:{tag}"))
    time.sleep(seconds[n - 1] if n <= len(seconds) else 0)
    return n


def fail(text: str) -> None:
    client().rpush("fail:attempts", text)
    raise ValueError(text)


def not_json() -> object:
    return {1, 2, 3}


def kill_once(tag: str) -> str:
    """SIGKILLs its own worker on the first delivery of `tag`, succeeds on the next."""
    if client().incr(f"kill_once:{tag}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"survived {tag}"


def crash() -> None:
    """SIGKILLs its own worker every time, like a task that runs it out of memory."""
    os.kill(os.getpid(), signal.SIGKILL)


def runnable(a: int, b: int) -> int:
    """Seed 000's task module: `runnable`, `callback`, `error_callback`."""
    if b == 0:
        raise ZeroDivisionError("b is zero")
    if b < 0:
        time.sleep(10)
    return a // b


def callback(result: Any) -> None:
    client().rpush("callbacks:success", repr(result))


def error_callback(error: BaseException) -> None:
    client().rpush("callbacks:failure", f"{getattr(error, 'reason', '?')}|{error}")


def _private() -> str:
    return "private"


class NotAFunction:
    pass


async def asleep(seconds: float, tag: str = "") -> str:
    """An `async def` task: it waits without holding a thread."""
    import asyncio

    await asyncio.sleep(seconds)
    return tag
