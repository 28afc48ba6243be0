"""The fast path (rqworkers/store/fast.py): one message at a time by native commands, with
every guarantee of the script's take. Against fakeredis and a real redis-server."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis

from rqworkers.errors import Superseded
from rqworkers.store import scripts
from rqworkers.store.queue import Delivery, ReliableQueue, snapshot

QUEUE = "{jobs}"
WORKER = "n:1"


def worker(client: redis.Redis, worker_id: str = WORKER) -> ReliableQueue:
    """A worker's queue as `rqworkers run` makes it for concurrency 1, replayed."""
    q = ReliableQueue(client, QUEUE, worker_id, keep_connection=True, fast_path=True)
    q.hold_lease(30)
    q.replay(b"")
    unlooked(q)
    return q


def unlooked(q: ReliableQueue) -> None:
    """No look for a pause for an hour: it goes through the script, once a second."""
    q._pause_looked_up = time.monotonic() + 3600


def push(client: redis.Redis, *payloads: bytes) -> None:
    for payload in payloads:
        client.lpush(QUEUE, payload)


def take_one(q: ReliableQueue, acks: list[Delivery] = ()) -> Delivery | None:  # type: ignore[assignment]
    fast = [(d.fast, d.element) for d in acks if d.fast]
    taken = q.take([d.element for d in acks if not d.fast], 1, fast_acks=fast).deliveries
    return taken[0] if taken else None


def fast_lists(client: redis.Redis, q: ReliableQueue) -> list[list[bytes]]:
    return [client.lrange(name, 0, -1) for name in q.fast.lists]


def test_a_take_of_one_moves_the_payload_as_it_came_into_a_fast_list(
    client: redis.Redis,
) -> None:
    q = worker(client)
    push(client, b"a", b"b")
    a = take_one(q)
    assert a is not None and a.payload == b"a" and a.attempts == 0 and a.fast
    assert client.llen(q.keys.processing) == 0
    assert [b"a"] in fast_lists(client, q)
    b = take_one(q, [a])  # the ack goes with the next take
    assert b is not None and b.payload == b"b" and b.fast != a.fast, "the other list"
    assert fast_lists(client, q) in ([[], [b"b"]], [[b"b"], []])
    assert q.ack(b) is True and q.ack(b) is False
    assert fast_lists(client, q) == [[], []] and client.llen(QUEUE) == 0


def test_it_costs_native_commands_only(client: redis.Redis) -> None:
    if isinstance(client, fakeredis.FakeRedis):
        pytest.skip("INFO commandstats is a real server's")
    q = worker(client)
    push(client, *[b"x%d" % n for n in range(10)])
    client.config_resetstat()
    previous = None
    for _ in range(10):
        previous = take_one(q, [previous] if previous else [])
    stats = client.info("commandstats")
    assert stats["cmdstat_lmove"]["calls"] == 10
    assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats


def test_twins_stay_separate_and_a_resent_ack_removes_no_twin(client: redis.Redis) -> None:
    q = worker(client)
    push(client, b"same", b"same", b"same")
    first = take_one(q)
    assert first is not None
    second = take_one(q, [first])
    assert second is not None and second.payload == b"same"
    # The reply of that pipeline lost: the ack is sent again. The twin just taken is in
    # the other fast list, and stays.
    assert q.fast.ack([(first.fast, first.element)]) == 1
    assert sorted(map(len, fast_lists(client, q))) == [0, 1]
    third = take_one(q, [second])
    assert third is not None and q.ack(third)
    assert fast_lists(client, q) == [[], []] and client.llen(QUEUE) == 0


@pytest.mark.parametrize("payload", [b"", b"x" * 1_000_000, b"rqw1:dedup:", "\u00e9".encode()])
def test_empty_huge_and_odd_payloads_go_through_whole(client: redis.Redis, payload: bytes) -> None:
    q = worker(client)
    push(client, payload, payload)
    one = take_one(q)
    assert one is not None and one.payload == payload and one.fast
    two = take_one(q, [one])
    assert two is not None and two.payload == payload
    assert q.ack(two) and fast_lists(client, q) == [[], []] and client.llen(QUEUE) == 0


def test_what_only_the_script_may_take_goes_back_and_the_script_takes_it(
    client: redis.Redis,
) -> None:
    q = worker(client)
    forged = b"rqw1:abc.1:7:inner"  # looks like an envelope with 7 attempts
    push(client, forged, b"after")
    got = take_one(q)
    assert got is not None and got.payload == forged and got.attempts == 0 and not got.fast
    assert client.llen(q.keys.processing) == 1
    nxt = take_one(q, [got])
    assert nxt is not None and nxt.payload == b"after"


def test_a_nudge_is_dropped_not_delivered(client: redis.Redis) -> None:
    q = worker(client)
    token = scripts.new_nudge_token()
    client.set(q.keys.nudge, token)
    client.lpush(QUEUE, token)
    push(client, b"real")
    got = take_one(q)
    got = got or take_one(q)  # a take woken by the nudge may take nothing
    assert got is not None and got.payload == b"real"
    assert client.llen(QUEUE) == 0


def test_a_due_retry_comes_first_and_the_fresh_message_keeps_its_place(
    client: redis.Redis,
) -> None:
    q = worker(client)
    push(client, b"fresh-1", b"fresh-2")
    failed = take_one(q)
    assert failed is not None and q.retry_later(failed, 0)  # due at once
    assert client.zcard(q.keys.retry) == 1 and fast_lists(client, q) == [[], []]
    again = take_one(q)
    assert again is not None and again.payload == b"fresh-1" and again.attempts == 1
    assert client.lrange(QUEUE, 0, -1) == [b"fresh-2"], "put back where it was"
    nxt = take_one(q, [again])
    assert nxt is not None and nxt.payload == b"fresh-2"


def test_a_fast_delivery_dead_lettered_keeps_its_payload(client: redis.Redis) -> None:
    q = worker(client)
    push(client, b"poison")
    got = take_one(q)
    assert got is not None and q.dead_letter(got, {"reason": "r", "attempts": 1})
    assert client.lrange(q.keys.dead, 0, -1) == [b"poison"]
    assert fast_lists(client, q) == [[], []]


def test_a_successor_charges_a_started_fast_delivery_and_seals_the_lists(
    client: redis.Redis,
) -> None:
    old = worker(client)
    push(client, b"ran", b"next")
    ran = take_one(old)
    assert ran is not None
    new = ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=True)
    [left] = new.replay(b"")  # the old process's end: it had started
    unlooked(new)
    assert left.payload == b"ran" and left.attempts == 1
    with pytest.raises(Superseded):
        take_one(old, [ran])
    assert client.lrange(QUEUE, 0, -1) == [b"next"], "the superseded process moved nothing"
    assert all(client.type(name) == b"string" for name in old.fast.lists)


def test_a_fast_take_that_never_started_is_not_charged(client: redis.Redis) -> None:
    old = worker(client)
    push(client, b"taken")
    unstarted = old.next_take_id  # what the scoreboard names before the take
    assert take_one(old) is not None
    new = ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=True)
    [left] = new.replay(unstarted)
    assert left.payload == b"taken" and left.attempts == 0


def test_after_a_redis_error_its_own_replay_hands_back_what_it_holds(
    client: redis.Redis,
) -> None:
    q = worker(client)
    push(client, b"held")
    assert take_one(q) is not None  # and the reply was lost, say
    [left] = q.replay(None)
    assert left.payload == b"held" and left.attempts == 0
    assert q.ack(left) and client.llen(q.keys.processing) == 0
    push(client, b"later")
    later = take_one(q)
    assert later is not None and later.fast and q.ack(later), "still its own lists"


def test_a_reclaim_charges_fast_deliveries_and_seals_the_lists(client: redis.Redis) -> None:
    lost = worker(client)
    push(client, b"in-hand")
    in_hand = take_one(lost)
    assert in_hand is not None
    client.delete(lost.keys.lease)
    reclaimer = ReliableQueue(client, QUEUE, WORKER)
    assert reclaimer.reclaim(b"") == 1
    members = client.zrange(lost.keys.retry, 0, -1)
    assert [(d.payload, d.attempts) for d in map(Delivery.parse, members)] == [(b"in-hand", 1)]
    with pytest.raises(Superseded):
        take_one(lost, [in_hand])


def test_status_counts_fast_deliveries_in_flight(client: redis.Redis) -> None:
    q = worker(client)
    push(client, b"a", b"b")
    assert take_one(q) is not None
    assert snapshot(client, QUEUE).in_flight == 1
    assert [d.payload for d in q.in_flight()] == [b"a"]


def test_a_lost_reply_mid_pipeline_loses_and_doubles_nothing(client: redis.Redis) -> None:
    """Each prefix of the pipeline having run (Redis runs a pipeline in order), a replay
    after the error leaves every message in exactly one place, none handled twice."""
    for ran in range(3):  # nothing, the ack, the ack and the take
        client.flushall()
        q = worker(client)
        push(client, b"same", b"same")
        first = take_one(q)
        assert first is not None
        into = q.fast.lists[1] if first.fast == q.fast.lists[0] else q.fast.lists[0]
        if ran >= 1:
            client.lrem(first.fast, -1, first.element)
        if ran >= 2:
            client.lmove(QUEUE, into, "RIGHT", "LEFT")
        q.fast.ack([(first.fast, first.element)])  # the outbox sends the ack again
        left = q.replay(None)
        expected = 1 if ran == 2 else 0
        assert len(left) == expected and client.llen(QUEUE) == 1 - expected
        time.sleep(0)


def test_out_of_memory_the_script_takes_and_the_queue_drains(client: redis.Redis) -> None:
    if isinstance(client, fakeredis.FakeRedis):
        pytest.skip("maxmemory is a real server's")
    q = worker(client)
    push(client, b"a", b"b")
    client.config_set("maxmemory-policy", "noeviction")
    client.set("filler", b"x" * 2_000_000)
    client.config_set("maxmemory", "1mb")
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.lmove(QUEUE, "probe", "RIGHT", "LEFT")  # what the fast path would send
        a = take_one(q)
        assert a is not None and a.payload == b"a" and not a.fast, "taken by the script"
        b = take_one(q, [a])
        assert b is not None and b.payload == b"b" and q.ack(b)
        assert client.llen(QUEUE) == 0 and client.llen(q.keys.processing) == 0
    finally:
        client.config_set("maxmemory", "0")


def test_a_predecessor_seen_to_end_leaves_no_seal(client: redis.Redis) -> None:
    """Its manager reaped it: nothing can run in it, and a seal is a key for a day, one per
    restart (`max_requests` may recycle a worker often)."""
    old = worker(client)
    push(client, b"ran")
    assert take_one(old) is not None
    new = ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=True)
    [left] = new.replay(b"", may_run=False)
    assert left.payload == b"ran" and left.attempts == 1
    assert [client.type(name) for name in old.fast.lists] == [b"none", b"none"]
    assert client.smembers(new.keys.fast_owners) == {new.owner_name[:-1]}
