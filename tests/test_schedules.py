"""Schedules: fire times (cron in a zone, or every N seconds), catch_up, the config's checks,
and, with real managers sharing one Redis, each fire time enqueued exactly once."""

from __future__ import annotations

import datetime
import itertools
import json
import signal
import time
import urllib.request
import zoneinfo
from pathlib import Path
from typing import Any, cast

import pytest

from rqworkers import config
from rqworkers.config import ScheduleSettings
from rqworkers.ops.schedules import MISSED_AFTER, fire_times, next_fire, plan
from rqworkers.store.keys import Keys
from tests.support import (
    RedisServer,
    firing_managers,
    free_port,
    run_cli,
    wait_for,
    write_config,
)

BERLIN = "Europe/Berlin"


def schedule(**fields: Any) -> ScheduleSettings:
    values = {"name": "s", "host": "local", "queue": "q", "payload": "x", **fields}
    return ScheduleSettings.model_validate(values)


def local(text: str) -> float:
    """Epoch seconds of a wall-clock time in Berlin."""
    zone = zoneinfo.ZoneInfo(BERLIN)
    return datetime.datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def berlin(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, zoneinfo.ZoneInfo(BERLIN)).isoformat()


# -- fire times ----------------------------------------------------------------------------


def test_cron_fires_follow_the_zone_through_daylight_saving() -> None:
    nightly = schedule(cron="30 2 * * *", timezone=BERLIN)
    # 2026-03-29: clocks jump from 02:00 to 03:00, so 02:30 does not exist; it fires once,
    # at the end of the gap. 2026-10-25: 02:30 happens twice; it fires once.
    spring = fire_times(nightly, local("2026-03-28T12:00"), local("2026-03-30T12:00"))
    assert [berlin(t) for t in spring] == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
    autumn = fire_times(nightly, local("2026-10-24T12:00"), local("2026-10-26T12:00"))
    assert [berlin(t) for t in autumn] == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    # The same rule in UTC fires 24 h apart, whatever Berlin does.
    utc = schedule(cron="0 3 * * *")
    assert (
        next_fire(utc, local("2026-03-29T12:00")) - next_fire(utc, local("2026-03-28T12:00"))
        == 86400
    )


def test_every_counts_from_the_watermark_and_all_is_bounded() -> None:
    every = schedule(every=2.0)
    assert fire_times(every, 100.0, 105.9) == [102.0, 104.0]
    assert fire_times(every, 100.0, 101.9) == []
    storm = fire_times(every, 0.0, 1e6)
    assert len(storm) == config.CATCH_UP_ALL and storm[-1] == 1e6


@pytest.mark.parametrize(
    ("catch_up", "sent"),
    [("none", [190.0]), ("last", [180.0, 190.0]), ("all", [110.0 + 10 * k for k in range(9)])],
)
def test_catch_up_after_a_downtime(catch_up: str, sent: list[float]) -> None:
    """Watermark 100, back at 194: fires 110..180 were missed, 190 is on time."""
    todo = plan(schedule(every=10.0, catch_up=catch_up), 100.0, 190.0 + MISSED_AFTER - 1)
    assert todo.fires == sent and todo.upto == 190.0


# -- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"cron": "61 * * * *"}, "schedules[0].cron: '61 * * * *' is not a cron expression"),
        (
            {"cron": "* * * * *", "timezone": "Mars/Olympus"},
            "schedules[0].timezone: 'Mars/Olympus'",
        ),
        ({"cron": "* * * * *", "every": 5.0}, "set `cron` (an expression) or `every`"),
        ({}, "set `cron` (an expression) or `every`"),
        ({"every": 0.0}, "schedules[0].every: Input should be greater than or equal to 0.1"),
        ({"every": 1.0, "task": "a:b"}, "set `task` (a task message) or `payload`"),
        ({"every": 1.0, "args": [1]}, "args and kwargs go with `task`"),
        ({"every": 1.0, "catch_up": "some"}, "schedules[0].catch_up"),
        ({"every": 1.0, "host": "nowhere"}, "schedules[0].host: 'nowhere' is neither"),
    ],
)
def test_a_bad_schedule_is_named_by_file_field_and_problem(
    tmp_path: Path, fields: dict[str, Any], complaint: str
) -> None:
    entry = {"name": "s", "host": "local", "queue": "q", "payload": "x", **fields}
    path = write_config(
        tmp_path / "c.toml", "redis://127.0.0.1:1/0", [{"queue": "w", "handler": "a:b"}],
        schedules=[entry],
    )  # fmt: skip
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert complaint in str(caught.value) and str(path) in str(caught.value)


# -- the real service ----------------------------------------------------------------------


def fires(server: RedisServer, queue: str) -> list[float]:
    """The fire times of the task messages on `queue`, from their ids `<name>@<time>`."""
    messages = cast(list[bytes], server.client().lrange(queue, 0, -1))
    return sorted(float(json.loads(m)["id"].split("@")[1]) for m in messages)


@pytest.mark.service
def test_three_managers_one_killed_enqueue_each_fire_exactly_once(
    redis_server: RedisServer, service: Any
) -> None:
    every = 0.5
    managers = firing_managers(service, ("a", "b", "c"), every)
    wait_for(lambda: len(fires(redis_server, "ticks")) >= 6, timeout=30, what="6 fires")
    managers[1].signal_session(signal.SIGKILL)
    count = len(fires(redis_server, "ticks"))
    wait_for(lambda: len(fires(redis_server, "ticks")) >= count + 10, timeout=30, what="10 more")
    for manager in managers[0::2]:
        manager.signal_session(signal.SIGKILL)
    found = fires(redis_server, "ticks")
    assert len(set(found)) == len(found), "no fire time enqueued twice"
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(found)}
    assert gaps == {every}, "none skipped"
    last = float(cast(bytes, redis_server.client().hget(Keys("ticks").schedules, "ticks")))
    assert last == found[-1], "the watermark is the last fire enqueued"


@pytest.mark.service
def test_catch_up_after_no_manager_ran_and_the_schedules_command(
    tmp_path: Path, redis_server: RedisServer, service: Any
) -> None:
    """Watermarks 95 s old, every 10 s: the fires in between were missed."""
    client = redis_server.client()
    entries = []
    start = time.time()
    for mode in ("none", "last", "all"):
        entries.append({"name": mode, "host": "local", "queue": mode, "every": 10.0,
                        "task": "taskapp:add", "args": [1, 2], "catch_up": mode})  # fmt: skip
        client.hset(Keys(mode).schedules, mode, repr(start - 95.0))
    svc = service([{"queue": "idle", "handler": "testapp:handle"}], schedules=entries)
    wait_for(
        lambda: all(float(client.hget(Keys(m).schedules, m) or 0) > start - 10 for m in
                    ("none", "last", "all")),
        timeout=20, what="every schedule to fire",
    )  # fmt: skip
    assert len(fires(redis_server, "none")) == 0
    assert fires(redis_server, "last") == [start - 5.0]
    assert fires(redis_server, "all") == [start - 95.0 + 10 * k for k in range(1, 10)]
    shown = run_cli("-c", str(svc.config_path), "schedules")
    assert shown.returncode == 0, shown.stderr
    assert "all  → all on" in shown.stdout and "every 10s  catch_up all" in shown.stdout
    assert "last fire 2" in shown.stdout and "next fire 2" in shown.stdout


@pytest.mark.service
def test_reload_adds_and_removes_schedules_and_the_page_shows_them(
    redis_server: RedisServer, service: Any
) -> None:
    port = free_port()
    workers = [{"queue": "idle", "handler": "testapp:handle"}]
    manager = {"check_interval": 0.2, "metrics_address": f"127.0.0.1:{port}"}

    def ticks(name: str) -> dict[str, Any]:
        return {"name": name, "host": "local", "queue": name, "every": 0.5, "payload": name}

    def page() -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/schedules", timeout=5) as r:
                return cast(list[dict[str, Any]], json.load(r))
        except OSError:
            return None

    client = redis_server.client()
    svc = service(workers, manager=manager, schedules=[ticks("first")])
    wait_for(lambda: client.llen("first") >= 2, timeout=20, what="the first schedule to fire")
    shown = wait_for(page, timeout=15, what="the page")
    assert [s["name"] for s in shown] == ["first"] and shown[0]["last_fire"] > 0
    write_config(svc.config_path, redis_server.url, workers, manager=manager,
                 schedules=[ticks("second")])  # fmt: skip
    svc.signal(signal.SIGHUP)
    wait_for(lambda: client.llen("second") >= 1, timeout=20, what="the added schedule to fire")
    before = client.llen("first")
    wait_for(lambda: client.llen("second") >= 4, timeout=20, what="three more fires")
    assert client.llen("first") == before, "the removed schedule fires no more"
    wait_for(lambda: [s["name"] for s in page() or []] == ["second"], timeout=15, what="the page")


def test_task_arguments_must_be_json_values() -> None:
    """TOML has dates; a task message cannot carry one: refused by `check`, never at fire time."""
    with pytest.raises(ValueError, match="args and kwargs must be JSON values"):
        schedule(every=1.0, payload=None, task="a:b", args=[datetime.datetime(2026, 1, 1)])
