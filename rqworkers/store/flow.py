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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from rqworkers.common.rates import Rate
from rqworkers.store.connections import Client
from rqworkers.store.keys import Keys

# Seconds the permits of a worker whose list was taken over stay counted, when its process
# may still run: orphaned by a manager SIGKILLed alone, or frozen. Its freeze watch ends it
# within a tick (0.2 s) of seeing its list taken over (worker/freeze.py); this covers that
# tick and a round trip, so that it never runs beside those who got its permits.
PERMIT_HOLD = 1.0
RESUME_TOKENS = 100  # wake tokens a resume pushes: every waiting worker of a queue, at most
# A start is logged when its message is taken, a moment before its handler starts: each
# stays in the window this much longer, so that no window of handler starts holds N + 1.
# (At full speed, "N/s" then allows N starts every 1.05 s.)
RATE_MARGIN_MS = 50
MAX_EPOCH = 1e11  # seconds: a pause's time past this (year 5138) is no time


@dataclass(frozen=True)
class Limits:
    """A queue's limits as its workers enforce them; 0 / None: none."""

    max_running: int = 0
    rate: Rate | None = None
    group_by: str = ""  # a dotted path into JSON payloads: the queue has groups
    # A handler's `group(message)`, when it names the groups instead (the worker sorts).
    grouper: Callable[[bytes], str] | None = None
    group_max_running: int = 0
    group_rate: Rate | None = None

    @property
    def any(self) -> bool:
        """Whether a limit may hold a take back (groups share fairly even without one)."""
        return bool(self.max_running or self.rate or self.group_max_running or self.group_rate)

    @property
    def sorter(self) -> str:
        """Who sorts messages into groups: 'redis' (TAKE, by `group_by`), 'worker' (by its
        handler's `group()`, through SORT), '' when the queue has no groups."""
        return "redis" if self.group_by else "worker" if self.grouper else ""

    @property
    def window_ms(self) -> int:
        """How long a start counts against the rate limit, in ms; 0 without one."""
        return _window_ms(self.rate)

    @property
    def group_window_ms(self) -> int:
        return _window_ms(self.group_rate)


def _window_ms(rate: Rate | None) -> int:
    return rate.seconds * 1000 + RATE_MARGIN_MS if rate else 0


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
    """A queue's pause and limits, and how much of each is in use now."""

    paused: dict[str, Any] | None = None  # who paused it and when, if it is paused
    running: int = 0  # `max_running` permits held, across every worker
    max_running: int = 0  # 0: no such limit
    started: int = 0  # handler starts in the current rate window
    rate_limit: str = ""  # "100/s"; "" without one
    rate_starts: int = 0  # the N of the rate limit
    groups: list[GroupState] = field(default_factory=list)  # the busiest, with groups
    grouped_waiting: int = 0  # messages waiting in the groups' lists (sorted, not taken)
    groups_full: bool = False  # every group with messages waiting is held back by a limit
    groups_held_by: list[str] = field(default_factory=list)  # the group limits that do it
    group_max_running: int = 0  # each group's limit; 0: none
    group_rate_limit: str = ""  # each group's rate limit, "50/m"; "" without one

    @property
    def binding(self) -> bool:
        """Whether the pause or a limit lets nothing start now."""
        return bool(self.held_by)

    @property
    def held_by(self) -> list[str]:
        """What lets nothing start now, by its setting's name: `paused`, `max_running`
        (every permit in use), `rate_limit` (the window is full); empty if none does."""
        reasons = []
        if self.paused is not None:
            reasons.append("paused")
        if self.max_running and self.running >= self.max_running:
            reasons.append("max_running")
        if self.rate_starts and self.started >= self.rate_starts:
            reasons.append("rate_limit")
        if self.groups_full:
            reasons += self.groups_held_by or ["group_max_running"]
        return reasons


@dataclass(frozen=True)
class GroupState:
    """One group of a queue with `group_by`: its messages waiting and in a handler."""

    name: str  # as the payloads spell it ('' is the default group), undecodable bytes escaped
    waiting: int
    running: int
    oldest_age: float | None  # seconds its oldest waiting message has waited since sorted in


BUSIEST = 10  # groups shown, the most waiting first
GROUPS_READ = 1000  # groups whose lengths one round trip reads


@dataclass(frozen=True)
class Groups:
    """What `group_states` read: the busiest groups, and what the rest add up to."""

    busiest: list[GroupState]
    waiting: int  # in every group's list read
    full: bool  # every group with messages waiting is held back, by its max or its rate
    held_by: list[str] = field(default_factory=list)  # which group limits hold some back


def group_states(
    client: Client,
    queue: str,
    group_max: int = 0,
    now: float | None = None,
    group_rate: Rate | None = None,
) -> Groups:
    """The busiest groups of `queue` (most waiting first), and their totals over every
    group with messages waiting: `waiting` is what `status`, `/metrics` and an autoscaler
    read, so it must not stop at the first groups. Two round trips, and one more per
    GROUPS_READ groups (one, for a queue without groups). A group is held back at
    `group_max` running, or with its `group_rate` window used (read by this machine's
    clock: for display, not for enforcing)."""
    keys = Keys(queue)
    ring = cast(list[bytes], client.lrange(keys.ring, 0, -1))  # one read: it turns meanwhile
    if not ring:
        return Groups([], 0, False)
    prefix = keys.group_list.encode()  # a group's name is any bytes: keys are built as bytes
    starts_prefix = keys.group_starts.encode()
    now = time.time() if now is None else now
    since = int(now * 1000) - _window_ms(group_rate)
    table: list[tuple[bytes, int, int]] = []
    held: list[set[str]] = []  # for each group with messages waiting: what holds it back
    for at in range(0, len(ring), GROUPS_READ):
        names = ring[at : at + GROUPS_READ]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.llen(prefix + name)
        if group_rate is not None:
            for name in names:
                pipe.zcount(starts_prefix + name, since, "+inf")
        pipe.hmget(keys.group_running, names)
        *counts, running_raw = cast(list[Any], pipe.execute())
        lengths, started = counts[: len(names)], counts[len(names) :] or [0] * len(names)
        running = [int(n or 0) for n in running_raw]
        for waiting, run, begun in zip(lengths, running, started, strict=True):
            if waiting:
                by = {"group_max_running"} if group_max and run >= group_max else set()
                if group_rate is not None and begun >= group_rate.starts:
                    by.add("group_rate_limit")
                held.append(by)
        table += zip(names, lengths, running, strict=True)
    full = bool(held) and all(held)
    held_by = [n for n in ("group_max_running", "group_rate_limit") if any(n in b for b in held)]
    busiest = sorted(table, key=lambda x: -x[1])[:BUSIEST]
    pipe = client.pipeline(transaction=False)
    for name, _, _ in busiest:
        pipe.lindex(prefix + name, -1)
    oldest = cast(list[Any], pipe.execute())
    states = [
        GroupState(name.decode("utf-8", "backslashreplace"), waiting, run, _age(first, now))
        for (name, waiting, run), first in zip(busiest, oldest, strict=True)
    ]
    return Groups(states, sum(w for _, w, _ in table), full, held_by if full else [])


def _age(element: bytes | None, now: float) -> float | None:
    """Seconds since a group list's element (`<ms>|<payload>`) was sorted in."""
    if not element:
        return None
    stamp, _, _ = element.partition(b"|")
    return max(0.0, now - int(stamp) / 1000) if stamp.isdigit() else None


Pipeline = Any  # a redis-py pipeline, plain or cluster


def flow_reader(
    pipe: Pipeline, queue: str, limits: Limits
) -> Callable[[list[Any]], tuple[FlowState, list[Any]]]:
    """Queue the reads of `queue`'s flow state on `pipe`; returns what reads their replies
    off the front of the pipeline's results (the state, and the results after them)."""
    keys = Keys(queue)
    pipe.get(keys.paused)
    pipe.hvals(keys.permits)
    rate = limits.rate
    if rate is not None:  # by this machine's clock: for display, not for enforcing
        pipe.zcount(keys.starts, int(time.time() * 1000) - limits.window_ms, "+inf")

    def read(results: list[Any]) -> tuple[FlowState, list[Any]]:
        count = 3 if rate is not None else 2
        found, rest = results[:count], results[count:]
        state = FlowState(
            paused=_record(found[0]),
            running=sum(int(n) for n in found[1]),
            max_running=limits.max_running,
            started=int(found[2]) if rate is not None else 0,
            rate_limit=str(rate) if rate is not None else "",
            rate_starts=rate.starts if rate is not None else 0,
            group_max_running=limits.group_max_running,
            group_rate_limit=str(limits.group_rate) if limits.group_rate is not None else "",
        )
        return state, rest

    return read


def flow_state(client: Client, queue: str, limits: Limits = NO_LIMITS) -> FlowState:
    """One read of a queue's pause and limits, in one round trip."""
    pipe = client.pipeline(transaction=False)
    read = flow_reader(pipe, queue, limits)
    return read(cast(list[Any], pipe.execute()))[0]


def _record(raw: bytes | None) -> dict[str, Any] | None:
    """Who paused the queue and when, `{by: text, at: epoch seconds or None}`. The key is
    any client's to write: whatever it holds, the queue is paused, and what is not text
    and a plausible time (`NaN`, `1e300`, a list) is left out, rather than make the
    page's JSON unparsable or `status` fail to print a date."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None  # set by hand: paused all the same
    if not isinstance(value, dict):
        return {"by": "?", "at": None}
    by, at = value.get("by"), value.get("at")
    plausible = isinstance(at, int | float) and not isinstance(at, bool) and 0 <= at < MAX_EPOCH
    return {"by": by if isinstance(by, str) else "?", "at": at if plausible else None}
