"""One contract for `ReliableQueue`, run against fakeredis and a real redis-server, with
`BLMOVE` and with the `BRPOPLPUSH` fallback.

The invariant behind every test: a message moves between keys atomically, so at any time it
sits in exactly one of the shared list, a landing list, a private list, the retry set or the
dead list; and identical payloads are independent messages, each with its own attempts.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable

import fakeredis
import pytest
import redis

from rqworkers.client.producer import Producer
from rqworkers.errors import Superseded
from rqworkers.store import connections, direct, scripts
from rqworkers.store.direct import STALE_AFTER
from rqworkers.store.queue import DeadLetters, Delivery, Keys, ReliableQueue
from tests.support import RedisServer

QUEUE = "jobs"
WORKER = "node-a:1"


# (BLMOVE or the BRPOPLPUSH fallback, scripts on a kept connection or through the pool)
@pytest.fixture(
    params=[(True, True), (False, False), (True, False)],
    ids=["blmove-kept", "brpoplpush-pooled", "blmove-pooled"],
)
def variant(request: pytest.FixtureRequest) -> tuple[bool, bool]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def use_blmove(variant: tuple[bool, bool]) -> bool:
    return variant[0]


MakeQueue = Callable[..., ReliableQueue]


@pytest.fixture
def make_queue(client: redis.Redis, variant: tuple[bool, bool]) -> MakeQueue:
    use_blmove, keep = variant

    def make(queue: str = QUEUE, worker_id: str = WORKER) -> ReliableQueue:
        return ReliableQueue(
            client, queue, worker_id, use_blmove=use_blmove, keep_connection=keep, fast_path=True
        )

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


def retrying(client: redis.Redis, queue: str = QUEUE) -> list[tuple[bytes, int]]:
    """(payload, attempts) of the retry set, soonest first."""
    members = client.zrange(Keys(queue).retry, 0, -1)
    return [(d.payload, d.attempts) for d in map(Delivery.parse, members)]


def take_all(q: ReliableQueue, limit: int = 100) -> list[Delivery]:
    return q.take([], limit).deliveries


# -- take, ack and fetch ---------------------------------------------------------------------


def test_take_moves_the_oldest_messages_into_the_private_list(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"first", b"second", b"third")
    taken = q.take([], 2)
    assert [d.payload for d in taken.deliveries] == [b"first", b"second"]
    assert all(d.attempts == 0 for d in taken.deliveries)
    assert taken.missing_acks == 0 and taken.next_due is None
    assert shared(client) == [b"third"]
    assert q.in_flight() == taken.deliveries  # oldest first
    # Into an empty private list, fresh messages go as a segment: the oldest in its marked
    # envelope, naming the segment's last number, the others as they came.
    first = taken.deliveries[0]
    assert client.lrange(q.keys.processing, 0, -1) == [
        b"second", b"%s%s+2:0:first" % (scripts.PREFIX.encode(), first.id)
    ]  # fmt: skip


def test_a_take_onto_deliveries_in_hand_wraps_each_in_its_envelope(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"first", b"second", b"third", b"fourth")
    (held,) = q.take([], 1).deliveries  # one alone is no segment
    taken = q.take([], 2).deliveries
    assert q.in_flight() == [held, *taken]
    assert client.lrange(q.keys.processing, 0, -1) == [d.element for d in reversed([held, *taken])]
    assert all(d.element.startswith(scripts.PREFIX.encode()) for d in [held, *taken])


def test_a_worker_that_acks_out_of_order_takes_no_segment(
    client: redis.Redis, q: ReliableQueue
) -> None:
    q.acks_in_order = False
    produce(client, b"first", b"second")
    taken = q.take([], 2).deliveries
    assert client.lrange(q.keys.processing, 0, -1) == [d.element for d in reversed(taken)]


def test_every_envelope_of_a_large_take_is_the_one_the_worker_names(
    client: redis.Redis, q: ReliableQueue
) -> None:
    # TAKE writes the first 100 envelopes' tails from constants and formats the rest: acks
    # and moves name an envelope as `Delivery.element` builds it, so the two must agree
    # byte for byte, past the constants too, or an ack would miss and a message run twice.
    produce(client, *[b"same"] * 150, b"x" * 1000)
    q.acks_in_order = False  # each in its envelope, as the script makes it
    taken = q.take([], 151).deliveries
    assert [e for e in reversed(client.lrange(q.keys.processing, 0, -1))] == [
        b"%s%s:0:%s" % (scripts.PREFIX.encode(), d.id, d.payload) for d in taken
    ]
    assert [d.id.rsplit(b".", 1)[1] for d in taken] == [b"%d" % n for n in range(1, 152)]
    # Acked one by one and as one trim alike, every envelope is found.
    assert q.take([d.element for d in taken[:120]], 0).missing_acks == 0
    assert q.take([taken[120].element, taken[-1].element], 0, trim=31).missing_acks == 0
    assert client.llen(q.keys.processing) == 0


def test_identical_payloads_are_separate_deliveries_with_their_own_ids(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, *[b"refresh"] * 5)
    taken = take_all(q)
    assert [d.payload for d in taken] == [b"refresh"] * 5
    assert len({d.element for d in taken}) == 5, "each delivery is unique"
    # Acking one twin removes that one only; acking it again removes nothing else.
    assert q.take([taken[2].element], 0).missing_acks == 0
    assert q.take([taken[2].element], 0).missing_acks == 1
    assert [d.id for d in q.in_flight()] == [d.id for d in taken if d is not taken[2]]


def test_a_twin_s_retry_and_dead_letter_never_change_another_twin_s_count(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, *[b"1"] * 3)
    one, two, three = take_all(q)
    assert q.retry_later(one, 0)
    assert q.dead_letter(two, {"reason": "boom", "attempts": 1})
    again = take_all(q)
    assert [(d.payload, d.attempts) for d in again] == [(b"1", 1)], "only the retried twin"
    assert [d.attempts for d in q.in_flight()] == [0, 1], "the untouched twin is still fresh"
    assert client.lrange(q.keys.dead, 0, -1) == [b"1"]
    q.take([three.element, again[0].element], 0)
    assert client.llen(q.keys.processing) == 0


@pytest.mark.parametrize(
    "payload",
    [b"", b"a:b:c", b"rqw1:fake:99:x", b"\x00\xff" * 100, b"x" * 1_000_000, "é".encode()],
    ids=["empty", "colons", "looks-like-an-envelope", "binary", "1MB", "utf8"],
)
def test_odd_payloads_pass_byte_for_byte(
    client: redis.Redis, q: ReliableQueue, payload: bytes
) -> None:
    produce(client, payload, payload)
    first, second = take_all(q)
    assert first.payload == second.payload == payload and first.attempts == 0
    assert q.retry_later(first, 0)
    assert q.dead_letter(second, {"reason": "r", "attempts": 1})
    assert client.lrange(q.keys.dead, 0, -1) == [payload]
    (retried,) = take_all(q)
    assert retried.payload == payload and retried.attempts == 1
    assert q.replay(b"")[0].payload == payload


def test_acks_travel_with_the_next_take(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, b"a", b"b")
    (a,) = q.take([], 1).deliveries
    taken = q.take([a.element], 1)
    assert taken.missing_acks == 0
    assert [d.payload for d in taken.deliveries] == [b"b"]
    assert [d.payload for d in q.in_flight()] == [b"b"]


def test_fetch_lands_one_message_and_the_next_take_wraps_it(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"first", b"second")
    assert q.fetch(0.1) is True
    assert client.lrange(q.keys.landing, 0, -1) == [b"first"]
    assert client.exists(q.keys.processing) == 0, "only a script writes envelopes"
    assert [d.payload for d in q.take([], 1).deliveries] == [b"second"], "not told: left"
    taken = q.take([], 5, landed=True)
    assert [d.payload for d in taken.deliveries] == [b"first"]
    assert client.exists(q.keys.landing) == 0


def test_fetch_on_an_empty_queue_returns_false_after_the_timeout(
    client: redis.Redis, q: ReliableQueue, use_blmove: bool
) -> None:
    timeout = 0.1 if use_blmove else 1.0  # BRPOPLPUSH blocks whole seconds
    started = time.monotonic()
    assert q.fetch(timeout) is False
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 2.0
    if is_real(client):  # fakeredis does not really block on BLMOVE
        assert elapsed >= timeout * 0.8
    assert client.exists(q.keys.landing) == 0


def test_brpoplpush_rounds_a_short_timeout_up_to_one_second(redis_server: RedisServer) -> None:
    conn = redis_server.client()
    try:
        q = ReliableQueue(conn, QUEUE, WORKER, use_blmove=False)
        started = time.monotonic()
        assert q.fetch(0.1) is False  # sent as 0 it would block forever
        assert 0.8 <= time.monotonic() - started < 3.0
    finally:
        conn.close()


def test_auto_detection_uses_blmove_on_a_real_server(redis_server: RedisServer) -> None:
    conn = redis_server.client()
    try:
        q = ReliableQueue(conn, QUEUE, WORKER)  # use_blmove=None: ask the server
        produce(conn, b"m")
        assert q.fetch(0.1) is True
        q.take([], 1, landed=True)
        started = time.monotonic()
        assert q.fetch(0.1) is False
        # A fractional timeout was honoured, so BLMOVE (Redis >= 6.2) was chosen.
        assert time.monotonic() - started < 0.8
    finally:
        conn.close()


@pytest.mark.parametrize("limit", [1, 10, 10_000])
def test_take_honours_its_limit_at_any_size(
    client: redis.Redis, q: ReliableQueue, limit: int
) -> None:
    produce(client, *[b"same"] * 50, b"last")
    taken = q.take([], limit).deliveries
    assert len(taken) == min(limit, 51)
    assert client.llen(QUEUE) == 51 - len(taken)
    assert len({d.id for d in taken}) == len(taken)


# -- retries -------------------------------------------------------------------------------------


def test_a_retry_waits_for_its_time_then_comes_first_with_one_more_attempt(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"late", b"waiting")
    (late,) = q.take([], 1).deliveries
    assert q.retry_later(late, 3600)
    taken = q.take([], 5)
    assert [d.payload for d in taken.deliveries] == [b"waiting"], "not due yet"
    assert taken.next_due is not None and taken.next_due > time.time() + 3000
    client.zadd(q.keys.retry, {client.zrange(q.keys.retry, 0, 0)[0]: 0})  # now due
    produce(client, b"new")
    taken = q.take([], 5)
    assert [(d.payload, d.attempts) for d in taken.deliveries] == [(b"late", 1), (b"new", 0)]
    assert taken.next_due is None


def test_retry_of_a_delivery_that_is_gone_copies_nothing(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"m")
    (m,) = take_all(q)
    assert q.retry_later(m, 0) is True
    assert q.retry_later(m, 0) is False, "sent again after a lost reply: no second copy"
    assert retrying(client) == [(b"m", 1)]
    assert client.llen(q.keys.processing) == 0


def test_retries_keep_counting_to_the_dead_list(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, b"poison", b"poison")
    for attempt in range(3):
        first, second = take_all(q)
        assert first.attempts == second.attempts == attempt
        assert q.retry_later(first, 0) and q.retry_later(second, 0)
    assert retrying(client) == [(b"poison", 3), (b"poison", 3)]


# -- dead letters --------------------------------------------------------------------------------


def test_dead_twins_keep_their_own_records(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, *[b"twin"] * 3, b"other")
    deliveries = take_all(q)
    for n, d in enumerate(deliveries):
        assert q.dead_letter(d, {"reason": f"reason {n}", "attempts": n + 1})
    assert q.dead_letter(deliveries[0], {"reason": "again", "attempts": 9}) is False
    dead = DeadLetters(client, QUEUE)
    letters = dead.page(0, 10)
    assert [letter.payload for letter in letters] == [b"other", b"twin", b"twin", b"twin"]
    assert [(letter.info or {}).get("reason") for letter in letters] == [
        "reason 3",
        "reason 2",
        "reason 1",
        "reason 0",
    ]
    assert [(letter.info or {}).get("attempts") for letter in letters] == [4, 3, 2, 1]
    assert [letter.copies for letter in letters] == [1, 3, 3, 3]
    # Paging from the middle finds the same copy's record.
    assert [(letter.info or {}).get("reason") for letter in dead.page(2, 2)] == [
        "reason 1",
        "reason 0",
    ]
    info = q.dead_reason(b"twin")
    assert info is not None and info["reason"] == "reason 2" and info["copies"] == 3


def test_a_reason_with_undecodable_bytes_is_kept(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, b"surr:\xffx", b"surr:\xffx")
    first, second = take_all(q)
    reason = b"ValueError: bad \xff".decode("utf-8", "surrogateescape")
    assert q.dead_letter(first, {"reason": reason, "attempts": 1, "traceback": reason})
    assert q.dead_letter(second, {"reason": "plain", "attempts": 1})
    letters = DeadLetters(client, QUEUE).page()
    assert [(letter.info or {}).get("reason") for letter in letters] == [
        "plain",
        "ValueError: bad ?",
    ]
    assert [letter.copies for letter in letters] == [2, 2]


def test_purging_a_copy_past_the_kept_records_leaves_the_others(
    client: redis.Redis, q: ReliableQueue
) -> None:
    kept = scripts.KEPT_TWIN_RECORDS + 1  # the newest record plus the older ones kept
    produce(client, *[b"1"] * (kept + 2))
    for n, d in enumerate(take_all(q, kept + 2)):
        assert q.dead_letter(d, {"reason": f"copy {n}", "attempts": 1})
    dead = DeadLetters(client, QUEUE)
    oldest = dead.get(kept + 1)
    assert oldest is not None and oldest.info is None and oldest.copies == kept + 2
    assert dead.purge([oldest]) == 1
    reasons = [(letter.info or {}).get("reason") for letter in dead.page(0, kept + 1)]
    assert reasons == [f"copy {n}" for n in range(kept + 1, 1, -1)] + [None], "none lost"


def test_requeue_of_one_twin_takes_its_own_record(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, *[b"twin"] * 3)
    for n, d in enumerate(take_all(q)):
        q.dead_letter(d, {"reason": f"r{n}", "attempts": 1})
    dead = DeadLetters(client, QUEUE)
    middle = dead.get(1)
    assert middle is not None and (middle.info or {})["reason"] == "r1"
    assert dead.requeue([middle]) == 1
    assert shared(client) == [b"twin"]
    assert [(letter.info or {}).get("reason") for letter in dead.page()] == ["r2", "r0"]
    assert [letter.copies for letter in dead.page()] == [2, 2]
    assert dead.purge(dead.page()) == 2
    assert client.llen(q.keys.dead) == 0 and client.hlen(q.keys.dead_reasons) == 0
    (requeued,) = take_all(q)
    assert requeued.attempts == 0, "a requeued letter starts afresh"


# -- replay, give back, reclaim ----------------------------------------------------------------


def test_replay_charges_only_the_deliveries_that_had_started(
    client: redis.Redis, q: ReliableQueue, make_queue: MakeQueue
) -> None:
    produce(client, *[b"same"] * 4)
    _, _, c, _ = take_all(q)  # a and b reached the handler; c and d (their twins) did not
    after = make_queue()  # the next life of this worker
    replayed = after.replay(c.id)
    assert [x.payload for x in replayed] == [b"same"] * 4
    assert [x.attempts for x in replayed] == [1, 1, 0, 0], "a and b started; c and d did not"
    assert [x.attempts for x in after.replay(c.id)] == [1, 1, 0, 0], "sent again: no charge"
    assert [x.attempts for x in after.replay(None)] == [1, 1, 0, 0], "its own list: no charge"
    assert [x.attempts for x in make_queue().replay(b"")] == [2, 2, 1, 1], "unknown: all"


def test_replay_of_unknown_charges_each_leftover_once_even_sent_twice(
    client: redis.Redis, q: ReliableQueue, make_queue: MakeQueue
) -> None:
    produce(client, b"a", b"b", b"landed-1", b"landed-2")
    take_all(q, 2)
    assert q.fetch(0.1) and q.fetch(0.1)
    after = make_queue()
    first = after.replay(b"")
    assert [(x.payload, x.attempts) for x in first] == [
        (b"a", 1),
        (b"b", 1),
        (b"landed-1", 0),
        (b"landed-2", 0),
    ], "landed messages never ran: never charged"
    assert [x.attempts for x in after.replay(b"")] == [1, 1, 0, 0], "a resent replay"


def test_replay_takes_in_a_landed_message_uncharged(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, b"old", b"landed")
    take_all(q, 1)
    assert q.fetch(0.1)
    replayed = q.replay(None)
    assert [(x.payload, x.attempts) for x in replayed] == [(b"old", 0), (b"landed", 0)]
    assert client.exists(q.keys.landing) == 0


def test_replay_wraps_elements_that_are_not_envelopes(
    client: redis.Redis, q: ReliableQueue
) -> None:
    client.lpush(q.keys.processing, b"legacy-1", b"legacy-2")
    replayed = q.replay(None)
    assert [(x.payload, x.attempts) for x in replayed] == [(b"legacy-1", 0), (b"legacy-2", 0)]
    assert q.take([x.element for x in replayed], 0).missing_acks == 0


def test_a_member_of_the_retry_set_that_is_not_an_envelope_is_taken_whole_and_fresh(
    client: redis.Redis, q: ReliableQueue
) -> None:
    """Whatever another program adds to the retry set arrives byte for byte, uncharged."""
    client.zadd(q.keys.retry, {b"\x01" * 8 + b"old:payload": 0, b"": 0})
    taken = sorted((d.payload, d.attempts) for d in take_all(q))
    assert taken == [(b"", 0), (b"\x01" * 8 + b"old:payload", 0)]


def test_give_back_returns_untried_messages_to_the_head_and_keeps_counts(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"tried", b"a", b"b", b"later")
    (tried,) = take_all(q, 1)
    q.retry_later(tried, 0)
    taken = take_all(q, 3)
    assert [(d.payload, d.attempts) for d in taken] == [(b"tried", 1), (b"a", 0), (b"b", 0)]
    assert q.give_back(taken) == 3
    assert shared(client) == [b"a", b"b", b"later"], "untried ones back at the head, in order"
    assert retrying(client) == [(b"tried", 1)], "the count survives"
    assert [(d.payload, d.attempts) for d in take_all(q)] == [
        (b"tried", 1),
        (b"a", 0),
        (b"b", 0),
        (b"later", 0),
    ]
    assert q.give_back(taken) == 0, "given back already"


def test_reclaim_of_an_own_slot_charges_only_what_had_started(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    slot = make_queue(worker_id="node-a:1")
    produce(client, b"ran", b"waited", b"waited")
    _, waited, _ = take_all(slot)
    assert make_queue(worker_id="node-a:1").reclaim(waited.id) == 3
    taken = take_all(make_queue(worker_id="node-a:2"))
    assert [(d.payload, d.attempts) for d in taken] == [(b"ran", 1), (b"waited", 0), (b"waited", 0)]


def test_reclaim_charges_every_delivery_and_keeps_the_order(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    lost = make_queue(worker_id="node-a:1")
    lost.hold_lease(ttl=60)
    produce(client, b"m1", b"m1", b"m2", b"landed", b"later")
    take_all(lost, 3)
    assert lost.fetch(0.1)
    assert lost.reclaim() is None, "a live lease is never reclaimed"
    client.delete(lost.keys.lease)  # the node is gone: its lease expired
    assert make_queue(worker_id="node-a:1").reclaim() == 4
    assert client.llen(lost.keys.processing) == 0 and client.llen(lost.keys.landing) == 0
    rescuer = make_queue(worker_id="node-b:1")
    assert [(d.payload, d.attempts) for d in take_all(rescuer)] == [
        (b"m1", 1),
        (b"m1", 1),
        (b"m2", 1),
        (b"landed", 0),
        (b"later", 0),
    ]


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", ["{orders}", "{orders}.high", "jobs", "a:b"])
def test_every_key_starts_with_the_queue_name(queue: str) -> None:
    keys = Keys.of(queue, "node:7")
    names = list(keys.names().values())  # every key, new ones too
    assert len(names) >= 6
    assert all(name.startswith(queue) for name in names)
    assert len(set(names)) == len(names)
    assert keys.processing == f"{queue}:processing:node:7"
    assert keys.dead_reasons == f"{queue}:dead:reasons"


def test_every_script_names_keys_that_exist() -> None:
    keys = Keys.of("q", "w")
    names = ("TAKE", "REPLAY", "GIVE_BACK", "RETRY_LATER", "DEAD_LETTER", "RECLAIM", "LEASE")
    for name in names:
        script: scripts.Script = getattr(scripts, name)
        assert keys.of_script(script), name
        header = f"local {', '.join(script.keys)} = KEYS[1], "
        assert script.legacy_source.startswith(header)
        flags = f"#!lua flags={','.join(script.flags)}\n" if script.flags else ""
        assert script.source == flags + script.legacy_source


def test_a_hash_tagged_queue_writes_only_keys_under_its_name(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    queue = "{orders}.high"
    q = make_queue(queue=queue)
    produce(client, b"a", b"b", b"c", queue=queue)
    a, b, c = take_all(q)
    q.retry_later(a, 3600)  # stays in the retry set
    q.dead_letter(b, {"reason": "r", "attempts": 1})
    q.take([c.element], 0)
    written = {key.decode() for key in client.keys("*")}
    keys = Keys(queue, WORKER)  # a worker without a lease registers as it takes
    assert written == {keys.retry, keys.dead, keys.dead_reasons, keys.registry, keys.owner}


# -- conservation ------------------------------------------------------------------------------


def test_operations_never_duplicate_or_lose_a_message(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    """Random operations over two workers and few distinct payloads (so twins abound):
    each message produced is, at every step, in exactly one place, with its own count."""
    workers = [make_queue(worker_id="n:1"), make_queue(worker_id="n:2")]
    keys = workers[0].keys
    rng = random.Random(1234)
    produced = acked = 0

    def count() -> int:
        total = client.llen(keys.queue) + client.zcard(keys.retry) + client.llen(keys.dead)
        for w in workers:
            total += client.llen(w.keys.processing) + client.llen(w.keys.landing)
            total += sum(client.llen(name) for name in w.fast.lists)  # the fast path's
        return total

    for step in range(200):
        worker = rng.choice(workers)
        in_flight = worker.in_flight()
        op = rng.choice(["produce", "take", "fetch", "ack", "retry", "dead", "replay", "back"])
        if op == "produce":
            produce(client, rng.choice([b"a", b"b", b""]))
            produced += 1
        elif op == "take":
            worker.take([], rng.choice([1, 3]))
        elif op == "fetch" and client.llen(keys.queue):
            assert worker.fetch(0.1)
        elif op in ("ack", "retry", "dead") and in_flight:
            d = rng.choice(in_flight)
            if op == "ack":
                assert worker.ack(d) is True
                assert worker.ack(d) is False, "a resent ack removes no twin"
                acked += 1
            elif op == "retry":
                assert worker.retry_later(d, rng.choice([0, 3600])) is True
            else:
                assert worker.dead_letter(d, {"reason": "test", "attempts": 1}) is True
        elif op == "replay":
            worker.replay(rng.choice([None, b"", *(d.id for d in in_flight[:2])]))
        elif op == "back" and in_flight:
            worker.give_back(in_flight[-1:])
        assert count() == produced - acked, f"step {step}: {op}"
        ids = [d.id for w in workers for d in w.in_flight()]
        assert len(ids) == len(set(ids)), f"step {step}: a delivery id repeated"

    assert produced > 10 and acked and client.llen(keys.dead) and client.zcard(keys.retry)


# -- the kept connection (`rqworkers.store.direct`) ------------------------------------------------


@pytest.fixture
def kept(redis_server: RedisServer) -> tuple[redis.Redis, ReliableQueue]:
    """A worker's queue on a real Redis, scripts on its kept connection, two messages."""
    client = redis_server.client()
    produce(client, b"one", b"two")
    return client, ReliableQueue(client, QUEUE, WORKER, keep_connection=True)


def test_a_kept_connection_loads_its_scripts_again_after_script_flush(
    kept: tuple[redis.Redis, ReliableQueue],
) -> None:
    client, q = kept
    first = q.take([], 1).deliveries
    client.script_flush()  # what a restarted or failed-over server looks like
    second = q.take([d.element for d in first], 1).deliveries
    assert [d.payload for d in first + second] == [b"one", b"two"]
    assert q.in_flight() == second


def test_a_kept_connection_the_server_closed_while_idle_is_replaced_before_use(
    kept: tuple[redis.Redis, ReliableQueue],
) -> None:
    client, q = kept
    q.take([], 1)
    client.client_kill_filter(skipme=True, _type="normal")  # every connection but this one
    time.sleep(2 * STALE_AFTER)  # idle: a worker blocked on another connection, say
    assert [d.payload for d in q.take([], 1).deliveries] == [b"two"], "no error"
    assert [d.payload for d in q.in_flight()] == [b"one", b"two"]


ARGUMENTS = [
    ("EVALSHA", "f" * 40, 2, "jobs", "jobs:processing:n:1"),
    ("LMOVE", b"q", "\u00e9t\u00e9 \u2603", "LEFT", "RIGHT"),  # text beyond ASCII, with a space
    ("SET", b"", "", 0, -7, 2**70, 1.5, 1765000000.123456, float("inf"), 1e-7),
    ("RPUSH", "k", bytes(range(256)) * 3, b"\r\n$3\r\n", memoryview(b"view"), bytearray(b"ba")),
]


@pytest.mark.parametrize("command", ARGUMENTS, ids=lambda c: str(c[0]))
@pytest.mark.parametrize("hiredis", [True, False], ids=["hiredis", "own"])
def test_the_kept_connection_packs_every_argument_as_redis_py_does(
    command: tuple[object, ...], hiredis: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hiredis:
        monkeypatch.setattr(direct, "pack_command", None)
    client = redis.Redis()
    packer = direct.Packer(client)
    expected = b"".join(client.connection_pool.make_connection().pack_command(*command))
    assert packer.pack(packer.head(*command[:2]), command[2:]) == expected
    assert packer.pack_all([command, command[:2]]) == expected + b"".join(
        client.connection_pool.make_connection().pack_command(*command[:2])
    )


@pytest.mark.parametrize("value", [True, None, object()], ids=["bool", "None", "object"])
def test_the_kept_connection_refuses_what_redis_py_refuses(value: object) -> None:
    with pytest.raises(redis.DataError):
        direct.Packer(redis.Redis()).pack((b"SET", b"k"), [value])


@pytest.mark.parametrize(
    ("query", "text"),
    [("encoding=latin-1", "\u00fcber"), ("encoding_errors=surrogateescape", "\u2603 \udcff")],
    ids=["latin-1", "surrogateescape"],
)
@pytest.mark.parametrize("hiredis", [True, False], ids=["hiredis", "own"])
def test_the_kept_connection_encodes_text_as_its_client_does(
    query: str, text: str, hiredis: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host URL's query may set the client's `encoding` (redis-py passes it on): the kept
    connection's text must be the client's, or its scripts name other keys."""
    if not hiredis:
        monkeypatch.setattr(direct, "pack_command", None)
    client = redis.Redis.from_url(f"redis://127.0.0.1:1/0?{query}")
    packer = direct.Packer(client)
    command = ("LMOVE", "caf\u00e9", text, b"\xe9", 3)
    expected = b"".join(client.connection_pool.make_connection().pack_command(*command))
    assert packer.pack(packer.head(*command[:2]), command[2:]) == expected
    assert packer.pack_all([command]) == expected


# pyproject.toml allows hiredis 2.0, which has no pack_command (and which redis-py, wanting
# 3.2 or later, leaves unused): a stand-in for it, made before anything imports hiredis.
_OLD_HIREDIS = """
import sys, types
old = types.ModuleType("hiredis")
old.__version__ = "2.0.0"
sys.modules["hiredis"] = old
import redis
from rqworkers.store import direct
client = redis.Redis()
assert direct.pack_command is None, "hiredis too old for redis-py: not ours either"
command = ("EVALSHA", "f" * 40, 1, "caf\u00e9", b"\\r\\n", 7, 1.5)
packer = direct.Packer(client)
ours = packer.pack(packer.head(*command[:3]), command[3:])
assert ours == b"".join(client.connection_pool.make_connection().pack_command(*command))
"""


def test_the_kept_connection_packs_with_a_hiredis_redis_py_does_not_use() -> None:
    done = subprocess.run([sys.executable, "-c", _OLD_HIREDIS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("fast", [False, True], ids=["script", "fast-path"])
def test_a_worker_on_a_latin_1_client_takes_what_its_producers_pushed(
    redis_server: RedisServer, fast: bool
) -> None:
    """With `?encoding=latin-1` in the host URL, a queue named beyond ASCII: producers and the
    worker's own client commands name its keys in Latin-1, and so must its kept connection,
    or its takes look in lists nobody pushes to."""
    client = connections.connect(f"{redis_server.url}?encoding=latin-1")
    queue = "caf\u00e9"
    Producer(f"{redis_server.url}?encoding=latin-1").push(queue, b"one")
    assert client.llen(queue) == 1 and redis_server.client().exists(queue.encode("latin-1"))
    q = ReliableQueue(client, queue, WORKER, keep_connection=True, fast_path=fast)
    if fast:
        q.replay(b"")
        q._pause_looked_up = float("inf")  # no look for a pause: the fast path takes
    [delivery] = q.take([], 1).deliveries
    assert (delivery.payload, bool(delivery.fast)) == (b"one", fast)
    assert q.ack(delivery) and client.llen(queue) == 0
    assert q.in_flight() == [] and client.keys("*processing*") == []


def test_a_take_through_the_kept_connection_round_trips_every_byte(
    kept: tuple[redis.Redis, ReliableQueue],
) -> None:
    client, q = kept
    odd = [bytes(range(256)), b"", b"\r\n*1\r\n", "\u2603".encode()]
    produce(client, *odd)
    taken = take_all(q)
    assert [d.payload for d in taken] == [b"one", b"two", *odd]
    assert q.take([d.element for d in taken], 0).missing_acks == 0
    assert q.in_flight() == []


# -- acks as one trim -------------------------------------------------------------------------


def trim(q: ReliableQueue, acks: list[Delivery], limit: int = 0) -> int:
    """Send `acks` as the oldest of the private list; the reply's first number."""
    return q.take([acks[0].element, acks[-1].element], limit, trim=len(acks)).missing_acks


def test_in_order_acks_of_twins_leave_as_one_trim(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, *[b"same"] * 5)
    taken = take_all(q)
    assert trim(q, taken[:3]) == 0
    assert q.in_flight() == taken[3:]
    assert trim(q, taken[3:4]) == 0 and q.in_flight() == taken[4:]


def test_a_trim_over_an_unacked_delivery_removes_nothing(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, *[b"same"] * 4)
    taken = take_all(q)
    acks = [taken[0], taken[2]]  # taken[1] is still in the handler
    assert trim(q, acks) == -1
    assert q.in_flight() == taken
    assert q.take([d.element for d in acks], 0).missing_acks == 0, "one by one, they go"
    assert q.in_flight() == [taken[1], taken[3]]


def test_a_trim_sent_again_after_a_lost_reply_removes_nothing_more(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, *[b"same"] * 4)
    taken = take_all(q)
    assert trim(q, taken[:2]) == 0
    assert trim(q, taken[:2]) == -1, "the oldest is gone: the ends are not in place"
    assert q.in_flight() == taken[2:]


def test_a_take_hands_each_delivery_its_own_attempts(client: redis.Redis, q: ReliableQueue) -> None:
    produce(client, b"fresh")
    (failed,) = take_all(q)
    assert q.retry_later(failed, 0.0)
    assert q.retry_later(take_all(q)[0], 0.0)  # its second failed delivery
    produce(client, b"fresh", b"fresh")
    taken = take_all(q)
    assert [(d.payload, d.attempts) for d in taken] == [(b"fresh", 2), (b"fresh", 0), (b"fresh", 0)]
    assert q.in_flight() == taken
    assert [d.seq for d in taken] == sorted({d.seq for d in taken}), "in take order"


def test_a_give_back_sent_again_after_a_lost_reply_keeps_the_message(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, b"tried", b"fresh")
    (tried,) = take_all(q, 1)
    assert q.retry_later(tried, 0.0)
    taken = take_all(q)
    assert [(d.payload, d.attempts) for d in taken] == [(b"tried", 1), (b"fresh", 0)]
    assert q.give_back(taken) == 2
    assert q.give_back(taken) == 0, "the second changes nothing..."
    assert retrying(client) == [(b"tried", 1)], "...and removes nothing"
    assert shared(client) == [b"fresh"]


def test_a_process_whose_list_another_replayed_takes_nothing_more(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    """Two processes on one worker id (two managers sharing a node name): the one that
    replayed the list last owns it; the other's takes and acks are refused, so the owner's
    list holds only its own deliveries, in its order, and its trims take only its acks."""
    first, second = make_queue(), make_queue()
    produce(client, b"x", b"y", b"z")
    x, y = take_all(first, 2)
    replayed = second.replay(None)
    assert replayed == [x, y]
    with pytest.raises(Superseded):
        first.take([x.element], 1)
    assert shared(client) == [b"z"], "it took nothing"
    assert second.in_flight() == [x, y], "and removed nothing"
    (z,) = take_all(second, 1)
    assert trim(second, [*replayed, z]) == 0
    assert second.in_flight() == []


def test_a_reclaimed_list_belongs_to_whoever_takes_next(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    first = make_queue()
    produce(client, b"x")
    take_all(first, 1)
    assert first.reclaim() == 1  # no lease: reclaimed, and the owner forgotten
    second = make_queue()
    assert [d.payload for d in take_all(second, 1)] == [b"x"]
    with pytest.raises(Superseded):
        first.take([], 1)


# -- segments: fresh messages without envelopes (see lua/envelope.lua) -------------------------


def private_list(client: redis.Redis, q: ReliableQueue) -> list[bytes]:
    """The private list's elements, oldest first."""
    return list(reversed(client.lrange(q.keys.processing, 0, -1)))


def marked(delivery: Delivery, last: int) -> bytes:
    return b"%s%s+%d:0:%s" % (scripts.PREFIX.encode(), delivery.id, last, delivery.payload)


def test_an_in_order_trim_of_a_segment_marks_its_new_oldest(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, *[b"same"] * 5)
    taken = take_all(q)
    assert private_list(client, q) == [marked(taken[0], 5), *[b"same"] * 4]
    assert trim(q, taken[:2]) == 0
    assert private_list(client, q) == [marked(taken[2], 5), b"same", b"same"]
    assert q.in_flight() == taken[2:]
    assert trim(q, taken[:2]) == -1, "sent again after a lost reply: not the oldest any more"
    assert trim(q, taken[3:]) == -1, "taken[2] is still in the handler"
    assert trim(q, taken[2:]) == 0 and private_list(client, q) == []


def test_a_trim_past_a_segment_reaches_the_envelopes_above_it(
    client: redis.Redis, q: ReliableQueue
) -> None:
    produce(client, *[b"same"] * 3)
    taken = take_all(q, 2)  # a segment of two
    taken += take_all(q, 2)  # onto it: an envelope
    assert private_list(client, q)[2] == taken[2].element
    assert trim(q, taken[1:]) == -1 and trim(q, taken) == 0
    assert private_list(client, q) == []


@pytest.mark.parametrize("settle", ["ack", "retry", "dead", "give back"])
def test_a_segment_s_member_settled_alone_is_that_delivery_and_no_twin(
    client: redis.Redis, q: ReliableQueue, settle: str
) -> None:
    """Any settling but the worker's trim first gives the segment its envelopes: the member
    named goes, its twins stay, each with its own id, and in-order acks go on as a trim."""
    produce(client, *[b"same"] * 6)
    taken = take_all(q)
    middle = taken[3]
    if settle == "ack":
        assert q.ack(middle) and not q.ack(middle), "an ack sent again removes no twin"
    elif settle == "retry":
        assert q.retry_later(middle, 3600) and not q.retry_later(middle, 3600)
        assert retrying(client) == [(b"same", 1)]
    elif settle == "dead":
        assert q.dead_letter(middle, {"reason": "test", "attempts": 1})
        assert not q.dead_letter(middle, {"reason": "test", "attempts": 1})
        assert client.lrange(Keys(QUEUE).dead, 0, -1) == [b"same"]
    else:
        assert q.give_back([middle]) == 1 and q.give_back([middle]) == 0
        assert shared(client) == [b"same"]
    rest = [d for d in taken if d is not middle]
    assert private_list(client, q) == [d.element for d in rest]
    assert q.in_flight() == rest
    assert trim(q, rest[:3]) == 0 and trim(q, rest[3:]) == 0
    assert private_list(client, q) == []


def test_a_replay_charges_a_segment_s_started_members_once(
    client: redis.Redis, q: ReliableQueue, make_queue: MakeQueue
) -> None:
    produce(client, *[b"same"] * 5)
    taken = take_all(q)
    assert trim(q, taken[:1]) == 0
    successor = make_queue()  # the worker's next process: taken[3] was the oldest unstarted
    leftovers = successor.replay(taken[3].id)
    assert [(d.payload, d.attempts) for d in leftovers] == [(b"same", 1)] * 2 + [(b"same", 0)] * 2
    assert leftovers[2].id == taken[3].id and leftovers[3].id == taken[4].id
    again = successor.replay(taken[3].id)  # sent again after a lost reply
    assert [d.attempts for d in again] == [1, 1, 0, 0], "charged ids are its own: never twice"


def test_a_reclaim_charges_a_segment_s_started_members(
    client: redis.Redis, make_queue: MakeQueue
) -> None:
    lost = make_queue(worker_id="node-b:1")
    produce(client, *[b"same"] * 4)
    taken = take_all(lost)
    assert trim(lost, taken[:1]) == 0
    assert make_queue(worker_id="node-a:1").reclaim  # another node's view of it
    assert lost.reclaim(taken[2].id) == 3
    assert sorted(a for _, a in retrying(client)) == [0, 0, 1]
    assert private_list(client, lost) == []


def test_payloads_that_look_like_marked_envelopes_are_members_like_any(
    client: redis.Redis, q: ReliableQueue, make_queue: MakeQueue
) -> None:
    prefix = scripts.PREFIX.encode()
    odd = [
        prefix + b"ab.1.1+9:0:x",
        prefix + b"ab.1.1:0+9:x",
        prefix + b"ab.1.2:0:y",
        prefix + b"seg",
        b"",
        prefix,
    ]
    produce(client, *odd)
    taken = take_all(q)
    assert [d.payload for d in taken] == odd
    assert q.in_flight() == taken
    assert trim(q, taken[:1]) == 0, "the new oldest, itself a look-alike, is marked"
    assert q.in_flight() == taken[1:]
    leftovers = make_queue().replay(None)
    assert [d.payload for d in leftovers] == odd[1:] and q.in_flight() != []


def test_the_fast_path_waits_for_the_script_to_ack_an_open_segment(
    client: redis.Redis, q: ReliableQueue
) -> None:
    """A prefetch cut to 1 (`max_requests` near) sends the fast path's acks as LREMs of
    envelopes, which a segment's members are not: the script takes until it is acked."""
    q.replay(None)  # the fast path takes once a replay has registered its lists
    produce(client, *[b"same"] * 4)
    taken = take_all(q, 2)
    assert trim(q, taken[:1]) == 0  # acks sent early, alone (`ACK_INTERVAL`)
    got = q.take([taken[1].element], 1, trim=1)
    assert got.missing_acks == 0 and [d.fast for d in got.deliveries] == [""]
    then = q.take([got.deliveries[0].element], 1, trim=1)  # no segment left: the fast path
    assert then.missing_acks == 0 and then.deliveries[0].fast
    assert q.take([], 0, fast_acks=[(then.deliveries[0].fast, b"same")]).missing_acks == 0
    assert private_list(client, q) == [] and shared(client) == []
