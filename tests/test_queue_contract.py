"""One contract for `ReliableQueue`, run against fakeredis and a real redis-server, with
`BLMOVE` and with the `BRPOPLPUSH` fallback.

The invariant behind every test: a message moves between keys atomically, so at any time it
sits in exactly one of the shared list, a private list, the retry set or the dead list.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

from rqworkers.queue import Keys, ReliableQueue
from tests.support import RedisServer

QUEUE = "jobs"
WORKER = "node-a:1"
NONCE = 8  # bytes of random prefix on retry-set members


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())  # a fresh server per test
    else:
        conn = request.getfixturevalue("redis_server").client()
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(params=[True, False], ids=["blmove", "brpoplpush"])
def use_blmove(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


MakeQueue = Callable[..., ReliableQueue]


@pytest.fixture
def make_queue(client: redis.Redis, use_blmove: bool) -> MakeQueue:
    def make(queue: str = QUEUE, worker_id: str = WORKER) -> ReliableQueue:
        return ReliableQueue(client, queue, worker_id, use_blmove=use_blmove)

    return make


@pytest.fixture
def q(make_queue: MakeQueue) -> ReliableQueue:
    return make_queue()


def is_real(client: redis.Redis) -> bool:
    return not isinstance(client, fakeredis.FakeRedis)


def produce(client: redis.Redis, *messages: bytes, queue: str = QUEUE) -> None:
    """Producers LPUSH; the oldest message is at the right end."""
    for message in messages:
        client.lpush(queue, message)


def shared(client: redis.Redis, queue: str = QUEUE) -> list[bytes]:
    """The shared list, oldest first."""
    return list(reversed(client.lrange(queue, 0, -1)))


def retry_payloads(client: redis.Redis, queue: str = QUEUE) -> list[bytes]:
    return sorted(member[NONCE:] for member in client.zrange(f"{queue}:retry", 0, -1))


def total(client: redis.Redis, keys: Keys, *private: str) -> int:
    return (
        client.llen(keys.queue)
        + sum(client.llen(p) for p in (keys.processing, *private))
        + client.zcard(keys.retry)
        + client.llen(keys.dead)
    )


# -- fetch -------------------------------------------------------------------------------------


def test_fetch_moves_the_oldest_message_into_the_private_list(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"first", b"second", b"third")

    assert q.fetch(0.1) == b"first"
    assert q.keys.processing == f"{QUEUE}:processing:{WORKER}"
    assert client.lrange(q.keys.processing, 0, -1) == [b"first"]
    assert shared(client) == [b"second", b"third"]

    assert q.fetch(0.1) == b"second"
    assert q.in_flight() == [b"first", b"second"]  # oldest first
    assert shared(client) == [b"third"]


def test_fetch_on_an_empty_queue_returns_none_after_the_timeout(
    client: redis.Redis, q: ReliableQueue, use_blmove: bool
) -> None:
    timeout = 0.1 if use_blmove else 1.0  # BRPOPLPUSH blocks whole seconds
    started = time.monotonic()
    assert q.fetch(timeout) is None
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 2.0
    if is_real(client):  # fakeredis does not really block on BLMOVE
        assert elapsed >= timeout * 0.8
    assert client.exists(q.keys.processing) == 0


def test_brpoplpush_rounds_a_short_timeout_up_to_one_second(redis_server: RedisServer) -> None:
    conn = redis_server.client()
    try:
        q = ReliableQueue(conn, QUEUE, WORKER, use_blmove=False)
        started = time.monotonic()
        assert q.fetch(0.1) is None  # sent as 0 it would block forever
        assert 0.8 <= time.monotonic() - started < 3.0
    finally:
        conn.close()


def test_auto_detection_uses_blmove_on_a_real_server(redis_server: RedisServer) -> None:
    conn = redis_server.client()
    try:
        q = ReliableQueue(conn, QUEUE, WORKER)  # use_blmove=None: ask the server
        produce(conn, b"m")
        assert q.fetch(0.1) == b"m"
        started = time.monotonic()
        assert q.fetch(0.1) is None
        # A fractional timeout was honoured, so BLMOVE (Redis >= 6.2) was chosen.
        assert time.monotonic() - started < 0.8
    finally:
        conn.close()


def test_two_workers_have_separate_private_lists(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    one, two = make_queue(worker_id="n:1"), make_queue(worker_id="n:2")
    produce(client, b"a", b"b")
    assert one.fetch(0.1) == b"a"
    assert two.fetch(0.1) == b"b"
    assert one.in_flight() == [b"a"]
    assert two.in_flight() == [b"b"]
    assert one.ack(b"b") is False  # not its message
    assert two.in_flight() == [b"b"]


# -- ack, delivery counts, leftovers -----------------------------------------------------------


def test_ack_removes_the_message_and_its_delivery_count(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"m", b"other")
    message = q.fetch(0.1)
    assert message == b"m"
    assert q.count_delivery(message) == 1
    assert q.count_delivery(message) == 2

    assert q.ack(message) is True
    assert q.in_flight() == []
    assert q.deliveries(message) == 0
    assert client.exists(q.keys.deliveries) == 0
    assert shared(client) == [b"other"]  # untouched


def test_ack_returns_false_when_the_message_is_gone(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, b"m")
    message = q.fetch(0.1)
    assert message is not None
    assert q.ack(message) is True
    assert q.ack(message) is False
    assert q.ack(b"never fetched") is False
    # Someone else moved it out of the private list.
    produce(client, b"n")
    assert q.fetch(0.1) == b"n"
    client.delete(q.keys.processing)
    assert q.ack(b"n") is False


def test_ack_removes_one_copy_of_a_duplicated_payload(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"dup", b"dup")
    assert q.fetch(0.1) == b"dup"
    assert q.fetch(0.1) == b"dup"
    assert q.ack(b"dup") is True
    assert q.in_flight() == [b"dup"]


def test_count_delivery_increments_per_call_and_is_keyed_by_payload(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    q = make_queue()
    assert [q.count_delivery(b"a") for _ in range(3)] == [1, 2, 3]
    assert q.count_delivery(b"b") == 1
    assert q.deliveries(b"a") == 3
    assert q.deliveries(b"b") == 1
    assert q.deliveries(b"c") == 0
    assert client.hlen(f"{QUEUE}:deliveries") == 2  # one entry per distinct payload
    # The count belongs to the queue, not the worker: another worker sees and extends it.
    assert make_queue(worker_id="other:1").count_delivery(b"a") == 4
    # ...but not another queue.
    assert make_queue(queue="elsewhere").count_delivery(b"a") == 1


def test_replay_returns_what_an_earlier_life_left_oldest_first(
    client: redis.Redis, q: ReliableQueue
) -> None:
    assert q.replay(started=0) == []
    produce(client, b"a", b"b", b"c")
    taken = q.take([], 3)
    assert [m for m, _ in taken.messages] == [b"a", b"b", b"c"]
    # A new life of the same worker id finds them, in order. `a` had reached the handler:
    # replaying it is a new delivery. `b` and `c` had not: their fetch count stands.
    reborn = ReliableQueue(client, QUEUE, WORKER, use_blmove=True)
    assert reborn.replay(started=1) == [(b"a", 2), (b"b", 1), (b"c", 1)]
    assert reborn.ack(b"a")
    assert reborn.in_flight() == [b"b", b"c"]


def test_replay_counts_a_message_whose_fetch_was_never_counted(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"lost-reply")
    assert q.fetch(0.1) == b"lost-reply"  # the reply never reached the worker: no count
    assert q.replay(started=0) == [(b"lost-reply", 1)]


def test_take_acks_and_fetches_in_one_step_counting_each_delivery(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"a", b"b", b"c")
    first = q.take([], 1)
    assert first.missing_acks == 0 and first.messages == [(b"a", 1)]
    second = q.take([b"a"], 5)
    assert second.messages == [(b"b", 1), (b"c", 1)]
    assert q.deliveries(b"a") == 0, "the ack cleared the count"
    assert q.in_flight() == [b"b", b"c"]
    done = q.take([b"b", b"c", b"not-in-flight"], 1)
    assert done.missing_acks == 1 and done.messages == []
    assert q.in_flight() == []


def test_give_back_returns_unstarted_messages_to_the_head_in_order(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"a", b"b", b"c", b"d", b"new")
    q.take([], 4)
    assert q.ack(b"a")
    assert q.give_back([b"b", b"c", b"d"]) == 3
    assert shared(client) == [b"b", b"c", b"d", b"new"], "b is next, as before"
    assert q.in_flight() == []
    assert q.deliveries(b"b") == 0, "a delivery that never happened is taken back"
    assert q.give_back([b"b"]) == 0, "only what is in the private list moves"
    assert shared(client) == [b"b", b"c", b"d", b"new"]


# -- retries -----------------------------------------------------------------------------------


def test_retry_later_parks_the_message_until_it_is_due(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"late", b"soon")
    late = q.fetch(0.1)
    soon = q.fetch(0.1)
    assert (late, soon) == (b"late", b"soon")
    assert q.count_delivery(b"late") == 1

    q.retry_later(b"late", 3600)
    assert q.in_flight() == [b"soon"]
    assert retry_payloads(client) == [b"late"]
    assert q.deliveries(b"late") == 1  # the count survives a retry
    assert q.promote_due() == 0
    assert shared(client) == []

    q.retry_later(b"soon", 0)
    assert q.in_flight() == []
    assert q.promote_due() == 1
    assert shared(client) == [b"soon"]
    assert retry_payloads(client) == [b"late"]  # still not due
    assert q.promote_due() == 0


def test_a_promoted_retry_goes_behind_waiting_messages(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"failed")
    assert q.fetch(0.1) == b"failed"
    produce(client, b"waiting")
    q.retry_later(b"failed", 0)
    assert q.promote_due() == 1
    assert q.fetch(0.1) == b"waiting"
    assert q.fetch(0.1) == b"failed"


def test_promote_due_respects_its_limit(client: redis.Redis, q: ReliableQueue) -> None:
    messages = [f"m{i}".encode() for i in range(5)]
    produce(client, *messages)
    for _ in messages:
        q.retry_later(q.fetch(0.1) or b"", 0)
    assert q.promote_due(limit=2) == 2
    assert len(shared(client)) == 2
    assert client.zcard(q.keys.retry) == 3
    assert q.promote_due() == 3
    assert sorted(shared(client)) == messages


def test_identical_payloads_retried_together_are_both_kept(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"same", b"same")
    assert q.fetch(0.1) == b"same"
    assert q.fetch(0.1) == b"same"
    q.retry_later(b"same", 0)
    q.retry_later(b"same", 0)
    assert q.in_flight() == []
    assert client.zcard(q.keys.retry) == 2
    assert q.promote_due() == 2
    assert shared(client) == [b"same", b"same"]


# -- dead letters ------------------------------------------------------------------------------


def test_dead_letter_moves_the_message_and_keeps_the_reason(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"poison", b"next")
    message = q.fetch(0.1)
    assert message == b"poison"
    for _ in range(3):
        q.count_delivery(message)
    before = time.time()

    q.dead_letter(message, "ValueError: boom", 3)

    assert q.in_flight() == []
    assert client.lrange(f"{QUEUE}:dead", 0, -1) == [b"poison"]
    assert q.deliveries(message) == 0
    reason = q.dead_reason(message)
    assert reason is not None
    assert reason["reason"] == "ValueError: boom"
    assert reason["attempts"] == 3
    assert reason["worker"] == WORKER
    assert before - 1 <= reason["at"] <= time.time() + 1
    assert q.dead_reason(b"never died") is None
    assert shared(client) == [b"next"]


def test_dead_letters_keep_arrival_order_newest_left(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, b"a", b"b")
    q.fetch(0.1)
    q.fetch(0.1)
    q.dead_letter(b"a", "r", 1)
    q.dead_letter(b"b", "r", 1)
    assert client.lrange(q.keys.dead, 0, -1) == [b"b", b"a"]


# -- payloads ----------------------------------------------------------------------------------

PAYLOADS = {
    "all-bytes": bytes(range(256)),
    "empty": b"",
    "5MB": random.Random(5).randbytes(5 * 1000 * 1000),
    "lua-pattern-chars": b"%s %d ^$()[]*+-?. \x00\r\n",
}


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_payloads_round_trip_byte_for_byte(
    client: redis.Redis, q: ReliableQueue, payload: bytes
) -> None:
    produce(client, payload)

    fetched = q.fetch(0.1)
    assert fetched == payload
    assert q.in_flight() == [payload]
    assert q.count_delivery(fetched) == 1

    q.retry_later(fetched, 0)
    assert q.in_flight() == []
    assert q.promote_due() == 1
    assert client.lrange(q.keys.queue, 0, -1) == [payload]

    again = q.fetch(0.1)
    assert again == payload
    assert q.count_delivery(again) == 2

    q.dead_letter(again, "gave up", 2)
    assert client.lrange(q.keys.dead, 0, -1) == [payload]
    assert client.llen(q.keys.queue) == 0
    assert client.llen(q.keys.processing) == 0
    assert client.zcard(q.keys.retry) == 0
    assert (q.dead_reason(payload) or {}).get("attempts") == 2
    assert q.deliveries(payload) == 0


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", ["{orders}", "{orders}.high", "jobs", "a:b"])
def test_every_key_starts_with_the_queue_name(queue: str) -> None:
    keys = Keys.of(queue, "node:7")
    names = [getattr(keys, f.name) for f in dataclasses.fields(keys)]  # every key, new ones too
    assert len(names) >= 6
    assert all(name.startswith(queue) for name in names)
    assert len(set(names)) == len(names)
    assert keys.processing == f"{queue}:processing:node:7"
    assert keys.dead_reasons == f"{queue}:dead:reasons"


def test_a_hash_tagged_queue_writes_only_keys_under_its_name(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    queue = "{orders}.high"
    q = make_queue(queue=queue)
    produce(client, b"a", b"b", b"c", queue=queue)
    for _ in range(3):
        q.count_delivery(q.fetch(0.1) or b"")
    q.retry_later(b"a", 3600)  # stays in the retry set
    q.dead_letter(b"b", "r", 1)
    q.retry_later(b"c", 0)
    q.promote_due()
    written = {key.decode() for key in client.keys("*")}
    assert written == {
        queue,
        f"{queue}:retry",
        f"{queue}:dead",
        f"{queue}:dead:reasons",
        f"{queue}:deliveries",
    }


# -- conservation ------------------------------------------------------------------------------


def test_operations_never_duplicate_or_lose_a_message(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    workers = [make_queue(worker_id="n:1"), make_queue(worker_id="n:2")]
    keys = workers[0].keys
    privates = [w.keys.processing for w in workers]
    rng = random.Random(1234)
    live: set[bytes] = set()
    acked: set[bytes] = set()
    produced = 0

    def where(message: bytes) -> list[str]:
        places = []
        places += [keys.queue] * client.lrange(keys.queue, 0, -1).count(message)
        for p in privates:
            places += [p] * client.lrange(p, 0, -1).count(message)
        places += [keys.retry] * retry_payloads(client).count(message)
        places += [keys.dead] * client.lrange(keys.dead, 0, -1).count(message)
        return places

    for step in range(150):
        worker = rng.choice(workers)
        in_flight = worker.in_flight()
        op = rng.choice(["produce", "fetch", "ack", "retry", "retry", "dead", "promote"])
        if op == "produce" or (op == "fetch" and client.llen(keys.queue) == 0):
            message = f"msg-{produced}".encode()
            produced += 1
            produce(client, message)
            live.add(message)
        elif op == "fetch":
            assert worker.fetch(0.1) is not None
        elif op in ("ack", "retry", "dead") and in_flight:
            message = rng.choice(in_flight)
            if op == "ack":
                assert worker.ack(message) is True
                live.discard(message)
                acked.add(message)
            elif op == "retry":
                worker.retry_later(message, rng.choice([0, 3600]))
            else:
                worker.dead_letter(message, "test", 1)
        elif op == "promote":
            worker.promote_due()

        assert total(client, keys, *privates[1:]) == len(live), f"step {step}: {op}"
        for message in live:
            assert len(where(message)) == 1, f"step {step} ({op}): {message!r} in {where(message)}"
        for message in acked:
            assert where(message) == [], f"step {step} ({op}): acked {message!r} came back"

    assert produced > 10 and acked and client.llen(keys.dead) and client.zcard(keys.retry)
