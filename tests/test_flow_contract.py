"""Flow control at the queue: TAKE takes only what the pause and the limits allow, against
fakeredis and a real redis-server. A message held back stays in the shared list, in its
place and uncharged; permits are counted per worker and given back by replay and reclaim.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import redis

from rqworkers.common.rates import Rate
from rqworkers.store import flow
from rqworkers.store.flow import PERMIT_HOLD, Limits
from rqworkers.store.queue import Delivery, Keys, ReliableQueue
from tests.support import wait_for

QUEUE = "jobs"


def worker(client: redis.Redis, n: int, **limits: object) -> ReliableQueue:
    return ReliableQueue(client, QUEUE, f"node:{n}", limits=Limits(**limits))  # type: ignore[arg-type]


def produce(client: redis.Redis, count: int) -> None:
    client.lpush(QUEUE, *[f"m{i}".encode() for i in range(count)])


def payloads(taken: list[object]) -> list[bytes]:
    return [d.payload for d in taken]  # type: ignore[attr-defined]


def test_max_running_is_shared_by_every_worker_and_freed_by_acks(client: redis.Redis) -> None:
    produce(client, 10)
    a, b = worker(client, 1, max_running=3), worker(client, 2, max_running=3)
    first = a.take([], 2)
    assert payloads(first.deliveries) == [b"m0", b"m1"] and first.held is None
    second = b.take([], 5)
    assert payloads(second.deliveries) == [b"m2"], "only one permit was left"
    assert second.held is not None and second.held.reason == "full"
    assert b.take([], 5, running=1).held == ("full", None), "nothing left: nothing taken"
    assert client.llen(QUEUE) == 7, "held back in the shared list, in place"
    freed = a.take([d.element for d in first.deliveries], 5)  # acks both: two permits free
    assert payloads(freed.deliveries) == [b"m3", b"m4"]
    assert flow.flow_state(client, QUEUE).running == 3


def test_a_take_sent_twice_counts_its_permits_once(client: redis.Redis) -> None:
    """A worker says how many it still runs; its entry is set, not added to."""
    produce(client, 10)
    a = worker(client, 1, max_running=4)
    a.take([], 2)
    a.take([], 0, running=2)  # a flush resent after a lost reply
    a.take([], 0, running=2)
    assert client.hget(Keys(QUEUE).permits, "node:1") == b"2"
    a.take([], 0, running=0)
    assert client.hget(Keys(QUEUE).permits, "node:1") is None


def test_replay_and_reclaim_give_a_lost_holders_permits_back(client: redis.Redis) -> None:
    produce(client, 10)
    lost, other = worker(client, 1, max_running=2), worker(client, 2, max_running=2)
    lost.take([], 2)
    assert other.take([], 1).held == ("full", None)
    ReliableQueue(client, QUEUE, "node:1").replay(b"")  # its replacement starts
    assert payloads(other.take([], 1).deliveries) == [b"m2"], "given back at once"
    client.delete(Keys(QUEUE, "node:2").lease)
    third = worker(client, 3, max_running=2)
    third.take([], 1)
    assert third.take([], 1, running=1).held == ("full", None)
    assert other.reclaim() == 1  # node:2's lease is gone: its node vanished
    # Its process may live on (orphaned, frozen) until it sees its list taken over: its
    # permit stays counted a moment (PERMIT_HOLD), then is free.
    assert third.take([], 1, running=1).held == ("full", None)
    began = time.monotonic()
    taken = wait_for(lambda: third.take([], 1, running=1).deliveries, timeout=5, what="free")
    assert payloads(taken) == [b"m2"], "its retry, next"
    assert 0.5 < time.monotonic() - began <= PERMIT_HOLD + 0.5


def test_a_new_managers_worker_holds_its_predecessors_permits_a_moment(
    client: redis.Redis,
) -> None:
    """A predecessor this manager did not see end may be an orphan still running."""
    produce(client, 10)
    orphan, other = worker(client, 1, max_running=1), worker(client, 2, max_running=1)
    orphan.take([], 1)
    ReliableQueue(client, QUEUE, "node:1").replay(b"", hold_permits=PERMIT_HOLD)
    assert other.take([], 1).held == ("full", None), "not given back at once"
    taken = wait_for(lambda: other.take([], 1).deliveries, timeout=5, what="given back")
    assert len(taken) == 1


def test_a_rate_limit_allows_n_starts_in_any_window(client: redis.Redis) -> None:
    produce(client, 10)
    a, b = worker(client, 1, rate=Rate(3, 1)), worker(client, 2, rate=Rate(3, 1))
    assert len(a.take([], 2).deliveries) == 2
    taken = b.take([], 2)
    assert len(taken.deliveries) == 1 and taken.held is not None
    assert taken.held.reason == "rate" and 0 < (taken.held.wait or 0) <= 1.05
    assert client.zcard(Keys(QUEUE).starts) == 3
    assert flow.flow_state(client, QUEUE, Limits(rate=Rate(3, 1))).started == 3


def test_a_paused_queue_gives_nothing_and_a_landed_message_keeps_its_place(
    client: redis.Redis,
) -> None:
    q = worker(client, 1)
    assert flow.pause(client, QUEUE, "test") and not flow.pause(client, QUEUE, "again")
    produce(client, 1)
    assert q.fetch(0.1)  # a blocking fetch landed it before the pause was seen
    produce(client, 1)
    taken = q.take([], 5, landed=True)
    assert taken.deliveries == [] and taken.held == ("paused", None)
    assert client.lrange(QUEUE, 0, -1) == [b"m0", b"m0"] and client.llen(q.keys.landing) == 0
    assert client.rpop(QUEUE) == b"m0", "the landed one is next, as it was"
    assert flow.flow_state(client, QUEUE).paused is not None
    assert flow.resume(client, QUEUE) and not flow.resume(client, QUEUE)
    assert client.llen(Keys(QUEUE).wake) == flow.RESUME_TOKENS, "waiting workers are woken"
    assert payloads(q.take([], 5).deliveries) == [b"m0"]


def test_permits_given_back_wake_waiting_workers_only_when_work_waits(
    client: redis.Redis,
) -> None:
    produce(client, 3)
    a = worker(client, 1, max_running=1)
    (d,) = a.take([], 1).deliveries
    a.take([d.element], 0)
    assert client.llen(Keys(QUEUE).wake) == 1, "one permit back, one waiter woken"
    assert a.wait_for_wake(0.05)
    client.delete(QUEUE, Keys(QUEUE).wake)
    client.lpush(QUEUE, b"x")
    b = worker(client, 2, max_running=1)
    (e,) = b.take([], 1).deliveries  # the queue is empty now
    b.take([e.element], 0)
    assert client.llen(Keys(QUEUE).wake) == 0, "no work waits: nobody to wake"


def tenant(name: str, n: int) -> bytes:
    return json.dumps({"kwargs": {"tenant": name}, "n": n}).encode()


def tenants(taken: list[Delivery]) -> list[str]:
    return [json.loads(d.payload)["kwargs"]["tenant"] for d in taken]


def grouped(client: redis.Redis, n: int, **limits: object) -> ReliableQueue:
    return worker(client, n, group_by="kwargs.tenant", **limits)


def test_groups_take_turns_so_a_flood_does_not_hold_a_small_group_back(
    client: redis.Redis,
) -> None:
    client.lpush(QUEUE, *[tenant("flood", i) for i in range(500)])
    client.lpush(QUEUE, *[tenant("small", i) for i in range(3)])
    q = grouped(client, 1)
    taken = q.take([], 6).deliveries
    assert sorted(tenants(taken)) == ["flood"] * 3 + ["small"] * 3, "one of each, in turn"
    smalls = [json.loads(d.payload)["n"] for d in taken if b"small" in d.payload]
    assert smalls == [0, 1, 2], "first in, first out within a group"
    assert client.llen(QUEUE) == 0, "sorted out of the shared list into the groups' lists"


def test_each_group_keeps_to_its_own_max_running(client: redis.Redis) -> None:
    client.lpush(QUEUE, *[tenant(t, i) for i in range(5) for t in ("a", "b")])
    a, b = grouped(client, 1, group_max_running=2), grouped(client, 2, group_max_running=2)
    first = a.take([], 3).deliveries
    second = b.take([], 5)
    running = tenants(first) + tenants(second.deliveries)
    assert sorted(running) == ["a", "a", "b", "b"] and second.held == ("full", None)
    # a's worker finishes its deliveries: their group permits go back, to be used again
    mine = Counter(d.group for d in second.deliveries)
    b.take([], 0, running=len(second.deliveries), mine=dict(mine))
    again = a.take([d.element for d in first], 5).deliveries
    assert sorted(tenants(again)) == sorted(tenants(first))


def test_a_group_rate_limit_counts_each_group_apart(client: redis.Redis) -> None:
    client.lpush(QUEUE, *[tenant(t, i) for i in range(5) for t in ("a", "b")])
    q = grouped(client, 1, group_rate=Rate(2, 60))
    taken = q.take([], 10)
    assert sorted(tenants(taken.deliveries)) == ["a", "a", "b", "b"]
    assert taken.held is not None and taken.held.reason == "rate"


def test_a_retry_keeps_to_its_groups_limit_and_replay_gives_group_permits_back(
    client: redis.Redis,
) -> None:
    client.lpush(QUEUE, tenant("a", 1), tenant("a", 2))
    q = grouped(client, 1, group_max_running=1)
    (first,) = q.take([], 5).deliveries
    q.retry_later(first, 0)  # failed; due at once, but a's one permit is still held
    held = q.take([], 5, running=1, mine={first.group or "": 1})
    assert held.deliveries == [] and held.held == ("full", None)
    ReliableQueue(client, QUEUE, "node:1").replay(b"")  # the worker died: permits back
    (retried,) = grouped(client, 2, group_max_running=1).take([], 5).deliveries
    assert retried.attempts == 1 and json.loads(retried.payload)["n"] == 1


def test_payloads_without_the_field_share_the_default_group_and_twins_stay_apart(
    client: redis.Redis,
) -> None:
    odd = [b"not json", b"{}", b'{"kwargs": {"tenant": {"nested": 1}}}', b"[1, 2]", b""]
    huge = json.dumps({"kwargs": {"tenant": "t" * 10_000}}).encode()
    client.lpush(QUEUE, *odd, huge, huge)
    q = grouped(client, 1, group_max_running=100)
    taken = q.take([], 20).deliveries
    assert sorted(d.payload for d in taken) == sorted([*odd, huge, huge]), "byte for byte"
    assert len({d.id for d in taken}) == 7, "twins are two deliveries"
    names = {bytes.fromhex(g) for g in client.lrange(Keys(QUEUE).ring, 0, -1)} | {
        bytes.fromhex(d.group or "") for d in taken
    }
    assert names == {b"", b"t" * 200}, "the default group, and a name cut to 200 bytes"


def by_prefix(message: bytes) -> str:
    """A handler's `group()` for raw payloads `<tenant>:<n>`."""
    return message.split(b":", 1)[0].decode()


def hooked(client: redis.Redis, n: int, **limits: object) -> ReliableQueue:
    return worker(client, n, grouper=by_prefix, **limits)


def test_a_handlers_group_sorts_raw_payloads_into_fair_turns(client: redis.Redis) -> None:
    client.lpush(QUEUE, *[f"flood:{i}".encode() for i in range(300)], b"small:0", b"small:1")
    q = hooked(client, 1, group_max_running=1)
    taken = q.take([], 4)
    assert sorted(d.payload for d in taken.deliveries) == [b"flood:0", b"small:0"]
    assert taken.held == ("full", None), "one of each group: both at their limit"


def test_a_landed_message_and_a_retry_join_their_groups_turns(client: redis.Redis) -> None:
    q = hooked(client, 1, group_max_running=1)
    client.lpush(QUEUE, b"a:landed")
    assert q.fetch(0.1)
    (landed,) = q.take([], 5, landed=True).deliveries
    assert landed.payload == b"a:landed" and client.llen(q.keys.landing) == 0
    q.retry_later(landed, 0)
    client.lpush(QUEUE, b"a:next", b"b:other")
    first = q.take([], 5).deliveries
    assert sorted(d.payload for d in first) == [b"a:landed", b"b:other"], "a's retry first"
    assert [d.attempts for d in first if d.payload == b"a:landed"] == [1]
    assert client.llen(f"{q.keys.group_list}a") == 1, "a:next waits for a's permit"


def test_status_counts_what_waits_in_groups_and_says_when_every_group_is_full(
    client: redis.Redis,
) -> None:
    from rqworkers.store.queue import snapshot

    client.lpush(QUEUE, *[tenant("a", i) for i in range(5)], *[tenant("b", i) for i in range(3)])
    q = grouped(client, 1, group_max_running=1)
    assert len(q.take([], 5).deliveries) == 2  # one of each group: both full now
    snap = snapshot(client, QUEUE, q.limits)
    assert snap.waiting == 6, "sorted into the groups' lists, still waiting"
    assert snap.flow.held_by == ["group_max_running"] and snap.held_back == 6
    assert {g.name: (g.waiting, g.running) for g in snap.flow.groups} == {"a": (4, 1), "b": (2, 1)}
    hooked_view = snapshot(client, QUEUE)  # a handler's group(): the reader knows no limits
    assert hooked_view.waiting == 6 and len(hooked_view.flow.groups) == 2
