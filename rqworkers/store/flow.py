"""Flow control's keys: the pause, the `max_running` permits and the rate window's log.

Limits are enforced inside the TAKE script (lua/take.lua), atomically with the take: a
worker takes only what the limits allow now, so a message held back waits in the shared
list, uncharged and in its place, where any worker can take it. This module holds what
the other processes need: the limits a worker passes to TAKE, pausing and resuming a queue,
and reading how much of each limit is in use (for `status`, the page and `/metrics`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

from rqworkers.common.rates import Rate
from rqworkers.store.connections import Client
from rqworkers.store.keys import Keys

RESUME_TOKENS = 100  # wake tokens a resume pushes: every waiting worker of a queue, at most


@dataclass(frozen=True)
class Limits:
    """A queue's limits as its workers enforce them; 0 / None: none."""

    max_running: int = 0
    rate: Rate | None = None

    @property
    def any(self) -> bool:
        return bool(self.max_running or self.rate)


NO_LIMITS = Limits()


def pause(client: Client, queue: str, by: str) -> bool:
    """Pause `queue`: no worker starts a message of it until `resume`. False if it was
    paused already (the first pause's record is kept)."""
    record = json.dumps({"by": by, "at": time.time()})
    return bool(client.set(Keys(queue).paused, record, nx=True))


def resume(client: Client, queue: str) -> bool:
    """Let the workers of `queue` start messages again, waking those that wait at once.
    False if it was not paused."""
    keys = Keys(queue)
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.paused)
    pipe.lpush(keys.wake, *["1"] * RESUME_TOKENS)
    pipe.ltrim(keys.wake, 0, RESUME_TOKENS - 1)
    pipe.pexpire(keys.wake, 2000)
    return bool(pipe.execute()[0])


@dataclass(frozen=True)
class FlowState:
    """How much of its limits a queue uses now."""

    paused: dict[str, Any] | None  # who paused it and when, if it is paused
    running: int  # `max_running` permits held, across every worker
    started: int  # handler starts in the current rate window (0 without a rate limit)


def flow_state(client: Client, queue: str, rate: Rate | None) -> FlowState:
    """One read of a queue's pause and limits, in one round trip."""
    keys = Keys(queue)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.paused)
    pipe.hvals(keys.permits)
    if rate is not None:
        pipe.time()
    found = cast(list[Any], pipe.execute())
    paused = _record(found[0])
    running = sum(int(n) for n in found[1])
    started = 0
    if rate is not None:
        seconds, micros = found[2]
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        started = int(client.zcount(keys.starts, now_ms - rate.seconds * 1000, "+inf"))
    return FlowState(paused, running, started)


def _record(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"by": "?", "at": None}  # set by hand: paused all the same
    return value if isinstance(value, dict) else {"by": "?", "at": None}
