"""Orphan recovery across nodes, with real managers on two node identities."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import fakeredis
import pytest
import redis

from rqworkers.ops.keeper import Keeper, KeeperSpec, Lease
from rqworkers.store.queue import Keys, ReliableQueue, registered_workers, take_reclaim_turn
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import RedisServer, Service, dead_info, wait_for

StartService = Callable[..., Service]
HANDLER = "testapp:handle"


def manager_section(node: str) -> dict[str, object]:
    return {
        "check_interval": 0.2,
        "shutdown_timeout": 10.0,
        "node": node,
        "lease_ttl": 1.5,
        "reclaim_interval": 0.3,
    }


def lrange(server: RedisServer, key: str) -> list[bytes]:
    return list(server.client().lrange(key, 0, -1))


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request: pytest.FixtureRequest) -> redis.Redis:
    if request.param == "fakeredis":
        return fakeredis.FakeRedis()
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.client()


def test_reclaim_hands_an_expired_list_back_first_in_order_each_charged(
    client: redis.Redis,
) -> None:
    dead = ReliableQueue(client, "jobs", "node-a:1")
    dead.hold_lease(ttl=60)
    client.lpush("jobs", b"m1", b"m2", b"m3", b"later")
    assert [d.payload for d in dead.take([], 3).deliveries] == [b"m1", b"m2", b"m3"]
    assert dead.reclaim() is None, "a live lease is never reclaimed"
    client.delete(dead.keys.lease)  # the node is gone: its lease expired
    rescuer = ReliableQueue(client, "jobs", "node-a:1")
    assert rescuer.reclaim() == 3
    assert client.llen(dead.keys.processing) == 0
    assert registered_workers(client, "jobs") == []
    # Nobody knows which one was running: each is charged, and each comes before `later`.
    taken = rescuer.take([], 4).deliveries
    assert [(d.payload, d.attempts) for d in taken] == [
        (b"m1", 1),
        (b"m2", 1),
        (b"m3", 1),
        (b"later", 0),
    ]
    rescuer.hold_lease(ttl=60)  # now a live worker again: its list is its own
    client.delete(rescuer.keys.lease)
    assert rescuer.reclaim() == 4, "only what it took since"
    assert rescuer.reclaim() == 0, "a second reclaim finds nothing to move"
    assert client.zcard(Keys("jobs").retry) == 4


def test_reclaim_is_fenced(client: redis.Redis) -> None:
    queue = ReliableQueue(client, "jobs", "node-a:1")
    client.lpush("jobs", b"m")
    queue.take([], 1)
    client.set(Keys.of("jobs", "node-a:1").fence, "1")  # another manager is reclaiming it
    assert queue.reclaim() is None
    assert [d.payload for d in queue.in_flight()] == [b"m"]


def test_a_lost_node_has_its_messages_reclaimed_by_another(
    service: StartService, redis_server: RedisServer
) -> None:
    node_a = service([{"queue": "jobs", "handler": HANDLER}], manager=manager_section("node-a"))
    node_a.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"sleep:3")
    wait_for(lambda: lrange(redis_server, "started") == [b"sleep:3"], what="started on node a")
    node_b = service([{"queue": "jobs", "handler": HANDLER}], manager=manager_section("node-b"))
    node_b.wait_workers(1)
    # The whole of node a vanishes at once: manager, keeper and worker.
    node_a.signal_session(signal.SIGKILL)
    wait_for(lambda: lrange(redis_server, "done") == [b"sleep:3"], timeout=20, what="reclaim")
    assert lrange(redis_server, "started") == [b"sleep:3", b"sleep:3"]
    assert client.llen(Keys("jobs", "node-a:1").processing) == 0
    assert "reclaimed 1 message(s) of jobs from jobs:processing:node-a:1" in node_b.output()


def test_a_slow_handler_holding_its_process_is_never_reclaimed(
    service: StartService, redis_server: RedisServer
) -> None:
    node_a = service(
        [{"queue": "jobs", "handler": HANDLER, "timeout": 60}], manager=manager_section("node-a")
    )
    node_a.wait_workers(1)
    node_b = service([{"queue": "jobs", "handler": HANDLER}], manager=manager_section("node-b"))
    node_b.wait_workers(1)
    client = redis_server.client()
    # Signals blocked: like a handler in C code that holds the GIL for 4 lease lifetimes.
    client.lpush("jobs", b"stuck:6")
    wait_for(lambda: b"stuck:6" in lrange(redis_server, "done"), timeout=20, what="done")
    assert lrange(redis_server, "started") == [b"stuck:6"], "it ran exactly once"
    assert "reclaimed" not in node_a.output() + node_b.output()


def test_renewing_a_lease_registers_the_worker_again(client: redis.Redis) -> None:
    from rqworkers.store.queue import renew_leases

    # Struck out by a reclaim while the node was frozen:
    client.srem(Keys("jobs").registry, "node-a:1")
    renew_leases(client, {("jobs", "node-a:1"): "{}"}, ttl=5)
    assert registered_workers(client, "jobs") == ["node-a:1"]
    assert client.pttl(Keys.of("jobs", "node-a:1").lease) > 0


def test_a_node_frozen_past_its_lease_is_found_again_when_it_dies_later(
    service: StartService, redis_server: RedisServer
) -> None:
    node_a = service([{"queue": "jobs", "handler": HANDLER}], manager=manager_section("node-a"))
    node_a.wait_workers(1)
    client = redis_server.client()
    node_b = service([{"queue": "jobs", "handler": HANDLER}], manager=manager_section("node-b"))
    node_b.wait_workers(1)
    node_a.signal_session(signal.SIGSTOP)  # a VM pause: the whole node stops
    wait_for(lambda: "node-a:1" not in registered_workers(client, "jobs"), what="node a struck out")
    node_a.signal_session(signal.SIGCONT)
    wait_for(lambda: "node-a:1" in registered_workers(client, "jobs"), what="node a back")
    client.lpush("jobs", *[f"sleep:1:{i}".encode() for i in range(6)])
    wait_for(lambda: client.llen(Keys("jobs", "node-a:1").processing) == 1, what="node a busy")
    node_a.signal_session(signal.SIGKILL)  # and now it is lost for good
    expected = {f"sleep:1:{i}".encode() for i in range(6)}
    wait_for(lambda: set(lrange(redis_server, "done")) == expected, timeout=30, what="all done")
    assert client.llen(Keys("jobs", "node-a:1").processing) == 0


def test_a_fetch_reclaimed_before_it_was_taken_in_is_left_to_its_new_owner(
    client: redis.Redis,
) -> None:
    stalled = ReliableQueue(client, "jobs", "node-a:1")
    client.lpush("jobs", b"m")
    assert stalled.fetch(0.1) is True
    # The worker stalls here, its lease lapses and another node reclaims the list.
    assert ReliableQueue(client, "jobs", "node-a:1").reclaim() == 1
    # It is back in the shared list, never delivered: whoever takes it next has the only copy.
    owner = ReliableQueue(client, "jobs", "node-b:1")
    assert [(d.payload, d.attempts) for d in owner.take([], 1).deliveries] == [(b"m", 0)]
    assert stalled.take([], 1, landed=True).deliveries == [], "emptied by the reclaim"


def dead_letter_across_nodes(
    service: StartService,
    client: redis.Redis,
    payload: bytes,
    names: str,
    settings: dict[str, object],
) -> list[Service]:
    """Start a node per letter of `names` (one worker, max_attempts 2), push `payload`, and
    wait until it is dead-lettered; the nodes, some of them dead by then."""
    worker = {"queue": "jobs", "handler": HANDLER, "max_attempts": 2, **settings}
    nodes = [service([worker], manager=manager_section(f"node-{name}")) for name in names]
    for node in nodes:
        node.wait_workers(1)
    client.lpush("jobs", payload)
    dead = Keys("jobs").dead
    wait_for(lambda: client.llen(dead) == 1, timeout=30, what="dead-lettered by reclaim")
    return nodes


def test_a_message_that_takes_every_node_down_is_dead_lettered_by_reclaim_after_max_attempts(
    service: StartService, redis_server: RedisServer
) -> None:
    """Each node that starts it dies whole, so no worker of it lives to say what ran: a
    survivor's reclaim charges the lost list, and after `max_attempts` (2) deliveries the
    last node standing dead-letters it without running it a third time."""
    client = redis_server.client()
    nodes = dead_letter_across_nodes(service, client, b"killnode", "abc", {})
    assert lrange(redis_server, "started").count(b"killnode") == 2
    assert sum(node.process is not None and node.process.poll() is None for node in nodes) == 1
    record = dead_info(redis_server, "jobs", b"killnode")
    assert record["attempts"] == 2 and "killed by" not in str(record["reason"])
    assert client.llen("jobs") == 0 and client.zcard(Keys("jobs").retry) == 0


def test_a_retry_keeps_its_attempt_number_when_its_node_is_lost(
    service: StartService, redis_server: RedisServer
) -> None:
    """Raised (attempt 1), then took its whole node down (2 = max_attempts): the survivor's
    reclaim carries the count on, so it is dead-lettered, not run a third time."""
    client = redis_server.client()
    dead_letter_across_nodes(service, client, b"steps:rn:1", "ab", {"retry_delay": 0.1})
    assert lrange(redis_server, "started").count(b"steps:rn:1") == 2
    assert dead_info(redis_server, "jobs", b"steps:rn:1")["attempts"] == 2


# -- what a node costs Redis does not grow with the fleet: reclaim turns, shared lengths ----------


@contextmanager
def keepers(
    url: str,
    nodes: list[str],
    reclaim_interval: float = 10.0,
    live: bool = True,
    lease_ttl: float = 6.0,
) -> Iterator[list[Keeper]]:
    """One keeper per node, each holding the lease of one slot on `jobs` (a live worker's
    unless `live` is false: a slot in restart backoff)."""
    made = []
    for node in nodes:
        board = Scoreboard()
        board.prepare()
        board.set_pid(os.getpid() if live else 0)
        lease = Lease(url, "jobs", f"{node}:1", "jobs-1", "local", board)
        spec = KeeperSpec(node, os.getppid(), lease_ttl, reclaim_interval, (lease,))
        made.append(Keeper(spec))
    try:
        yield made
    finally:
        for keeper in made:
            keeper.close()


def calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_one_node_a_pass_walks_the_registry_not_every_node(redis_server: RedisServer) -> None:
    """A fleet's reclaim passes cost one EXISTS per registered worker, not one per worker
    and node: with every node walking the whole registry, the fleet's cost grew as the
    square of its size (bench/fleet.py)."""
    client = redis_server.client()
    others = [f"far-{i}:1" for i in range(40)]
    for worker_id in others:
        client.set(Keys("jobs", worker_id).lease, "{}", px=60_000)
    client.sadd(Keys("jobs", "").registry, *others)
    with keepers(redis_server.url, [f"n{i}" for i in range(5)]) as fleet:
        before = calls(client, "exists")
        for keeper in fleet:
            keeper.reclaim(keeper.endpoints[0], "jobs")
        assert calls(client, "exists") - before == len(others), "one walk for five nodes"
    assert client.get(Keys("jobs", "").reclaim_turn) == b"n0"
    assert 0 < client.pttl(Keys("jobs", "").reclaim_turn) <= 4_800, "0.8 of the 6 s lease"


def test_when_the_node_whose_turn_it_was_dies_another_takes_the_next_turn(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    with keepers(redis_server.url, ["gone", "alive"], reclaim_interval=0.5) as (gone, alive):
        gone.reclaim(gone.endpoints[0], "jobs")  # its turn; then it dies
        orphan = ReliableQueue(client, "jobs", "lost:1")
        orphan.hold_lease(ttl=60)
        client.lpush("jobs", b"m1")
        orphan.take([], 1)
        client.delete(orphan.keys.lease)

        def reclaimed() -> bool:
            alive.reclaim(alive.endpoints[0], "jobs")
            return client.llen(orphan.keys.processing) == 0

        wait_for(reclaimed, timeout=5, interval=0.05, what="the next turn's reclaim")
    assert [d.payload for d, _ in orphan.retrying()] == [b"m1"]


def test_a_slot_in_backoff_is_reclaimed_by_its_own_node_when_it_is_not_its_turn(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    client.set(Keys("jobs", "").reclaim_turn, "another", px=60_000)
    with keepers(redis_server.url, ["n"], live=False) as (keeper,):
        own = ReliableQueue(client, "jobs", "n:1")
        own.hold_lease(ttl=60)
        client.lpush("jobs", b"m1")
        own.take([], 1)
        client.delete(own.keys.lease)  # its worker is in restart backoff past its lease
        keeper.reclaim(keeper.endpoints[0], "jobs")
    assert client.llen(own.keys.processing) == 0
    assert [d.payload for d, _ in own.retrying()] == [b"m1"]


@pytest.mark.parametrize("died_in", ["setup", "replay"])
def test_a_slot_whose_worker_died_before_replaying_is_reclaimed_charging_what_had_started(
    redis_server: RedisServer, died_in: str
) -> None:
    """The first worker died in `ran` (`never` unstarted). The next one died before its
    scoreboard said `replayed`: in setup(), or in its replay, after REPLAY had charged
    `ran`. The slot then backs off past its lease, and its own keeper reclaims the list
    with what the slot hands on: `ran` charged once, `never` not at all (a lost node's
    list would have both charged)."""
    client = redis_server.client()
    client.set(Keys("jobs", "").reclaim_turn, "another", px=60_000)
    with keepers(redis_server.url, ["n"], live=False) as (keeper,):
        first = ReliableQueue(client, "jobs", "n:1")
        first.hold_lease(ttl=60)
        client.lpush("jobs", b"ran", b"never")
        _, never = first.take([], 2).deliveries
        board = keeper.spec.leases[0].board
        board.prepare()  # the next worker starts
        spared: tuple[bytes, ...] = ()
        if died_in == "replay":
            second = ReliableQueue(client, "jobs", "n:1")
            board.replay_begun(second.owner_name)
            second.replay(never.id)  # then killed: no `replayed`
            spared = (second.owner_name,)
        board.hand_on(never.id, spared)  # what its manager's slot writes (`Slot.ended`)
        client.delete(first.keys.lease)  # the slot is in restart backoff past its lease
        keeper.reclaim(keeper.endpoints[0], "jobs")
    assert client.llen(first.keys.processing) == 0
    assert [(d.payload, d.attempts) for d, _ in first.retrying()] == [(b"ran", 1), (b"never", 0)]


def test_one_node_a_period_reads_the_queue_lengths_every_node_reports(
    redis_server: RedisServer,
) -> None:
    """Reading a queue's in-flight count reads every private list: with every node serving
    `/metrics` doing so each period, the fleet's cost grew as the square of its size."""
    client = redis_server.client()
    others = [f"far-{i}:1" for i in range(40)]
    client.sadd(Keys("jobs", "").registry, *others)
    client.lpush(Keys("jobs", "far-0:1").processing, b"a", b"b")
    client.lpush("jobs", b"w")
    with keepers(redis_server.url, [f"n{i}" for i in range(5)], lease_ttl=1.5) as fleet:
        before = calls(client, "llen")
        for keeper in fleet:
            keeper.read_queues(keeper.endpoints[0])
        assert calls(client, "llen") - before == 2 + 2 * len(others), "read once, not 5 times"
        for keeper in fleet:
            [lengths] = keeper.snapshots.values()
            assert (lengths.waiting, lengths.in_flight) == (1, 2)
        client.lpush("jobs", b"w2")

        def fresh() -> bool:
            fleet[1].read_queues(fleet[1].endpoints[0])
            return next(iter(fleet[1].snapshots.values())).waiting == 2

        wait_for(fresh, timeout=5, interval=0.05, what="the lengths read again after a period")


def test_on_a_redis_out_of_memory_every_node_walks_and_reads_as_before(
    redis_server: RedisServer,
) -> None:
    """Over maxmemory Redis refuses the turn and the shared lengths (writes), not the walk
    or the reading: a keeper must neither stop reclaiming nor report an outage then."""
    client = redis_server.client()
    client.sadd(Keys("jobs", "").registry, "lost:1")
    client.lpush(Keys("jobs", "lost:1").processing, b"x")
    client.set("filler", b"x" * 2_000_000)
    client.config_set("maxmemory", 1_000_000)
    with keepers(redis_server.url, ["a", "b"]) as fleet:
        for keeper in fleet:
            assert take_reclaim_turn(keeper.endpoints[0].client, "jobs", "a", 5.0)
            keeper.read_queues(keeper.endpoints[0])
            assert next(iter(keeper.snapshots.values())).in_flight == 1
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", b"x")
