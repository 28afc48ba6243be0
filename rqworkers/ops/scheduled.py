"""`rqworkers scheduled list|run-now|delete`: the messages waiting for their time.

They are the members of the queue's retry set: delayed messages (`push --delay`, `at=`,
schedules' messages never are: those are pushed when they fire) and failed deliveries
waiting for their retry, which `list` tells apart. A message is named by its delivery id,
as `list` shows it. `run-now` makes it due at once and wakes a worker; `delete` removes it.
Each acts on a member only if it is still there: a worker that took it meanwhile has it,
and it is neither added back nor lost.
"""

from __future__ import annotations

import datetime
import time
from typing import TextIO

from rqworkers.common.text import plural
from rqworkers.config import PairSettings
from rqworkers.errors import RqworkersError
from rqworkers.ops.dead import preview
from rqworkers.ops.status import in_words
from rqworkers.store.delayed import RetrySet, Scheduled
from rqworkers.store.queue import connect


def open_retry_set(pair: PairSettings) -> RetrySet:
    return RetrySet(connect(pair.url, 0.0), pair.queue)


def stamp(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")


def summary(item: Scheduled, now: float) -> str:
    kind = "delayed" if item.delayed else f"retry, attempts {item.delivery.attempts}"
    level = item.delivery.level
    if item.due is None:
        when, kind = "waiting", f"priority {level}"
    else:
        when = f"due {stamp(item.due)} ({in_words(item.due, now)})"
        kind += f", priority {level}" if level else ""
    return (
        f"{item.delivery.id.decode(errors='replace')}  {when}  {kind}\n"
        f"    {len(item.delivery.payload)} bytes  {preview(item.delivery.payload)}"
    )


def list_scheduled(retry_set: RetrySet, limit: int, out: TextIO) -> None:
    items = retry_set.page(0, limit)
    total = len(retry_set)
    now = time.time()
    order = "highest priority first, then " if items and items[0].delivery.level else ""
    out.write(f"{retry_set.keys.retry}: {plural(total, 'message')}, {order}soonest first\n")
    for item in items:
        out.write(summary(item, now) + "\n")
    if total > len(items):  # never a silent cut
        out.write(f"... and {total - len(items)} more (--limit {total} lists them all)\n")


def chosen(retry_set: RetrySet, ids: list[str]) -> list[Scheduled]:
    """The members named by `ids`; an error naming those that are not there (any more)."""
    found = retry_set.find(ids)
    missing = sorted(set(ids) - {item.delivery.id.decode(errors="replace") for item in found})
    if missing:
        raise RqworkersError(
            f"not in {retry_set.keys.retry} (taken already, or never there): {', '.join(missing)}"
        )
    return found
