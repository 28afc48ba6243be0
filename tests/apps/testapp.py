"""Handlers for the integration tests. A payload's prefix says what the handler does.

Every handler records `started` (payload) and `started:pids` (pid) before it acts, and
`done` after it succeeds, in the Redis at $TESTAPP_REDIS_URL.
"""

from __future__ import annotations

import os
import signal
import time

import redis

from rqworkers.store.keys import Keys

_client: redis.Redis | None = None


def client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["TESTAPP_REDIS_URL"])
    return _client


def _record(key: str, message: bytes) -> None:
    pipe = client().pipeline()
    pipe.rpush(key, message)
    pipe.rpush(f"{key}:pids", os.getpid())
    pipe.execute()


class _UnprintableError(Exception):
    def __str__(self) -> str:
        return str(self.detail)  # type: ignore[attr-defined]  # never set: raises


def handle(message: bytes) -> None:
    _record("started", message)
    command, _, arg = message.partition(b":")
    arg = arg.split(b":")[0]  # anything after a second colon only makes the payload unique
    if command == b"sleep":
        time.sleep(float(arg))
    elif command == b"raise":
        raise ValueError("boom from testapp")
    elif command == b"badstr":  # an exception whose str() itself raises
        raise _UnprintableError()
    elif command == b"kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif command == b"killnode":  # like an OOM kill of the whole container
        _kill_node()
    elif command == b"steps":  # steps:<one letter per start>:<id>: r raise, k kill, n killnode
        step = client().lrange("started", 0, -1).count(message) - 1
        action = arg[step : step + 1]
        if action == b"r":
            raise ValueError(f"step {step + 1} of {message!r} raises")
        if action == b"k":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == b"n":
            _kill_node()
    elif command == b"swallow":  # a handler that tries to ignore its timeout
        try:  # noqa: SIM105 - written the way user code swallows errors
            time.sleep(float(arg))
        except Exception:
            pass
    elif command == b"stuck":  # like C code that never lets Python run a signal handler
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        time.sleep(float(arg))
    elif command == b"alloc":  # alloc:<MiB>:<seconds to hold it>
        size, _, hold = message.split(b":", 1)[1].partition(b":")
        block = bytearray(int(size) * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(float(hold or 0))
    elif command == b"grow":  # past the soft limit, pause, then past the hard one
        first = bytearray(120 * 1024 * 1024)
        for i in range(0, len(first), 4096):
            first[i] = 1
        time.sleep(1.0)
        second = bytearray(150 * 1024 * 1024)
        for i in range(0, len(second), 4096):
            second[i] = 1
        time.sleep(30)
    _record("done", message)


def _kill_node() -> None:
    os.kill(os.getppid(), signal.SIGKILL)  # the manager, whose keeper follows it
    os.kill(os.getpid(), signal.SIGKILL)


def broken(message: bytes) -> None:
    raise RuntimeError("always fails")


class Lifecycle:
    """A class handler whose callbacks misbehave: none of it may stall the worker."""

    def setup(self) -> None:
        client().rpush("lifecycle", f"setup:{os.getpid()}")

    def handle(self, message: bytes) -> bytes:
        _record("started", message)
        if message.startswith(b"raise"):
            raise ValueError("class handler failure")
        _record("done", message)
        return message.upper()

    def on_success(self, message: bytes, result: bytes) -> None:
        client().rpush("lifecycle", b"success:" + result)
        raise RuntimeError("on_success is broken")

    def on_failure(self, message: bytes, error: BaseException) -> None:
        client().rpush("lifecycle", f"failure:{error}")
        raise RuntimeError("on_failure is broken")

    def teardown(self) -> None:
        client().rpush("lifecycle", f"teardown:{os.getpid()}")


class FailingSetup:
    """A handler that can never start, like one whose database refuses it."""

    def setup(self) -> None:
        raise ConnectionRefusedError("the database said no")

    def handle(self, message: bytes) -> None:
        raise AssertionError("never reached")


class StuckCallback:
    """An on_success that blocks where Python cannot interrupt it, like C code."""

    def handle(self, message: bytes) -> None:
        _record("started", message)

    def on_success(self, message: bytes, result: object) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        time.sleep(60)


def refuse_the_ack(message: bytes) -> None:
    """Succeeds; a payload starting with `poison` then makes the worker's next take on queue
    `jobs` (which carries the ack) fail with WRONGTYPE before it changes anything, as a key
    of the wrong type does: the worker exits with code 74 after its handler returned, before
    the ack reached Redis. The owner key it breaks is set again by the next worker's replay.
    """
    _record("started", message)
    if message.startswith(b"poison"):
        for key in client().keys(Keys("jobs", "*").owner):
            pipe = client().pipeline()
            pipe.delete(key)
            pipe.rpush(key, b"not a string")
            pipe.execute()
    _record("done", message)


def end_after_handling(message: bytes) -> None:
    """As `refuse_the_ack`, for a worker on the fast path (prefetch 1, store/fast.py), whose
    ack is a plain LREM that no broken key of another kind refuses: a payload starting with
    `poison` ends the worker with exit code 74 once its work is done, before the ack."""
    _record("started", message)
    _record("done", message)
    if message.startswith(b"poison"):
        os._exit(74)


def to_file(message: bytes) -> None:
    """Appends the payload as a line to $TESTAPP_OUT: a record that needs no Redis, which
    may be out of memory."""
    with open(os.environ["TESTAPP_OUT"], "ab") as out:
        out.write(message + b"\n")


# The most `flow:running` reached: compared and set in one step, whatever runs beside it.
_MAX = (
    "local n = tonumber(ARGV[1]) "
    "if n > tonumber(redis.call('GET', KEYS[1]) or '0') then redis.call('SET', KEYS[1], n) end"
)


def measure(message: bytes) -> None:
    """`<seconds>:<id>`: count itself running (`flow:running`, its peak in `flow:max`),
    note its start time in `flow:starts`, sleep, and record `done`."""
    c = client()
    running = c.incr("flow:running")
    c.eval(_MAX, 1, "flow:max", running)
    c.rpush("flow:starts", repr(time.time()))
    c.rpush("flow:pids", os.getpid())
    try:
        time.sleep(float(message.split(b":")[0]))
    finally:
        c.decr("flow:running")
    _record("done", message)


def measure_json(message: bytes) -> None:
    """`{"kwargs": {"tenant": t}, "seconds": s}`: as `measure`, counted per tenant too."""
    import json

    data = json.loads(message)
    c = client()
    key = f"flow:running:{data['kwargs']['tenant']}"
    c.eval(_MAX, 1, f"flow:max:{data['kwargs']['tenant']}", c.incr(key))
    try:
        time.sleep(float(data["seconds"]))
    finally:
        c.decr(key)
    _record("done", message)


class Tenants:
    """Raw payloads `<tenant>:<seconds>:<n>`, grouped by tenant through `group()`."""

    def group(self, message: bytes) -> str:
        return message.split(b":", 1)[0].decode()

    def handle(self, message: bytes) -> None:
        tenant, seconds, _ = message.split(b":", 2)
        c = client()
        key = f"flow:running:{tenant.decode()}"
        c.eval(_MAX, 1, f"flow:max:{tenant.decode()}", c.incr(key))
        try:
            time.sleep(float(seconds))
        finally:
            c.decr(key)
        _record("done", message)


def arrival(message: bytes) -> None:
    """Records when each message reached a handler: `arrived` gets `<epoch time> <payload>`."""
    client().rpush("arrived", b"%r %s" % (time.time(), message))
