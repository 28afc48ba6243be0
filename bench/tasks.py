"""The task of the Executor round-trip bench: as cheap as a task can be, so that what is
timed is the trip (submit, queue, worker, reply, future), not the work."""

from __future__ import annotations

from typing import Any


def echo(value: Any) -> Any:
    return value
