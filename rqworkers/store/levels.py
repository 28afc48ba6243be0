"""Priority levels: messages pushed with `priority=1..9` wait in the queue's retry set,
in bands of scores below 0 that a take reads highest first (see lua/levels.lua).

Level 0 is the shared list, and the retry set's scores from 0 up (retries and delayed
messages of plain pushes, due at epoch seconds): a queue with no prioritised message pays
nothing, and a plain `LPUSH` is level 0. Band L is `[-L * LEVEL_BAND, -(L-1) * LEVEL_BAND)`:
a member due at epoch ms `ms` (a retry, a delayed message) scores `-L * LEVEL_BAND + ms`,
and a waiting one the band's top, `-(L-1) * LEVEL_BAND - 1`, always due, in the order of its
id, `q<epoch µs><random>.<n>`.

A prioritised message carries its level before its payload, `rqw1:prio:<L>:<payload>`, so
that the level survives every move (retries, replays, reclaims, give-backs); the worker
takes it off before the handler sees the payload (`queue.Delivery`), and the dead list
keeps the payload without it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, cast

from rqworkers.store.connections import Client
from rqworkers.store.scripts import LEVEL_BAND, PREFIX

LEVELS = range(0, 10)
HEAD = f"{PREFIX}prio:".encode()
_WRAP_LEN = len(HEAD) + 2  # `rqw1:prio:` and `<L>:`


def check(priority: object) -> int:
    """`priority` if it is an int from 0 to 9; else `ValueError`, in one line."""
    if not isinstance(priority, int) or isinstance(priority, bool) or priority not in LEVELS:
        raise ValueError(f"priority must be an integer from 0 to 9, not {priority!r}")
    return priority


def wrap(level: int, payload: bytes) -> bytes:
    """`payload` as a message of `level` carries it (level 0: as it is)."""
    return b"%s%d:%s" % (HEAD, level, payload) if level else payload


def unwrap(payload: bytes) -> tuple[int, bytes]:
    """(level, payload) of what `wrap` made; (0, payload) for anything else."""
    if payload.startswith(HEAD) and payload[_WRAP_LEN - 1 : _WRAP_LEN] == b":":
        digit = payload[len(HEAD) : len(HEAD) + 1]
        if b"1" <= digit <= b"9":
            return int(digit), payload[_WRAP_LEN:]
    return 0, payload


def waiting_score(level: int) -> int:
    """The score of a message of `level` (1 to 9) that waits, due at once."""
    return -(level - 1) * LEVEL_BAND - 1


def due_score(level: int, due: float) -> float:
    """The score of a member of `level` due at `due` (epoch seconds): `due` for level 0.
    A band counts whole milliseconds, rounded up: rounded down, a take in the millisecond
    before `due` (`due_by_level` compares whole milliseconds) ran the message early."""
    if level == 0:
        return due
    ms = min(max(0, math.ceil(due * 1000)), LEVEL_BAND - 2)
    return float(-level * LEVEL_BAND + ms)


def level_of_score(score: float) -> int:
    """The level of a member scored `score`: 9 for any below the bands (written by hand)."""
    return 0 if score >= 0 else min(9, math.ceil(-score / LEVEL_BAND))


def due_of_score(score: float) -> float | None:
    """When a member scored `score` is due, epoch seconds; None for a waiting one."""
    level = level_of_score(score)
    if level == 0:
        return score
    ms = score + level * LEVEL_BAND
    return None if ms >= LEVEL_BAND - 1 else ms / 1000


def waiting_id_base(token: str) -> str:
    """The id base of one prioritised push's waiting messages: ids order by push time, then
    by their place in the push (`token`: random hex, so that ids of pushes at the same µs
    differ)."""
    return f"q{time.time_ns() // 1000:016d}{token}."


@dataclass(frozen=True)
class Bands:
    """What the bands of a retry set hold: messages waiting there (prioritised, due at once),
    and when the soonest member of the whole set that is not waiting is due."""

    waiting: int
    next_due: float | None  # epoch seconds


def read_bands(client: Client, retry: str) -> Bands:
    """The bands of `retry`, read in one round trip (call it when its first score is < 0)."""
    pipe = client.pipeline(transaction=False)
    for level in LEVELS[1:]:
        top = waiting_score(level)
        pipe.zcount(retry, top, top)
        pipe.zrangebyscore(retry, -level * LEVEL_BAND, f"({top}", 0, 1, withscores=True)
    pipe.zrangebyscore(retry, 0, "+inf", 0, 1, withscores=True)
    replies = cast(list[Any], pipe.execute())
    waiting = sum(int(n) for n in replies[0:-1:2])
    firsts = [*replies[1:-1:2], replies[-1]]
    dues = [due_of_score(float(first[0][1])) for first in firsts if first]
    soonest = [d for d in dues if d is not None]
    return Bands(waiting, min(soonest) if soonest else None)
