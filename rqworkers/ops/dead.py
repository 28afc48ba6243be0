"""`rqworkers dead list|show|requeue|purge`: look at and act on dead-lettered messages.

Every change goes through one Lua script per batch (`scripts.DEAD_TAKE`), so it is atomic
with respect to running workers, and an interrupted command leaves each message either
where it was or where it was going, never lost.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from rqworkers.common.text import printable, quoted
from rqworkers.config import Config, PairSettings
from rqworkers.errors import RqworkersError
from rqworkers.store.queue import DeadLetter, DeadLetters, connect

PREVIEW_BYTES = 60
BATCH = 100  # messages per atomic step of `requeue` and `purge` without indexes


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on: given indexes, or the `limit` oldest."""

    indexes: list[int]
    limit: int | None  # None: all


def pick_pair(config: Config, queue: str | None) -> PairSettings:
    """The pair named by `--queue`; optional when the config has a single queue."""
    if queue is None:
        if len(config.pairs) == 1:
            return config.pairs[0]
        names = ", ".join(p.queue for p in config.pairs)
        raise RqworkersError(f"several queues are configured; choose one with --queue ({names})")
    matches = [p for p in config.pairs if p.queue == queue]
    if not matches:
        raise RqworkersError(f"queue {queue!r} is not in {config.source}")
    return matches[0]


def open_dead_letters(pair: PairSettings) -> DeadLetters:
    return DeadLetters(connect(pair.url, 0.0), pair.queue)


def list_letters(dead: DeadLetters, limit: int, out: TextIO) -> None:
    letters = dead.page(0, limit)
    total = len(dead)
    out.write(f"{dead.keys.dead}: {total} message(s), newest first\n")
    for letter in letters:
        out.write(summary(letter) + "\n")
    if total > len(letters):  # never a silent cut: say what is left and how to see it
        out.write(f"... and {total - len(letters)} more (--limit {total} lists them all)\n")


def summary(letter: DeadLetter) -> str:
    info = letter.info or {}
    when = info.get("at")
    stamp = (
        datetime.datetime.fromtimestamp(float(when), datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        if when
        else "?"
    )
    reason = info.get("reason", "reason unknown" if letter.info is not None else "no record")
    # The record is data a worker wrote from an exception: escaped, as the payload is.
    attempts = printable(str(info.get("attempts", "?")))
    text = (
        f"[{letter.index}] {len(letter.payload)} bytes  {preview(letter.payload)}\n"
        f"    attempts {attempts}, {stamp}, {printable(str(reason))}"
    )
    if letter.copies > 1:  # identical payloads: each copy has its own record (most recent)
        text += f"\n    one of {letter.copies} copies of this payload in the dead list"
    return text


def preview(payload: bytes) -> str:
    """The first bytes, escaped so that binary payloads cannot garble a terminal."""
    head = repr(payload[:PREVIEW_BYTES])
    return head + ("…" if len(payload) > PREVIEW_BYTES else "")


def show(dead: DeadLetters, index: int, raw: bool, out: TextIO, raw_out: BinaryIO) -> None:
    letter = dead.get(index)
    if letter is None:
        raise RqworkersError(f"no dead letter at index {index} (there are {len(dead)})")
    if raw:
        raw_out.write(letter.payload)
        raw_out.flush()
        return
    out.write(summary(letter) + "\n")
    out.write(repr(letter.payload) + "\n")
    traceback = (letter.info or {}).get("traceback")
    if traceback:
        out.write(quoted(str(traceback)))  # text from Redis, which any client can write


def act_on(
    dead: DeadLetters,
    selection: Selection,
    action: Callable[[list[DeadLetter]], int],
) -> int:
    """Apply `action` (requeue or purge) to the selection in atomic batches; return count."""
    if selection.indexes:
        found = {i: dead.get(i) for i in sorted(set(selection.indexes))}
        missing = [i for i, letter in found.items() if letter is None]
        if missing:
            raise RqworkersError(f"no dead letter at index {missing} (there are {len(dead)})")
        return action([letter for letter in found.values() if letter is not None])
    # Requeued batches go to the head of the queue, so the newest batch must go first for the
    # oldest dead letter to end up first in line.
    if selection.limit is not None:
        window = dead.oldest(selection.limit)  # newest first
        return sum(action(window[i : i + BATCH]) for i in range(0, len(window), BATCH))
    # "All" means all there were when the command started, not those dead-lettered meanwhile:
    # new ones arrive at the head, so those that were there are always the `remaining`
    # oldest; each batch is the newest of them.
    done, remaining = 0, len(dead)
    while remaining > 0:
        batch = dead.page(max(0, len(dead) - remaining), min(BATCH, remaining))
        moved = action(batch) if batch else 0
        if moved == 0:
            break
        done, remaining = done + moved, remaining - moved
    return done
