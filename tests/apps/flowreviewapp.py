"""An async handler class that names its messages' groups (tests/test_review_flow.py)."""

from __future__ import annotations

import asyncio

from testapp import _MAX, _record, client


class AsyncTenants:
    """Raw payloads `<tenant>:<seconds>:<n>`, grouped by tenant through a plain `group()`;
    handled by a coroutine, which counts itself running per tenant."""

    def group(self, message: bytes) -> str:
        return message.split(b":", 1)[0].decode()

    async def handle(self, message: bytes) -> None:
        tenant, seconds, _ = message.split(b":", 2)
        c = client()
        key = f"flow:running:{tenant.decode()}"
        c.eval(_MAX, 1, f"flow:max:{tenant.decode()}", c.incr(key))
        try:
            await asyncio.sleep(float(seconds))
        finally:
            c.decr(key)
        _record("done", message)


class AwaitedGroups(AsyncTenants):
    """An `async def group()`: nothing could await it before a take."""

    async def group(self, message: bytes) -> str:  # type: ignore[override]
        return message.split(b":", 1)[0].decode()
