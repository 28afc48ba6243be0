"""Identical payloads are separate messages, against a real redis-server and `rqworkers run`.

Real queues carry the same bytes over and over (`1`, `refresh`, an id). Each copy must be
handled once when nothing fails, keep its own attempts when something does, and be charged
for a crash only if it was the one running.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
import redis

from rqworkers import Producer
from rqworkers.config import PairSettings
from rqworkers.errors import ReplyError
from rqworkers.store.keys import Keys
from rqworkers.store.queue import DeadLetters, Delivery, ReliableQueue
from rqworkers.worker.handlers import Handler, Reply
from rqworkers.worker.scoreboard import Scoreboard
from rqworkers.worker.settle import Settler
from tests.support import APPS, RedisServer, Service, task_pair, wait_for

StartService = Callable[..., Service]
HANDLER = "testapp:handle"


def lrange(server: RedisServer, key: str) -> list[bytes]:
    return list(server.client().lrange(key, 0, -1))


def settled(server: RedisServer, done: int, dead: int) -> bool:
    client = server.client()
    return client.llen("done") == done and client.llen(Keys("jobs").dead) == dead


def start_one(service: StartService, redis_server: RedisServer, **settings: object) -> redis.Redis:
    """One worker of `jobs` at prefetch 10 with `settings`, started; a client of its Redis."""
    svc = service([{"queue": "jobs", "handler": HANDLER, **settings}], defaults={"prefetch": 10})
    svc.wait_workers(1)
    return redis_server.client()


def assert_nothing_left(server: RedisServer) -> None:
    """Every message settled: acks of a batch may wait up to a second to travel together."""
    client = server.client()

    def empty() -> bool:
        every = Keys("jobs", "*")
        keys = ["jobs", *client.keys(every.processing), *client.keys(every.landing)]
        return sum(client.llen(k) for k in keys) == 0 and client.zcard(Keys("jobs").retry) == 0

    wait_for(empty, timeout=5, what="queue, private lists and retry set empty")


@pytest.mark.parametrize("processes", [1, 3])
@pytest.mark.parametrize("prefetch", [1, 10, 100])
def test_copies_of_one_payload_are_each_handled_exactly_once(
    service: StartService, redis_server: RedisServer, prefetch: int, processes: int
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "processes": processes, "max_attempts": 3}],
        defaults={"prefetch": prefetch},
    )
    svc.wait_workers(processes)
    redis_server.client().lpush("jobs", *[b"refresh"] * 600)
    wait_for(lambda: settled(redis_server, 600, 0), timeout=30, what="600 twins handled")
    assert lrange(redis_server, "started") == [b"refresh"] * 600, "each copy ran once"
    assert_nothing_left(redis_server)


def test_a_poison_message_among_healthy_twins_ends_dead_alone(
    service: StartService, redis_server: RedisServer
) -> None:
    client = start_one(service, redis_server, max_attempts=3, retry_delay=0.05)
    client.lpush("jobs", *[b"ok"] * 20, b"raise", *[b"ok"] * 20)
    wait_for(lambda: settled(redis_server, 40, 1), timeout=30, what="twins done, poison dead")
    assert lrange(redis_server, "started").count(b"raise") == 3
    assert lrange(redis_server, "started").count(b"ok") == 40
    assert_nothing_left(redis_server)


def test_twins_of_a_poison_message_each_keep_their_own_attempts_and_record(
    service: StartService, redis_server: RedisServer
) -> None:
    client = start_one(service, redis_server, max_attempts=3, retry_delay=0.05)
    client.lpush("jobs", *[b"raise"] * 4)
    wait_for(lambda: client.llen(Keys("jobs").dead) == 4, timeout=30, what="four dead twins")
    assert lrange(redis_server, "started").count(b"raise") == 12, "three deliveries each"
    letters = DeadLetters(client, "jobs").page(0, 10)
    assert [letter.copies for letter in letters] == [4] * 4
    infos = [letter.info or {} for letter in letters]
    assert [info.get("attempts") for info in infos] == [3] * 4
    assert len({info.get("id") for info in infos}) == 4, "a record per copy"
    assert all("ValueError: boom from testapp" in str(info.get("reason")) for info in infos)
    # The newest copy keeps its traceback; the older copies' records stay small without.
    assert "testapp.py" in str(infos[0].get("traceback"))
    assert [info.get("traceback") for info in infos[1:]] == [None] * 3


def test_a_crash_charges_only_the_running_delivery_not_its_prefetched_twins(
    service: StartService, redis_server: RedisServer
) -> None:
    client = start_one(service, redis_server, max_attempts=2)
    # The worker takes the poison and nine twins of `ok` in one batch, then dies, twice.
    client.lpush("jobs", b"kill", *[b"ok"] * 19)
    wait_for(lambda: settled(redis_server, 19, 1), timeout=30, what="poison dead, twins done")
    assert lrange(redis_server, "started").count(b"kill") == 2
    assert lrange(redis_server, "started").count(b"ok") == 19, "no twin charged or run twice"
    info = DeadLetters(client, "jobs").page(0, 1)[0].info or {}
    assert "killed by signal 9" in str(info.get("reason")) and info.get("attempts") == 2
    assert_nothing_left(redis_server)


def test_copies_of_a_payload_that_crashes_its_worker_each_end_dead(
    service: StartService, redis_server: RedisServer
) -> None:
    client = start_one(service, redis_server, max_attempts=2)
    client.lpush("jobs", *[b"kill"] * 3, *[b"ok"] * 5)
    wait_for(lambda: settled(redis_server, 5, 3), timeout=30, what="three dead, five done")
    assert lrange(redis_server, "started").count(b"kill") == 6, "exactly two deliveries each"


def test_twins_reclaimed_from_a_lost_node_run_elsewhere_and_none_is_dead(
    service: StartService, redis_server: RedisServer
) -> None:
    manager = {"check_interval": 0.2, "lease_ttl": 1.5, "reclaim_interval": 0.3}
    pair = {"queue": "jobs", "handler": HANDLER, "max_attempts": 2, "prefetch": 10}
    node_a = service([pair], manager={**manager, "node": "node-a"})
    node_a.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", *[b"sleep:0.3"] * 10)
    wait_for(lambda: lrange(redis_server, "started")[:1] == [b"sleep:0.3"], what="node a busy")
    node_b = service([pair], manager={**manager, "node": "node-b"})
    node_b.wait_workers(1)
    node_a.signal_session(signal.SIGKILL)
    wait_for(lambda: client.llen("done") >= 10, timeout=30, what="all ten handled")
    assert client.llen(Keys("jobs").dead) == 0, "a node loss charges one attempt each: none dead"
    assert "reclaimed" in node_b.output()
    assert_nothing_left(redis_server)


def test_a_retry_keeps_its_attempts_across_a_redis_restart(
    service: StartService, redis_server: RedisServer
) -> None:
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 3, "retry_delay": 2.0}],
        manager={"check_interval": 0.2},
    )
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"raise", b"raise")
    wait_for(lambda: client.zcard(Keys("jobs").retry) == 2, what="both twins waiting to retry")
    redis_server.stop()  # AOF with appendfsync always: the retry set and its counts survive
    redis_server.start()
    client = redis_server.client()
    wait_for(lambda: client.llen(Keys("jobs").dead) == 2, timeout=40, what="both dead")
    assert lrange(redis_server, "started").count(b"raise") == 6, "three deliveries each"
    infos = [letter.info or {} for letter in DeadLetters(client, "jobs").page()]
    assert [info.get("attempts") for info in infos] == [3, 3]


def test_a_poison_storm_leaves_the_healthy_messages_flowing(
    service: StartService, redis_server: RedisServer
) -> None:
    """One poison (SIGKILL) in every ten: a crash after progress is respawned at once, so
    100 healthy and 10 poison messages settle well within a minute."""
    svc = service([{"queue": "jobs", "handler": HANDLER, "max_attempts": 3}])
    svc.wait_workers(1)
    client = redis_server.client()
    messages = []
    for i in range(100):
        messages.append(f"ok:{i}".encode())
        if i % 10 == 9:
            messages.append(f"kill:{i}".encode())
    client.lpush("jobs", *messages)
    wait_for(lambda: settled(redis_server, 100, 10), timeout=60, what="storm settled")
    started = lrange(redis_server, "started")
    assert sum(m.startswith(b"kill") for m in started) == 30, "three deliveries per poison"
    assert_nothing_left(redis_server)


def test_an_exception_whose_str_raises_still_ends_in_the_dead_list(
    service: StartService, redis_server: RedisServer
) -> None:
    client = start_one(service, redis_server, max_attempts=2, retry_delay=0.05)
    client.lpush("jobs", b"badstr", b"ok")
    wait_for(lambda: settled(redis_server, 1, 1), timeout=20, what="poison dead, ok done")
    assert lrange(redis_server, "started").count(b"badstr") == 2
    info = DeadLetters(client, "jobs").page(0, 1)[0].info or {}
    assert "_UnprintableError" in str(info.get("reason"))


def test_sigterm_gives_prefetched_messages_back_while_the_handler_still_runs(
    service: StartService, redis_server: RedisServer
) -> None:
    """A deploy with a slow message: if the worker is killed at `shutdown_timeout`, the next
    manager cannot know what ran and charges every leftover; so what never started goes
    back at once, and only the slow message is left to be charged."""
    svc = service(
        [{"queue": "jobs", "handler": HANDLER, "max_attempts": 1, "prefetch": 5}],
        manager={"check_interval": 0.2, "shutdown_timeout": 1.0},
    )
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"sleep:30", *[f"ok{i}".encode() for i in range(4)])
    wait_for(lambda: lrange(redis_server, "started") == [b"sleep:30"], what="slow one started")
    svc.signal(signal.SIGTERM)
    wait_for(lambda: client.llen("jobs") == 4, timeout=5, what="four given back at once")
    assert svc.wait(20) == 0
    assert client.llen(Keys("jobs").dead) == 0


# --- task replies: each twin's is its own ----------------------------------------------------


class RefusesOneReply(Handler):
    """Writes each reply to Redis (RPUSH), but refuses `refused`, as Redis refuses a reply
    key that turned into a string (WRONGTYPE) or a full memory (OOM) for one write."""

    def __init__(self, client: redis.Redis, refused: bytes) -> None:  # nothing to import
        self.path = "tests.test_twins:RefusesOneReply"
        self.has_callbacks = False
        self.client, self.refused = client, refused
        self.calls: list[list[Reply]] = []

    def write_replies(self, replies: list[Reply]) -> list[Exception | None]:
        self.calls.append(list(replies))
        errors: list[Exception | None] = []
        for key, _, reply in replies:
            if reply == self.refused:
                errors.append(ReplyError(f"reply to {key!r} not written: WRONGTYPE"))
            else:
                self.client.rpush(key, reply)
                errors.append(None)
        return errors


@pytest.mark.parametrize("order", ["in-order", "out-of-order"])
def test_a_refused_reply_fails_the_twin_whose_run_made_it_and_acks_the_other(
    redis_server: RedisServer, order: str
) -> None:
    """Two twins each ran and made their own reply (a task's result may differ from run to
    run); Redis refuses the second twin's. That twin alone fails, with one attempt more;
    the first is acked, its reply written once; neither's count moves for the other's."""
    client = redis_server.client()
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    pair = PairSettings(host="h", queue="jobs", handler="testapp:handle", retry_delay=60.0)
    handler = RefusesOneReply(client, refused=b"result of run 2")
    settler = Settler(pair, handler, queue, Scoreboard(), (0.0, 0.0), lambda: None)
    retried: list[Delivery] = []
    retry_later = queue.retry_later

    def watched_retry_later(delivery: Delivery, delay: float) -> bool:
        retried.append(delivery)
        return retry_later(delivery, delay)

    queue.retry_later = watched_retry_later  # type: ignore[method-assign]
    queue.hold_lease(30)
    client.lpush("jobs", b"twin", b"twin")
    first, second = settler.outbox.take(2).deliveries
    assert first.payload == second.payload and first.id != second.id
    runs = [(first, b"result of run 1"), (second, b"result of run 2")]
    for delivery, reply in runs if order == "in-order" else runs[::-1]:  # a concurrent loop
        settler.settle(delivery, None, time.monotonic(), 0.0, ("replies:r", 60.0, reply))
    settler.outbox.flush()

    assert retried == [second], "the refusal is charged to the twin whose reply it was"
    assert client.lrange("replies:r", 0, -1) == [b"result of run 1"]
    assert client.llen(queue.keys.processing) == 0, "the first twin is acked"
    (member,) = client.zrange(queue.keys.retry, 0, -1)
    assert member.endswith(b":1:twin"), f"one attempt more, no more: {member!r}"
    assert settler.outbox.empty and not settler.outbox.replies
    settler.outbox.flush()
    assert len(handler.calls) == 1, "each reply is written (or refused) once"


def test_a_reply_stays_with_its_ack_through_a_lost_connection(redis_server: RedisServer) -> None:
    """Redis stops answering as the replies go: none is lost, each goes again with its
    own delivery's ack once Redis answers (a second copy of a written one is harmless)."""
    client = redis_server.client()
    queue = ReliableQueue(client, "jobs", "node:1", keep_connection=True)
    pair = PairSettings(host="h", queue="jobs", handler="testapp:handle")
    handler = RefusesOneReply(client, refused=b"")
    settler = Settler(pair, handler, queue, Scoreboard(), (0.0, 0.0), lambda: None)
    queue.hold_lease(30)
    client.lpush("jobs", b"twin", b"twin")
    first, second = settler.outbox.take(2).deliveries
    for delivery, reply in [(second, b"run 2"), (first, b"run 1")]:
        settler.settle(delivery, None, time.monotonic(), 0.0, ("replies:r", 60.0, reply))
    write = handler.write_replies

    def drop(replies: list[Reply]) -> list[Exception | None]:
        handler.write_replies = write  # type: ignore[method-assign]
        raise redis.ConnectionError("reset")

    handler.write_replies = drop  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        settler.outbox.flush()
    assert settler.outbox.acks == [second, first] and len(settler.outbox.replies) == 2
    settler.outbox.flush()
    assert client.lrange("replies:r", 0, -1) == [b"run 2", b"run 1"]
    assert client.llen(queue.keys.processing) == 0 and settler.outbox.empty


def test_a_twin_abandoned_past_its_timeout_never_lends_its_reply_to_a_concurrent_twin(
    service: StartService, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three twins of a task in a pool of two threads. Run 1 outlives its timeout and is
    retried, but its thread still finishes, before run 3 does. Each acked twin's caller
    hears its own run (2, 3), the retried one its retry's (4); run 1's reply, of a
    delivery that failed, is written by nobody."""
    monkeypatch.syspath_prepend(str(APPS))
    from rqworkers.client import tasks

    timeout = 2.0  # run 1 ends at 1.2x, run 3 starts at 0.6x and ends at 1.4x (its own 1.6x)
    svc = service([task_pair(concurrency=2, prefetch=3, timeout=timeout, max_attempts=3)])
    svc.wait_workers(1)
    reply_to = "tasks:replies:twins"
    schedule = (1.2 * timeout, 0.6 * timeout, 0.8 * timeout)
    message = tasks.encode(
        Producer.task("taskapp:on_schedule", ("t", *schedule), reply_to=reply_to)
    )
    client = redis_server.client()
    client.lpush("tasks", message, message, message)
    wait_for(lambda: client.llen(reply_to) >= 3, timeout=30, what="three replies")
    results = [tasks.read_reply(reply)[1] for reply in client.lrange(reply_to, 0, -1)]
    assert sorted(results) == [2, 3, 4], "each reply is its own delivery's run"
    assert client.get("on_schedule:t") == b"4", "the abandoned twin ran again, once"
