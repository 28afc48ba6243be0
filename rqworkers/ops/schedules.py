"""Schedules: the `[[schedules]]` of the config, fired by every manager's keeper, enqueued
once.

No leader: every keeper computes the same fire times from the same watermark (the last
fire time claimed, `<queue>:schedules` in Redis) and tries to move it with one script that
also pushes the messages (`scripts.FIRE`, compare-and-set). One succeeds; the others find
the watermark moved and push nothing. A keeper that dies mid-way has either moved it and
pushed, or done neither: a fire is never lost to a dead leader nor doubled by two live
ones. The first keeper to see a new schedule sets its watermark to the present: its fires
count from then on.

Fire times come from `cronsim` (a cron expression in the schedule's time zone: daylight
saving follows the zone's rules, as Debian's cron does: a time skipped in spring fires at
the end of the gap, a time repeated in autumn fires once) or from `every` (seconds after
the watermark). Fires later than `MISSED_AFTER` are *missed*, as after a downtime with no
manager running; `catch_up` says what becomes of those: `none` drops them, `last` sends
the newest one (one message standing for them all), `all` sends them all, at most
`CATCH_UP_ALL` (the newest).

A task schedule's message has the id `<name>@<fire time, epoch seconds>`: the same for
every manager, so a handler can tell one fire from another.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO, cast

import cronsim

from rqworkers.client import tasks
from rqworkers.client.producer import Producer
from rqworkers.config import CATCH_UP_ALL, Config, ScheduleSettings
from rqworkers.store import scripts
from rqworkers.store.connections import Client, connect
from rqworkers.store.direct import script_caller
from rqworkers.store.keys import Keys
from rqworkers.store.outage import REDIS_ERRORS, explain, is_outage
from rqworkers.store.queue import Bound

log = logging.getLogger(__name__)

MISSED_AFTER = 5.0  # seconds late after which a fire counts as missed (see catch_up)
CHECK_EVERY = 1.0  # seconds between reads of a watermark that another manager may move
CLOCK_AHEAD = 5.0  # seconds a manager's clock may run ahead of Redis's and still claim fires


class ClockAheadError(RuntimeError):
    """This manager's clock runs ahead of Redis's: it claims no fire time (see lua/fire.lua)."""


@dataclass(frozen=True)
class Plan:
    """What to do now about a schedule whose watermark is `last`."""

    fires: list[float]  # the fire times to enqueue, oldest first
    upto: float | None  # the new watermark; None: nothing is due


def fire_times(schedule: ScheduleSettings, after: float, upto: float) -> list[float]:
    """The newest `CATCH_UP_ALL` fire times in (after, upto], oldest first."""
    if schedule.every is not None:
        count = math.floor((upto - after) / schedule.every)
        first = max(1, count - CATCH_UP_ALL + 1)
        return [after + k * schedule.every for k in range(first, count + 1)]
    found: list[float] = []
    for moment in _cron(schedule, upto + 1.0, reverse=True):
        at = moment.timestamp()
        if at <= after or len(found) == CATCH_UP_ALL:
            break
        if at <= upto:
            found.append(at)
    return found[::-1]


def next_fire(schedule: ScheduleSettings, after: float) -> float:
    """The first fire time after `after`."""
    if schedule.every is not None:
        return after + schedule.every
    return next(_cron(schedule, after, reverse=False)).timestamp()


def _cron(schedule: ScheduleSettings, start: float, reverse: bool) -> Iterator[datetime.datetime]:
    zone = zoneinfo.ZoneInfo(schedule.timezone)
    # cronsim counts from whole seconds: from `start` rounded away from the search.
    whole = math.floor(start) if reverse else math.floor(start) + 1
    moment = datetime.datetime.fromtimestamp(whole, zone)
    return iter(cronsim.CronSim(cast(str, schedule.cron), moment, reverse=reverse))


def plan(schedule: ScheduleSettings, last: float, now: float) -> Plan:
    """The fires due by `now` since the watermark `last`, as `catch_up` keeps them."""
    due = fire_times(schedule, last, now)
    if not due:
        return Plan([], None)
    upto = due[-1]  # the newest: the watermark, even when fewer than all are sent
    on_time = [at for at in due if now - at <= MISSED_AFTER]
    missed = [at for at in due if now - at > MISSED_AFTER]
    if schedule.catch_up == "all":
        return Plan(due, upto)
    if schedule.catch_up == "last" and missed:
        return Plan([missed[-1], *on_time], upto)
    return Plan(on_time, upto)


def message(schedule: ScheduleSettings, at: float) -> bytes:
    """What one fire pushes: the raw payload, or a task message with id `<name>@<at>`."""
    if schedule.payload is not None:
        return schedule.payload.encode()
    task = Producer.task(
        cast(str, schedule.task),
        schedule.args,
        schedule.kwargs,
        task_id=f"{schedule.name}@{at!r}",
    )
    return tasks.encode(task)


class Scheduler:
    """Fires the schedules of one config, from a keeper's loop (`tick`)."""

    def __init__(self, schedules: tuple[ScheduleSettings, ...], timeout: float) -> None:
        self.schedules = schedules
        self.clients: dict[str, Client] = {}
        for schedule in schedules:
            if schedule.url not in self.clients:
                self.clients[schedule.url] = connect(schedule.url, timeout=timeout)
        runner = {url: script_caller(client, False) for url, client in self.clients.items()}
        self._fire = {s.name: Bound(runner[s.url], Keys(s.queue), scripts.FIRE) for s in schedules}
        self.next_check = {s.name: 0.0 for s in schedules}  # wall clock
        self.failing: dict[str, str] = {}  # schedule name → the error last logged

    def next_due(self) -> float:
        """When the next schedule should be looked at, wall clock; inf if there is none."""
        return min(self.next_check.values(), default=math.inf)

    def tick(self, now: float) -> None:
        for schedule in self.schedules:
            if now >= self.next_check[schedule.name]:
                try:
                    self.next_check[schedule.name] = self.fire(schedule, now)
                    self.failing.pop(schedule.name, None)
                except Exception as exc:  # the keeper holds the leases: it must go on
                    outage = isinstance(exc, REDIS_ERRORS) and is_outage(exc)
                    self.next_check[schedule.name] = now + (1.0 if outage else 30.0)
                    cause = explain(exc) if isinstance(exc, REDIS_ERRORS) else repr(exc)
                    if isinstance(exc, ClockAheadError):  # says it all, and the same each time
                        cause = str(exc)
                    if self.failing.get(schedule.name) != cause:
                        self.failing[schedule.name] = cause
                        log.error("schedule %s: cannot fire: %s", schedule.name, cause)

    def fire(self, schedule: ScheduleSettings, now: float) -> float:
        """Claim and push what is due; when to look again (wall clock)."""
        client = self.clients[schedule.url]
        raw = cast(bytes | None, client.hget(Keys(schedule.queue).schedules, schedule.name))
        if raw is None:
            self._claim(schedule, "", now, [])
            return now  # read back whichever start won
        last = float(raw)
        todo = plan(schedule, last, now)
        if todo.upto is None:
            return min(next_fire(schedule, last), now + CHECK_EVERY)
        payloads = [message(schedule, at) for at in todo.fires]
        claimed = self._claim(schedule, raw.decode(), todo.upto, payloads)
        if claimed:
            skipped = len(fire_times(schedule, last, now)) - len(todo.fires)
            log.info(
                "schedule %s: enqueued %d fire(s) on %s%s",
                schedule.name,
                len(todo.fires),
                schedule.queue,
                f" ({skipped} missed, dropped: catch_up = {schedule.catch_up})" if skipped else "",
            )
        return now if not claimed else min(next_fire(schedule, todo.upto), now + CHECK_EVERY)

    def _claim(
        self, schedule: ScheduleSettings, last: str, upto: float, payloads: list[bytes]
    ) -> bool:
        """Move the watermark from `last` to `upto` and push `payloads`; whether this call
        did. `ClockAheadError` if `upto` is ahead of Redis's clock: early fires, and a watermark
        in the future that would silence the schedule for every manager with a right clock."""
        claimed = self._fire[schedule.name](
            name=schedule.name, last=last, upto=repr(upto), ahead=CLOCK_AHEAD, payloads=payloads
        )
        if claimed < 0:
            raise ClockAheadError(
                f"this manager's clock runs more than {CLOCK_AHEAD:g}s ahead of Redis's: "
                "it fires nothing until they agree (NTP?)"
            )
        return bool(claimed)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


# -- `rqworkers schedules` ---------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleStatus:
    name: str
    queue: str
    host: str  # redacted URL
    rule: str  # "cron 0 3 * * * Europe/Berlin" or "every 300s"
    catch_up: str
    last_fire: float | None
    next_fire: float | None
    error: str | None = None


def collect(config: Config, now: float | None = None) -> list[ScheduleStatus]:
    """Each schedule with its last and next fire time, read from Redis."""
    now = time.time() if now is None else now
    found = []
    clients: dict[str, Client] = {}
    for s in config.schedules:
        rule = f"cron {s.cron} {s.timezone}" if s.cron else f"every {s.every:g}s"
        try:
            client = clients.get(s.url) or clients.setdefault(s.url, connect(s.url, 0.0))
            raw = client.hget(Keys(s.queue).schedules, s.name)
        except REDIS_ERRORS as exc:
            failed = ScheduleStatus(s.name, s.queue, s.endpoint, rule, s.catch_up, None, None)
            found.append(dataclasses.replace(failed, error=explain(exc)))
            continue
        last = float(cast(bytes, raw)) if raw else None
        coming = next_fire(s, now if last is None else last)
        if coming < now - MISSED_AFTER:  # missed, no manager running: catch_up decides
            coming = next_fire(s, now)
        found.append(ScheduleStatus(s.name, s.queue, s.endpoint, rule, s.catch_up, last, coming))
    for client in clients.values():
        client.close()
    return found


def as_dicts(statuses: list[ScheduleStatus]) -> list[dict[str, Any]]:
    return [vars(s).copy() for s in statuses]


def _stamp(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def write_text(statuses: list[ScheduleStatus], out: TextIO) -> None:
    if not statuses:
        out.write("no [[schedules]] in the config\n")
    for s in statuses:
        out.write(f"{s.name}  → {s.queue} on {s.host}  {s.rule}  catch_up {s.catch_up}\n")
        if s.error:
            out.write(f"    unreachable: {s.error}\n")
        else:
            out.write(f"    last fire {_stamp(s.last_fire)}  next fire {_stamp(s.next_fire)}\n")
