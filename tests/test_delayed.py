"""Delayed messages: `Producer.push(delay=, at=)`, `submit`, the Executor's `submit_later`
and `submit_at`, `rqworkers push --delay/--at`, the nudge that wakes a blocked worker, and
`rqworkers scheduled`: against real Redis, and the real service where users meet them."""

from __future__ import annotations

import datetime
import json
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from rqworkers.client.executor import Executor
from rqworkers.client.producer import Producer, due_time
from rqworkers.store.delayed import RetrySet
from rqworkers.store.keys import Keys
from rqworkers.store.queue import ReliableQueue
from tests.support import RedisServer, run_cli, task_pair, wait_for, write_config

QUEUE = "later"
UTC = datetime.UTC


def queue_for(server: RedisServer, worker: str = "n:1") -> ReliableQueue:
    return ReliableQueue(server.client(), QUEUE, worker)


# -- the values a producer may give --------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "at", "complaint"),
    [
        (float("nan"), None, "delay must be seconds"),
        (float("inf"), None, "delay must be seconds"),
        (-1, None, "delay must be seconds"),
        (True, None, "delay must be seconds"),
        ("5", None, "delay must be seconds"),
        (1e10, None, "ten years"),
        (1, 2.0, "not both"),
        (None, datetime.datetime(2030, 1, 1), "naive datetime"),
        (None, float("nan"), "at must be"),
        (None, float("inf"), "at must be"),
        (None, 1e12, "at must be"),
    ],
)
def test_a_bad_delay_or_time_is_refused_in_one_line(delay: Any, at: Any, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        due_time(delay, at)


def test_a_delay_a_timedelta_and_an_aware_time_say_when() -> None:
    assert due_time(30, None, now=100.0) == 130.0
    assert due_time(datetime.timedelta(minutes=1), None, now=100.0) == 160.0
    berlin = datetime.timezone(datetime.timedelta(hours=1))
    at = datetime.datetime(2026, 12, 24, 19, tzinfo=berlin)
    assert due_time(None, at) == datetime.datetime(2026, 12, 24, 18, tzinfo=UTC).timestamp()
    assert due_time(None, 50.0, now=100.0) == 50.0, "in the past: due at once"
    assert due_time(None, None) is None


# -- the moves, on real Redis --------------------------------------------------------------


def test_a_delayed_message_is_taken_only_once_due(redis_server: RedisServer) -> None:
    producer = Producer(redis_server.url)
    assert producer.push(QUEUE, b"soon", b"soon", delay=0.3) == 2, "twins: two messages"
    queue = queue_for(redis_server)
    taken = queue.take([], 10)
    assert taken.deliveries == []
    assert taken.next_due is not None and taken.next_due > time.time()
    wait_for(lambda: time.time() >= cast(float, taken.next_due), timeout=2, what="due")
    later = queue.take([], 10)
    assert [d.payload for d in later.deliveries] == [b"soon", b"soon"]
    assert [d.attempts for d in later.deliveries] == [0, 0]
    assert queue.take([], 10).deliveries == [], "each delivered once"


def test_one_push_keeps_its_order_when_due_together(redis_server: RedisServer) -> None:
    producer = Producer(redis_server.url)
    payloads = [b"%d" % n for n in range(1, 1500)]  # past one script call's batch
    producer.push(QUEUE, *payloads, at=time.time() - 1)
    taken = queue_for(redis_server).take([], 2000)
    assert [d.payload for d in taken.deliveries] == payloads


def test_a_delayed_message_due_sooner_nudges_a_blocked_worker(redis_server: RedisServer) -> None:
    """A worker blocks on the empty queue for 10 s; a message due in 0.3 s wakes it: it
    takes nothing (the nudge is dropped, never handed over as a message), learns the due
    time, and takes the message once due."""
    queue = queue_for(redis_server)
    assert queue.take([], 1).next_due is None
    woke: list[float] = []
    blocked = threading.Thread(
        target=lambda: woke.append(queue.fetch(10.0) and time.time()), daemon=True
    )
    blocked.start()
    wait_for(lambda: redis_server.client().info("clients")["blocked_clients"] == 1, timeout=5)
    pushed = time.time()
    Producer(redis_server.url).push(QUEUE, b"payload", delay=0.3)
    blocked.join(5)
    assert woke and woke[0] - pushed < 1.0, "woken at once, not after its 10 s block"
    nudged = queue.take([], 1, landed=True)
    assert nudged.deliveries == [] and nudged.next_due == pytest.approx(pushed + 0.3, abs=0.1)
    client = redis_server.client()
    assert client.llen(Keys(QUEUE, "n:1").landing) == 0 and client.llen(QUEUE) == 0
    # A later one does not nudge: the worker already wakes sooner.
    Producer(redis_server.url).push(QUEUE, b"later", delay=5)
    assert client.llen(QUEUE) == 0


def test_a_nudge_nobody_was_blocked_for_is_dropped_by_the_next_take(
    redis_server: RedisServer,
) -> None:
    producer = Producer(redis_server.url)
    producer.push(QUEUE, b"delayed", delay=60)
    client = redis_server.client()
    token = client.get(Keys(QUEUE).nudge)
    assert token and client.lrange(QUEUE, 0, -1) == [token]
    producer.push(QUEUE, b"a", b"b")
    client.rpush(QUEUE, b"given back")  # a give-back lands behind the nudge
    queue = queue_for(redis_server)
    taken = queue.take([], 10)
    assert [d.payload for d in taken.deliveries] == [b"given back", b"a", b"b"]
    assert client.llen(QUEUE) == 0
    # A producer's payload that looks like a nudge but is not the token is a message.
    producer.push(QUEUE, b"rqw1:nudge:" + token[-8:], token + b"x")
    assert len(queue.take([], 10).deliveries) == 2


def test_scheduled_lists_runs_now_and_deletes(redis_server: RedisServer) -> None:
    producer = Producer(redis_server.url)
    producer.push(QUEUE, b"one", b"two", b"three", delay=3600)
    retry_set = RetrySet(redis_server.client(), QUEUE)
    listed = retry_set.page()
    assert [s.delivery.payload for s in listed] == [b"one", b"two", b"three"]
    assert all(s.delayed for s in listed)
    ids = [s.delivery.id.decode() for s in listed]
    assert retry_set.run_now([s.member for s in retry_set.find(ids[:1])]) == 1
    assert retry_set.delete([s.member for s in retry_set.find(ids[1:2])]) == 1
    taken = queue_for(redis_server).take([], 10)
    assert [d.payload for d in taken.deliveries] == [b"one"]
    assert [s.delivery.payload for s in retry_set.page()] == [b"three"]
    assert retry_set.run_now([listed[0].member]) == 0, "taken already: not added again"


# -- the real service ----------------------------------------------------------------------


def echo_pair(**settings: Any) -> dict[str, Any]:
    return {"queue": QUEUE, "handler": "testapp:arrival", **settings}


def arrivals(server: RedisServer, count: int, timeout: float) -> list[tuple[float, bytes]]:
    """The first `count` arrivals the handler recorded: (epoch time, payload)."""
    client = server.client()
    wait_for(lambda: client.llen("arrived") >= count, timeout=timeout, what=f"{count} arrivals")
    found = []
    for line in cast(list[bytes], client.lrange("arrived", 0, -1)):
        at, _, payload = line.partition(b" ")
        found.append((float(at), payload))
    return found


def blocked(server: RedisServer, count: int) -> None:
    """Wait until `count` workers block on an empty queue (idle, as the nudge finds them)."""
    client = server.client()
    wait_for(
        lambda: client.info("clients")["blocked_clients"] >= count, timeout=15, what="idle workers"
    )


def push_due(producer: Producer, offsets: list[float]) -> None:
    """One message per offset, due that many seconds from now; its payload says when."""
    now = time.time()
    for n, offset in enumerate(offsets):
        due = now + offset
        producer.push(QUEUE, b"%r:%d" % (due, n), at=due)


def lateness(found: list[tuple[float, bytes]]) -> list[float]:
    """Seconds after its due time each message reached a handler (negative: early)."""
    return sorted(at - float(payload.split(b":")[0]) for at, payload in found)


@pytest.mark.service
def test_delayed_messages_reach_idle_workers_on_time_and_never_early(
    redis_server: RedisServer, service: Any
) -> None:
    service([echo_pair(processes=2)])
    blocked(redis_server, 2)
    # Out of order: most are due sooner than every one before them, and must nudge.
    offsets = [3.0 - 0.07 * n for n in range(40)]
    push_due(Producer(redis_server.url), offsets)
    found = arrivals(redis_server, len(offsets), timeout=20)
    late = lateness(found)
    print(f"lateness (s): min {late[0]:.4f} median {late[len(late) // 2]:.4f} max {late[-1]:.4f}")
    assert len(found) == len(offsets) and len({p for _, p in found}) == len(offsets)
    assert late[0] >= 0, "never handled before due"
    assert late[-1] < 0.5, "handled within the bound once due, not after a 10 s block"


@pytest.mark.service
def test_delayed_messages_survive_a_redis_restart_and_arrive_once(
    redis_server: RedisServer, service: Any
) -> None:
    """Written with AOF (`appendfsync always`): a restart before they are due loses none,
    and none arrives twice or early, with 3 workers competing for them."""
    service([echo_pair(processes=3)])
    blocked(redis_server, 3)
    offsets = [2.0 + 0.01 * n for n in range(30)]
    push_due(Producer(redis_server.url), offsets)
    redis_server.stop()
    redis_server.start()
    found = arrivals(redis_server, len(offsets), timeout=30)
    time.sleep(0.5)  # would a second copy come? (the handler records every arrival)
    assert len(redis_server.client().lrange("arrived", 0, -1)) == len(offsets)
    assert len({p for _, p in found}) == len(offsets)
    assert lateness(found)[0] >= 0


@pytest.mark.service
def test_the_executor_submits_later_and_at_and_cancels_a_delayed_future(
    redis_server: RedisServer, service: Any
) -> None:
    service([task_pair()])
    with Executor(redis_server.url, "tasks") as executor:
        sent = time.time()
        later = executor.submit_later(0.5, "taskapp:add", 1, 2)
        at = executor.submit_at(datetime.datetime.now(UTC) + datetime.timedelta(seconds=0.5),
                                "taskapp:add", 2, 3)  # fmt: skip
        cancelled = executor.submit_later(0.5, "taskapp:add", 5, 5)
        assert cancelled.cancel()
        assert later.result(10) == 3 and at.result(10) == 5
        assert time.time() - sent >= 0.5
        with pytest.raises(ValueError, match="naive datetime"):
            executor.submit_at(datetime.datetime.now(), "taskapp:add", 1, 1)
    assert redis_server.client().zcard(Keys("tasks").retry) == 0


@pytest.mark.service
def test_push_delay_and_the_scheduled_commands(tmp_path: Path, redis_server: RedisServer) -> None:
    path = str(write_config(tmp_path / "c.toml", redis_server.url, [echo_pair()]))
    pushed = run_cli("-c", path, "push", "--delay", "30m", "one", "two", "three")
    assert pushed.returncode == 0 and "scheduled on later" in pushed.stdout
    at = run_cli("-c", path, "push", "--at", "2026-12-24T18:00:00Z", "xmas")
    assert at.returncode == 0, at.stderr
    listed = run_cli("-c", path, "scheduled", "list")
    assert listed.returncode == 0 and "4 messages" in listed.stdout, listed.stdout
    assert listed.stdout.count("delayed") == 4
    ids = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("p")]
    ran = run_cli("-c", path, "scheduled", "run-now", ids[0])
    assert ran.returncode == 0 and "made 1 message due now" in ran.stdout
    assert redis_server.client().llen(QUEUE) == 1, "a nudge: nobody blocks there"
    deleted = run_cli("-c", path, "scheduled", "delete", ids[1])
    assert deleted.returncode == 0 and "deleted 1 message" in deleted.stdout
    gone = run_cli("-c", path, "scheduled", "delete", ids[1])
    assert gone.returncode == 1 and "taken already, or never there" in gone.stderr
    status = run_cli("-c", path, "status")
    assert "scheduled 3 (next due 0." in status.stdout or "overdue" in status.stdout, status.stdout
    for args, complaint in [
        (("--delay", "-1"), "--delay: delay must be seconds"),
        (("--delay", "soon"), "is not a duration"),
        (("--delay", "1e400"), "--delay: delay must be seconds"),
        (("--at", "2026-12-24T18:00:00"), "has no time zone"),
        (("--at", "tomorrow"), "--at: Invalid isoformat"),
        (("--delay", "1s", "--at", "2026-12-24T18:00:00Z"), "not allowed with"),
    ]:
        bad = run_cli("-c", path, "push", *args, "x")
        assert bad.returncode == 2, (args, bad.stderr)
        assert complaint in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_status_and_metrics_say_how_many_are_scheduled_and_when_the_next_is_due(
    redis_server: RedisServer,
) -> None:
    from rqworkers.ops.metrics import Metrics
    from rqworkers.ops.status import PairStatus, as_text
    from rqworkers.store.queue import snapshot

    due = time.time() + 90
    Producer(redis_server.url).push(QUEUE, b"a", b"b", at=due)
    snap = snapshot(redis_server.client(), QUEUE)
    assert snap.retrying == 2 and snap.next_due == pytest.approx(due)
    text = as_text([PairStatus("redis://h/0", QUEUE, snap, None)], now=due - 30)
    assert "scheduled 2 (next due in 30.0s)" in text, text
    found = {
        sample.name: sample.value
        for family in Metrics((), lambda: {("h", QUEUE): snap}, 0.0, lambda pid: 0).collect()
        for sample in family.samples
    }
    assert found["rqworkers_queue_next_due_timestamp_seconds"] == pytest.approx(due)
    assert found["rqworkers_queue_retrying_messages"] == 2


def test_submit_with_a_delay_sends_the_task_message_to_the_retry_set(
    redis_server: RedisServer,
) -> None:
    producer = Producer(redis_server.url)
    task_id = producer.submit(QUEUE, "taskapp:add", (1, 2), delay=60)
    (item,) = RetrySet(redis_server.client(), QUEUE).page()
    assert json.loads(item.delivery.payload)["id"] == task_id and item.delayed
    assert item.due == pytest.approx(time.time() + 60, abs=1)
    with pytest.raises(ValueError, match="not both"):
        producer.submit(QUEUE, "taskapp:add", (1, 2), delay=1, at=time.time())
    assert redis_server.client().llen(QUEUE) <= 1, "nothing pushed but the nudge"


@pytest.mark.slow
def test_delayed_and_deduplicated_pushes_on_a_redis_cluster(tmp_path: Path) -> None:
    """Every key a push touches (the queue, its retry set, nudge and dedup keys) shares the
    queue's {hash tag}: the scripts run on one Cluster node."""
    from tests.servers import Cluster, Processes, server_version

    if server_version() < (7, 0):
        pytest.skip("the cluster fixture needs redis-server 7.0 or later")
    processes = Processes()
    try:
        cluster = Cluster(processes, tmp_path / "cluster").start()
        producer = Producer(cluster.url)
        queue = "{later}"
        assert producer.push(queue, b"a", b"a", at=time.time() + 0.2) == 2
        assert producer.push(queue, b"b", dedup_key="k", delay=0.2) == 1
        assert producer.push(queue, b"b", dedup_key="k", delay=0.2) == 0
        taker = ReliableQueue(cluster.client(), queue, "n:1")
        assert taker.take([], 10).deliveries == []
        found: list[bytes] = []

        def all_taken() -> bool:
            found.extend(d.payload for d in taker.take([], 10).deliveries)
            return len(found) >= 3

        wait_for(all_taken, timeout=5, what="the due messages")
        assert sorted(found) == [b"a", b"a", b"b"]
    finally:
        processes.kill_all()


def test_a_reclaim_nudges_a_blocked_worker_to_take_what_it_moved(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    client.rpush(Keys(QUEUE, "gone:1").processing, b"rqw1:ab.1.1:0:orphan")
    client.sadd(Keys(QUEUE).registry, "gone:1")
    queue = queue_for(redis_server)
    assert queue.take([], 1).deliveries == []
    woke: list[bool] = []
    blocked = threading.Thread(target=lambda: woke.append(queue.fetch(10.0)), daemon=True)
    blocked.start()
    wait_for(lambda: client.info("clients")["blocked_clients"] == 1, timeout=5)
    assert ReliableQueue(client, QUEUE, "gone:1").reclaim() == 1
    blocked.join(2)
    assert woke == [True], "woken at once, not after its 10 s block"
    assert [d.payload for d in queue.take([], 1, landed=True).deliveries] == [b"orphan"]


def test_a_nudge_left_in_a_landing_list_is_never_replayed_as_a_message(
    redis_server: RedisServer,
) -> None:
    """A worker stopped while blocked leaves what its fetch moved in its landing list; its
    successor replays that list: a nudge there is dropped, a message kept."""
    Producer(redis_server.url).push(QUEUE, b"delayed", delay=60)
    client = redis_server.client()
    token = client.get(Keys(QUEUE).nudge)
    landing = Keys(QUEUE, "n:1").landing
    client.lmove(QUEUE, landing, "RIGHT", "LEFT")
    client.lpush(landing, b"a message")
    assert client.lrange(landing, 0, -1) == [b"a message", token]
    replayed = queue_for(redis_server).replay(b"")
    assert [d.payload for d in replayed] == [b"a message"] and client.llen(landing) == 0
