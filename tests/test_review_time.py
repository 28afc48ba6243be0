"""A hostile review of issue 20, time and order: delayed messages, schedules, deduplication
and priorities, attacked with the values and moments a careless producer or an unlucky
operator would bring, against real Redis and the real service."""

from __future__ import annotations

import datetime
import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any, cast

import pytest

from rqworkers import config
from rqworkers.client.producer import Producer, due_time
from rqworkers.config import ScheduleSettings
from rqworkers.ops.schedules import Scheduler
from rqworkers.store.delayed import RetrySet
from rqworkers.store.keys import Keys
from rqworkers.store.queue import ReliableQueue
from tests.support import (
    RedisServer,
    firing_managers,
    run_cli,
    task_pair,
    wait_for,
    write_config,
)

QUEUE = "later"
UTC = datetime.UTC


# -- delayed messages: a due time before 1970 ----------------------------------------------


@pytest.mark.parametrize(
    "at",
    [-1.0, -315619200.0, datetime.datetime(1960, 1, 1, tzinfo=UTC)],
    ids=["epoch-minus-one", "1960-seconds", "1960-datetime"],
)
def test_an_at_before_1970_is_due_at_once_at_level_0(redis_server: RedisServer, at: Any) -> None:
    """An `at` in the past is due at once, the docs say, and a plain push is level 0. A
    negative epoch landed below 0, in the priority bands: -1 read as a level-1 message
    waiting (taken ahead of real level-1 ones), and 1960 as a level-1 retry due in the
    year 2283: never taken."""
    producer = Producer(redis_server.url)
    producer.push(QUEUE, b"urgent", priority=1)
    producer.push(QUEUE, b"old", at=at)
    listed = RetrySet(redis_server.client(), QUEUE).page()
    old = [s for s in listed if s.delivery.payload == b"old"]
    assert len(old) == 1 and old[0].due is not None and old[0].due <= time.time()
    queue = ReliableQueue(redis_server.client(), QUEUE, "n:1")
    taken = [d.payload for d in queue.take([], 10).deliveries]
    assert taken == [b"urgent", b"old"], "level 1 first, then the past one, at level 0"


def test_an_enormous_integer_at_is_refused_or_due_at_once_never_an_overflow() -> None:
    """An int too big for a float raised OverflowError from `math.isnan`: a traceback
    where the docs promise a one-line `ValueError`."""
    with pytest.raises(ValueError, match="at must be"):
        due_time(None, 10**400)
    assert due_time(None, -(10**400)) == 0.0, "in the past: due at once"
    with pytest.raises(ValueError, match="delay must be"):
        due_time(10**400, None)


# -- deduplication: the key of a message an operator deleted -------------------------------


@pytest.mark.parametrize("priority", [0, 4])
def test_deleting_a_scheduled_message_frees_its_dedup_key(
    redis_server: RedisServer, priority: int
) -> None:
    """A push with a key is dropped while its message "waits, is scheduled or runs". Once
    `rqworkers scheduled delete` removed it, it is none of those, yet the key stayed held
    for its day and its delay: every push with it was dropped meanwhile."""
    producer = Producer(redis_server.url)
    assert producer.push(QUEUE, b"v1", delay=3600, dedup_key="k", priority=priority) == 1
    assert producer.push(QUEUE, b"v2", delay=3600, dedup_key="k", priority=priority) == 0
    retry_set = RetrySet(redis_server.client(), QUEUE)
    [item] = retry_set.page()
    assert retry_set.delete([item.member]) == 1
    assert producer.push(QUEUE, b"v3", delay=3600, dedup_key="k", priority=priority) == 1
    assert [s.delivery.payload for s in retry_set.page()] == [b"v3"]
    assert retry_set.delete([item.member]) == 0, "gone already: nothing more to free"
    assert producer.push(QUEUE, b"v4", delay=3600, dedup_key="k") == 0, "v3 holds the key"


# -- delayed messages due together, and as many free workers --------------------------------


def started_at(server: RedisServer, count: int, timeout: float) -> list[float]:
    """When each of the first `count` messages reached a handler (`testapp:handle` records
    `started`), as seen by polling every 10 ms: each within 10 ms late at most."""
    client, seen = server.client(), list[float]()

    def more() -> bool:
        while len(seen) < min(count, int(client.llen("started"))):
            seen.append(time.time())
        return len(seen) >= count

    wait_for(more, timeout=timeout, what=f"{count} handlers started", interval=0.01)
    return seen


@pytest.mark.service
@pytest.mark.parametrize("pushes", ["one push", "two pushes", "due 0.1 s apart"])
def test_messages_due_together_start_on_every_free_worker_on_time(
    redis_server: RedisServer, service: Any, pushes: str
) -> None:
    """The issue: "When a worker is free, it is handled within about 100 ms after it is
    due." Two messages due at about one time, two idle workers: the push nudged one worker
    only, which took one message when due and ran it for 3 s, while the other slept on in
    its block (up to 30 s: its fetch, then its quiet time): the second message waited."""
    service([{"queue": QUEUE, "handler": "testapp:handle", "processes": 2}])
    client = redis_server.client()
    wait_for(lambda: client.info("clients")["blocked_clients"] >= 2, timeout=15, what="idle")
    producer, due = Producer(redis_server.url), time.time() + 1.0
    dues = [due, due + 0.1 if pushes == "due 0.1 s apart" else due]
    if pushes == "one push":
        producer.push(QUEUE, b"sleep:3:a", b"sleep:3:b", at=due)
    else:
        producer.push(QUEUE, b"sleep:3:a", at=dues[0])
        producer.push(QUEUE, b"sleep:3:b", at=dues[1])
    late = [at - due for at, due in zip(started_at(redis_server, 2, timeout=40), dues, strict=True)]
    assert late[0] >= 0, "never early"
    assert late[1] < 0.5, f"the second started {late[1]:.2f}s late with a worker free"


# -- delayed payloads a hostile producer sends ---------------------------------------------


def test_empty_and_look_alike_delayed_twins_stay_separate_messages_as_pushed(
    redis_server: RedisServer,
) -> None:
    """Empty payloads, and payloads that look like our envelopes, nudges and wrappers,
    delayed 0 s: each arrives once, as pushed, twins as twins."""
    odd = [b"", b"", b"rqw1:x.1:0:y", b"rqw1:x.1:0:y", b"rqw1:nudge:", b"a:b:c:d", b"rqw1:prio:"]
    producer = Producer(redis_server.url)
    assert producer.push(QUEUE, *odd, delay=0) == len(odd)
    queue = ReliableQueue(redis_server.client(), QUEUE, "n:1")
    taken = queue.take([], 100)
    assert [d.payload for d in taken.deliveries] == odd
    assert len({d.id for d in taken.deliveries}) == len(odd)
    assert queue.take([d.element for d in taken.deliveries], 100).deliveries == []


# -- schedules: a manager whose clock runs ahead -------------------------------------------


def test_a_manager_whose_clock_runs_ahead_neither_fires_early_nor_silences_the_schedule(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Each fire time is claimed by moving the schedule's watermark. A manager whose clock
    ran an hour ahead (a node booted before NTP set it) claimed the next hour's fire times
    at once, pushing them early, and left the watermark an hour ahead: every manager with
    a right clock then found nothing due, and the schedule fell silent for that hour."""
    fields = {"name": "tick", "host": "local", "queue": QUEUE, "payload": "t", "every": 1.0}
    plan = ScheduleSettings.model_validate({**fields, "catch_up": "all"})
    plan = plan.model_copy(update={"url": redis_server.url})
    scheduler = Scheduler((plan,), 5.0)
    client, start = redis_server.client(), time.time()
    scheduler.tick(start)  # the first sight: fires count from here
    scheduler.tick(start + 3600)  # the clock an hour ahead
    assert client.llen(QUEUE) == 0, "no fire pushed an hour early"
    watermark = float(client.hget(Keys(QUEUE).schedules, "tick") or 0)
    assert start <= watermark < start + 1, "the watermark stays where the right clocks are"
    assert "clock runs more than 5s ahead of Redis's" in caplog.text
    scheduler = Scheduler((plan,), 5.0)
    scheduler.tick(start + 2.5)  # the clock right again
    assert client.llen(QUEUE) == 2, "the fires of the next seconds, on time"


# -- the command line: a dedup key it cannot use -------------------------------------------


@pytest.mark.service
@pytest.mark.parametrize("key", ["", "k" * 1025], ids=["empty", "over-1024-bytes"])
@pytest.mark.parametrize(
    "command",
    [["push", QUEUE, "hello"], ["submit", "tasks", "taskapp:add"]],
    ids=["push", "submit"],
)
def test_a_bad_dedup_key_on_the_command_line_is_one_line_and_exit_2(
    tmp_path: Path, redis_server: RedisServer, key: str, command: list[str]
) -> None:
    """`--dedup-key=` (empty) or a key over 1024 bytes ended `push` and `submit` with a
    Python traceback and exit 1, where every other bad option says what is wrong in one
    line, with exit 2."""
    workers = [{"queue": QUEUE, "handler": "testapp:handle"}, task_pair()]
    path = str(write_config(tmp_path / "c.toml", redis_server.url, workers))
    name, queue, what = command
    done = run_cli("-c", path, name, "--queue", queue, f"--dedup-key={key}", what)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "--dedup-key: dedup_key must be" in done.stderr
    assert redis_server.client().llen(queue) == 0


@pytest.mark.service
def test_submit_dedup_key_on_the_command_line_drops_the_second(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The issue asks for `--dedup-key` on the command line for `submit` too, and `submit`
    accepted `--dedup-key` and `--dedup-ttl`, then ignored them: each submit was enqueued,
    so an operator's guard against a double submit guarded nothing."""
    path = str(write_config(tmp_path / "c.toml", redis_server.url, [task_pair()]))
    submit = ("-c", path, "submit", "--queue", "tasks", "--dedup-key", "k", "taskapp:add")
    first = run_cli(*submit, "--args", "[1, 2]")
    assert first.returncode == 0 and len(first.stdout.strip()) == 32, first.stdout  # its id
    again = run_cli(*submit, "--args", "[1, 2]")
    assert again.returncode == 0, again.stderr
    assert "dropped: a message with dedup key k is pending on tasks" in again.stdout
    assert redis_server.client().llen("tasks") == 1
    throttled = run_cli(*submit[:-2], "t", "--dedup-ttl", "60", "taskapp:add")
    assert throttled.returncode == 0 and len(throttled.stdout.strip()) == 32
    assert "dropped" in run_cli(*submit[:-2], "t", "--dedup-ttl", "60", "taskapp:add").stdout
    assert redis_server.client().llen("tasks") == 2


# -- schedules: a manager frozen mid-way -----------------------------------------------------


@pytest.mark.service
@pytest.mark.slow
def test_a_manager_frozen_mid_way_and_thawed_enqueues_no_fire_twice(
    redis_server: RedisServer, service: Any
) -> None:
    """Two managers fire a schedule every 0.5 s; one is frozen (SIGSTOP, as a paused VM)
    for 3 s, likely between reading the watermark and claiming, then thawed: what it had
    planned is stale, and the claim must find the watermark moved. Every fire time once,
    none skipped."""
    every = 0.5
    managers = firing_managers(service, ("a", "b"), every)
    client = redis_server.client()

    def count() -> int:
        return int(client.llen("ticks"))

    wait_for(lambda: count() >= 4, timeout=30, what="4 fires")
    managers[0].signal_session(signal.SIGSTOP)
    frozen_at = count()
    wait_for(lambda: count() >= frozen_at + 6, timeout=30, what="6 fires while one is frozen")
    managers[0].signal_session(signal.SIGCONT)
    thawed_at = count()
    wait_for(lambda: count() >= thawed_at + 6, timeout=30, what="6 fires after the thaw")
    for manager in managers:
        manager.signal_session(signal.SIGKILL)
    messages = cast(list[bytes], client.lrange("ticks", 0, -1))
    found = sorted(float(json.loads(m)["id"].split("@")[1]) for m in messages)
    assert len(set(found)) == len(found), "no fire time enqueued twice"
    assert {round(b - a, 6) for a, b in itertools.pairwise(found)} == {every}, "none skipped"


# -- schedules: a time zone that names a folder, or a name too long for a file -------------


@pytest.mark.parametrize(
    "zone", ["Europe", "America", "x" * 300], ids=["Europe", "America", "long"]
)
def test_a_time_zone_that_is_a_folder_or_too_long_is_named_by_file_and_field(
    tmp_path: Path, zone: str
) -> None:
    """`timezone = "Europe"` (a region, not a zone: an easy slip) made `zoneinfo` open a
    folder, and a name of 300 letters a file name too long: OSError, a traceback from
    `check` and `run`, where every other bad zone is a one-line ConfigError."""
    entry = {"name": "s", "host": "local", "queue": "q", "payload": "x", "cron": "0 3 * * *",
             "timezone": zone}  # fmt: skip
    path = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                        [{"queue": "w", "handler": "a:b"}], schedules=[entry])  # fmt: skip
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert str(path) in str(caught.value)
    assert "schedules[0].timezone: " in str(caught.value) and "is not an IANA time zone" in str(
        caught.value
    )


# -- priorities: level0_every and level 0's retry set ---------------------------------------


@pytest.mark.parametrize("kind", ["delayed", "retry"])
def test_level0_every_serves_level_0s_due_retries_and_delayed_messages_too(
    redis_server: RedisServer, kind: str
) -> None:
    """Docs: with `level0_every = 10`, "level 0 gets at least one message in ten of each
    worker while it has any", and level 0 is "its due retries, then the oldest of the
    shared list". A level-0 message due in the retry set (delayed, or a failed one waiting
    for its retry) is never served by the level-0 turn, which looks at the shared list."""
    producer = Producer(redis_server.url)
    queue = ReliableQueue(redis_server.client(), QUEUE, "n:1", level0_every=4)
    if kind == "delayed":
        producer.push(QUEUE, b"plain", delay=0)
    else:
        producer.push(QUEUE, b"plain")
        [failed] = queue.take([], 1).deliveries
        assert queue.retry_later(failed, 0.0)
    producer.push(QUEUE, b"future", delay=3600)  # level 0's too, and never early
    acks: list[bytes] = []
    taken_plain = 0
    for n in range(20):
        producer.push(QUEUE, b"high-%d" % n, priority=9)  # one more before each take
        taken = queue.take(acks, 1)
        taken_plain += sum(d.payload == b"plain" for d in taken.deliveries)
        assert b"future" not in [d.payload for d in taken.deliveries], "taken early"
        acks = [d.element for d in taken.deliveries]
    assert taken_plain == 1, "level 0's message within 20 takes at level0_every = 4"
