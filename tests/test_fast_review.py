"""A hostile review of the fast path (rqworkers/store/fast.py): what it was found to get
wrong. Against fakeredis and a real redis-server, as tests/test_fast.py."""

from __future__ import annotations

import time
from pathlib import Path

import fakeredis
import pytest
import redis

from rqworkers.errors import Superseded
from rqworkers.store import levels, scripts
from rqworkers.store.queue import Delivery, ReliableQueue
from tests.servers import Processes, Server
from tests.test_fast import QUEUE, WORKER, push, take_one, unlooked, worker


def scripted(client: redis.Redis) -> ReliableQueue:
    """A worker's queue as `worker` makes it, but taking through the script only."""
    q = ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=False)
    q.hold_lease(30)
    q.replay(b"")
    unlooked(q)
    return q


@pytest.mark.parametrize(
    "fast",
    [
        False,
        True,
    ],
    ids=["script", "fast"],
)
def test_a_crash_between_the_handler_end_and_the_ack_charges_the_delivery_that_ran(
    client: redis.Redis, fast: bool
) -> None:
    """The handler of `ran` ended; before the ack goes (with the next take), the loop marks
    the next take's id as the oldest unstarted (`Worker.before_take`), and the process is
    killed before it sends. `ran` reached its handler: its successor charges it, as the
    scoreboard's docstring says ("finished but unsettled ones too")."""
    old = worker(client) if fast else scripted(client)
    push(client, b"ran", b"next")
    ran = take_one(old)
    assert ran is not None and bool(ran.fast) == fast
    mark = old.next_take_id  # SIGKILL here: the ack never left
    new = ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=True)
    [left] = new.replay(mark)
    assert left.payload == b"ran" and left.attempts == 1


@pytest.mark.xfail(
    strict=True,
    reason="the fast take's due check and the script's `fast.note` take a negative first "
    "score (any priority band) as due: one parked prioritised retry turns the fast path off",
)
def test_a_prioritised_retry_parked_for_an_hour_leaves_plain_takes_on_the_fast_path(
    client: redis.Redis,
) -> None:
    q = worker(client)
    later = levels.due_score(5, time.time() + 3600)
    client.zadd(q.keys.retry, {Delivery(b"x.1", 1, b"parked").element: later})
    push(client, b"a", b"b", b"c")
    taken = []
    previous: Delivery | None = None
    for _ in range(3):
        previous = take_one(q, [previous] if previous else [])
        assert previous is not None
        taken.append(previous)
    assert [d.payload for d in taken] == [b"a", b"b", b"c"]
    assert client.zcard(q.keys.retry) == 1, "the parked retry waits"
    assert taken[-1].fast, "the fast path serves plain messages again"


@pytest.mark.parametrize("after", ["successor", "own replay", "reclaim"])
def test_a_nudge_caught_in_a_fast_list_is_dropped_not_handed_to_a_handler(
    client: redis.Redis, after: str
) -> None:
    """A fast take moves whatever is oldest, the queue's nudge too, and sends it back in a
    second round trip: a process killed (or a reply lost) in between leaves the nudge in
    its fast list. Taking the list over must drop it, as a replay drops one it finds in the
    landing list, not wrap it as a message."""
    old = worker(client)
    token = scripts.new_nudge_token()
    client.set(old.keys.nudge, token)
    push(client, token.encode())
    client.lmove(QUEUE, old.fast.lists[0], "RIGHT", "LEFT")  # the fast take's LMOVE; then
    if after == "successor":  # SIGKILL
        new = ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=True)
        assert new.replay(old.next_take_id) == []
    elif after == "own replay":  # a Redis error: the process replays its own lists
        assert old.replay(None) == []
    else:  # its node is lost: a reclaim
        client.delete(old.keys.lease)
        assert ReliableQueue(client, QUEUE, WORKER).reclaim(b"") is not None
        assert client.zcard(old.keys.retry) == 0
    assert client.llen(old.keys.processing) == 0
    assert all(client.type(name) != b"list" for name in old.fast.lists)


@pytest.mark.parametrize("settle", ["retry", "dead", "give back"])
def test_a_superseded_process_settling_a_fast_delivery_learns_it_was_superseded(
    client: redis.Redis, settle: str
) -> None:
    """Its successor sealed the fast list its delivery sat in. A retry, a dead letter or a
    give-back (on exit) of that delivery must say `Superseded`, as its ack does: not fail
    as a lasting Redis error naming the seal a key of the wrong type (an operator told so
    would delete it) and exiting as one."""
    old = worker(client)
    push(client, b"m")
    m = take_one(old)
    assert m is not None and m.fast
    new = ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=True)
    [left] = new.replay(b"")
    assert left.payload == b"m"
    with pytest.raises(Superseded):
        if settle == "retry":
            old.retry_later(m, 0)
        elif settle == "dead":
            old.dead_letter(m, {"reason": "r", "attempts": 1})
        else:
            old.give_back([m])
    assert client.llen(QUEUE) == 0 and client.zcard(old.keys.retry) == 0
    assert client.llen(old.keys.dead) == 0


def test_before_redis_7_a_settling_script_stopped_by_a_seal_says_superseded_too() -> None:
    """Redis 6 wraps an error a command inside a script returned: "ERR Error running
    script ...: WRONGTYPE ...". It still means the seal."""
    client = fakeredis.FakeRedis(version=(6, 2))
    old = worker(client)
    push(client, b"m")
    m = take_one(old)
    assert m is not None and m.fast
    ReliableQueue(client, QUEUE, WORKER, keep_connection=True, fast_path=True).replay(b"")
    with pytest.raises(Superseded):
        old.retry_later(m, 0)
    assert client.zcard(old.keys.retry) == 0


def test_a_server_without_lmove_before_6_2_is_served_by_the_script(tmp_path: Path) -> None:
    """The fast path is on at prefetch 1, the default, and Redis before 6.2 knows no LMOVE
    (rqworkers serves those servers: see `ReliableQueue.fetch`, `renew_leases`). Its take
    falls back to the script, as a blocking fetch falls back to BRPOPLPUSH; not an error
    that stops every worker. LMOVE renamed away stands in for an old server."""
    processes = Processes()
    try:
        server = Server(processes, tmp_path / "old", ["--rename-command", "LMOVE", ""]).start()
        client = server.client()
        q = worker(client)
        push(client, b"a", b"b")
        a = take_one(q)
        assert a is not None and a.payload == b"a" and not a.fast
        b = take_one(q, [a])
        assert b is not None and b.payload == b"b" and q.ack(b)
        assert client.llen(QUEUE) == 0 and client.llen(q.keys.processing) == 0
    finally:
        processes.kill_all()
