"""Handlers for the concurrency tests: `async def` and plain, recording like testapp.

Payload `<command>:<arg>[:unique]`: `sleep` waits (asyncio.sleep in the async handler,
time.sleep in the thread one), `block` holds the event loop with time.sleep, `raise` fails.
"""

from __future__ import annotations

import asyncio
import time

from testapp import _record


async def handle_async(message: bytes) -> None:
    _record("started", message)
    command, _, arg = message.partition(b":")
    arg = arg.split(b":")[0]
    if command == b"sleep":
        await asyncio.sleep(float(arg))
    elif command == b"block":  # a coroutine that never yields: it stalls the whole loop
        time.sleep(float(arg))
    elif command == b"raise":
        raise ValueError("boom from concapp")
    _record("done", message)


def handle_threads(message: bytes) -> None:
    _record("started", message)
    command, _, arg = message.partition(b":")
    arg = arg.split(b":")[0]
    if command == b"sleep":
        time.sleep(float(arg))
    elif command == b"raise":
        raise ValueError("boom from concapp")
    _record("done", message)


class AsyncLifecycle:
    """Async setup and callbacks, one of which raises: nothing may stall the loop."""

    async def setup(self) -> None:
        await asyncio.sleep(0)
        _record("lifecycle", b"setup")

    async def handle(self, message: bytes) -> None:
        await asyncio.sleep(0.01)
        if message == b"raise":
            raise ValueError("boom")

    async def on_success(self, message: bytes, result: object) -> None:
        raise RuntimeError("a broken callback")

    async def on_failure(self, message: bytes, error: BaseException) -> None:
        _record("lifecycle", b"on_failure")
