"""A hostile review of segments (commit 4d084d0; see lua/envelope.lua): fresh messages
taken into an empty private list as they came, above the oldest in a marked envelope.

Every reader but the in-order trim must find what it always found: each delivery once,
with its own id and attempts, twins apart. These tests attack that against a real
redis-server, through `ReliableQueue` and through the `Worker` loop.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
from collections.abc import Iterator
from typing import cast

import pytest
import redis

from rqworkers.client.producer import Producer
from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.errors import Superseded
from rqworkers.manager.slots import Slot
from rqworkers.store import scripts
from rqworkers.store.fast import fast_lists
from rqworkers.store.queue import (
    _MARKED,
    Bound,
    Delivery,
    Keys,
    ReliableQueue,
    read_private_list,
    snapshot,
)
from rqworkers.worker import loop, outbox
from rqworkers.worker.handlers import Handler
from rqworkers.worker.loop import Worker, WorkerSpec
from rqworkers.worker.scoreboard import Scoreboard
from tests.support import RedisServer, step_through_outages

QUEUE = "jobs"
WORKER = "node-a:1"
PREFIX = scripts.PREFIX.encode()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A real redis-server only (the conftest's `client` is fakeredis and real alike)."""
    conn = redis_server.client()
    try:
        yield conn
    finally:
        conn.close()


def new_queue(client: redis.Redis, worker_id: str = WORKER, **kwargs: object) -> ReliableQueue:
    kwargs.setdefault("keep_connection", True)
    return ReliableQueue(client, QUEUE, worker_id, **kwargs)  # type: ignore[arg-type]


def produce(client: redis.Redis, *messages: bytes) -> None:
    """Producers LPUSH: the oldest at the right end."""
    for message in messages:
        client.lpush(QUEUE, message)


def raw(client: redis.Redis, q: ReliableQueue) -> list[bytes]:
    """The private list's elements, oldest first, as Redis holds them."""
    return cast(list[bytes], client.lrange(q.keys.processing, 0, -1))[::-1]


def marks(element: bytes) -> tuple[bytes, int] | None:
    """(id, last) of a marked envelope (see lua/envelope.lua); None for any other element."""
    found = _MARKED.fullmatch(element)
    return (found[1] + found[2], int(found[3])) if found else None


def trim(q: ReliableQueue, acks: list[Delivery], limit: int = 0) -> int:
    """The worker's in-order ack: the n oldest, named by their two ends."""
    return q.take([acks[0].element, acks[-1].element], limit, trim=len(acks)).missing_acks


def retrying(client: redis.Redis) -> list[tuple[bytes, int]]:
    members = cast(list[bytes], client.zrange(Keys(QUEUE).retry, 0, -1))
    return sorted((d.payload, d.attempts) for d in map(Delivery.parse, members))


def shared(client: redis.Redis) -> list[bytes]:
    return cast(list[bytes], client.lrange(QUEUE, 0, -1))[::-1]


def dead(client: redis.Redis) -> list[bytes]:
    return cast(list[bytes], client.lrange(Keys(QUEUE).dead, 0, -1))


def hostile_payloads(client: redis.Redis) -> list[bytes]:
    """Payloads that look like what rqworkers writes: envelopes, marked envelopes (ours and
    not), the queue's nudge prefix, dedup and priority wrappers; empty and 1 MB; twins."""
    return [
        PREFIX + b"x.1.1:0+5:y",  # marked envelopes' look-alikes, this and the next
        PREFIX + b"x.1.1+5:0:y",
        PREFIX + b"x.1.2:0:y",  # an envelope's
        PREFIX + b"x.1.1:0+0:y",
        PREFIX + b"x.:0+9999999:",
        PREFIX + b"nudge:" + b"0" * 32,
        PREFIX + b"prio:5:z",  # a priority wrapper, pushed by hand
        PREFIX + b"dedup:" + b"a" * 32 + b":6b:w",
        PREFIX,
        b"",
        b"twin",
        b"twin",
        b"m" * (1 << 20),
        b"twin",
    ]


# -- a model-checked fuzz of every settling, in any order --------------------------------------


class Model:
    """What the private list must hold, oldest first, and where settled messages went."""

    def __init__(self) -> None:
        self.held: list[Delivery] = []
        self.retried: list[tuple[bytes, int]] = []
        self.dead: list[bytes] = []
        self.given_back: list[bytes] = []
        self.acked: list[Delivery] = []


def check(client: redis.Redis, q: ReliableQueue, model: Model) -> None:
    assert q.in_flight() == model.held
    assert client.llen(q.keys.processing) == len(model.held)
    assert retrying(client) == sorted(model.retried)
    assert sorted(dead(client)) == sorted(model.dead)


@pytest.mark.parametrize("seed", range(6))
def test_any_settling_of_segment_members_in_any_order_is_exact(
    client: redis.Redis, seed: int
) -> None:
    """Random takes, trims (resent too, as after a lost reply), one-by-one acks, retries,
    dead letters and give-backs of hostile payloads and twins, against a model: the private
    list holds exactly what is in flight after every step, and a resent operation moves
    nothing."""
    rng = random.Random(seed)
    q = new_queue(client)
    payloads = hostile_payloads(client)
    payloads[11] = b"m" * 1000  # 1 MB has its own test: keep this one quick
    model = Model()
    for _ in range(60):
        ops = ["take"] * 3 + ["trim"] * 3 if len(model.held) < 4 else ["trim"] * 3
        if model.held:
            ops += ["ack", "retry", "dead", "give back", "resend trim"]
        op = rng.choice(ops)
        if op == "take":
            produce(client, *rng.sample(payloads, rng.randint(1, 6)))
            before = shared(client)
            taken = q.take([], rng.randint(1, 8)).deliveries
            assert [d.payload for d in taken] == [
                Delivery(b"x.1", 0, p).payload for p in before[: len(taken)]
            ]
            model.held += taken
            client.delete(QUEUE)  # what was not taken: the next take's are chosen anew
        elif op in ("trim", "resend trim") and model.held:
            n = rng.randint(1, len(model.held))
            acks = model.held[:n]
            assert trim(q, acks) == 0
            del model.held[:n]
            model.acked += acks
            if op == "resend trim":  # after a lost reply: refused, then sent one by one
                assert trim(q, acks) == -1
                assert q.take([d.element for d in acks], 0).missing_acks == n
        elif op in ("ack", "retry", "dead"):
            d = rng.choice(model.held)
            if op == "ack":
                assert q.ack(d) and not q.ack(d)
            elif op == "retry":
                assert q.retry_later(d, 3600) and not q.retry_later(d, 3600)
                model.retried.append((d.payload, d.attempts + 1))
            else:
                record = {"reason": "test", "attempts": 1}
                assert q.dead_letter(d, record) and not q.dead_letter(d, record)
                model.dead.append(d.payload)
            model.held.remove(d)
        elif op == "give back":
            chosen = rng.sample(model.held, rng.randint(1, len(model.held)))
            chosen.sort(key=model.held.index)
            assert q.give_back(chosen) == len(chosen) and q.give_back(chosen) == 0
            for d in chosen:
                model.held.remove(d)
            # untried ones went to the shared list, prioritised ones to the retry set, due
            # at once (the retries the model keeps are an hour away): not taken again
            client.delete(QUEUE)
            for member in client.zrange(Keys(QUEUE).retry, 0, -1):
                if Delivery.parse(member).attempts == 0:
                    client.zrem(Keys(QUEUE).retry, member)
        check(client, q, model)
    if model.held:
        assert trim(q, model.held) == 0
    assert raw(client, q) == []


# -- the marked one itself, for every hostile payload -------------------------------------------


@pytest.mark.parametrize("settle", ["trim", "ack", "retry", "dead", "give back", "replay"])
def test_each_hostile_payload_as_the_marked_one_and_as_a_member(
    client: redis.Redis, settle: str
) -> None:
    payloads = hostile_payloads(client)
    for i in range(len(payloads)):
        client.flushdb()
        q = new_queue(client)
        # payloads[i] first: the marked one; then every other, members
        ordered = [payloads[i], *payloads[:i], *payloads[i + 1 :]]
        produce(client, *ordered)
        taken = q.take([], 100).deliveries
        assert len(taken) == len(ordered) and q.in_flight() == taken
        assert client.llen(q.keys.processing) == len(ordered)
        first, rest = taken[0], taken[1:]
        if settle == "trim":
            assert trim(q, [first]) == 0
        elif settle == "ack":
            assert q.ack(first) and not q.ack(first)
        elif settle == "retry":
            assert q.retry_later(first, 3600)
            assert [a for _, a in retrying(client)] == [1]
        elif settle == "dead":
            assert q.dead_letter(first, {"reason": "x"})
            assert len(dead(client)) == 1
        elif settle == "give back":
            assert q.give_back([first]) == 1
            assert len(shared(client)) + len(retrying(client)) == 1
        else:
            left = new_queue(client).replay(rest[0].id)  # only `first` had started
            assert [(d.payload, d.attempts) for d in left] == [
                (d.payload, 0) if j else (d.payload, 1) for j, d in enumerate(taken)
            ]
            continue
        assert q.in_flight() == rest, f"marked one {payloads[i][:40]!r}"
        assert trim(q, rest) == 0 and raw(client, q) == []


def test_the_queue_s_own_nudge_token_is_never_a_member(client: redis.Redis) -> None:
    q = new_queue(client)
    token = scripts.new_nudge_token()
    client.set(q.keys.nudge, token)
    produce(client, b"a", token.encode(), b"b", token.encode())
    taken = q.take([], 10).deliveries
    assert [d.payload for d in taken] == [b"a", b"b"] and shared(client) == []
    assert q.in_flight() == taken and client.llen(q.keys.processing) == 2
    assert trim(q, taken) == 0


def test_dedup_and_priority_wrapped_pushes_as_segment_members(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    producer = Producer(redis_server.url)
    producer.push(QUEUE, b"once", dedup_key="k1")
    producer.push(QUEUE, b"plain")
    producer.push(QUEUE, b"twice", dedup_key="k2")
    q = new_queue(client)
    taken = q.take([], 10).deliveries
    assert [(d.payload, d.dedup is not None) for d in taken] == [
        (b"once", True), (b"plain", False), (b"twice", True)
    ]  # fmt: skip
    assert q.in_flight() == taken
    assert q.dead_letter(taken[2], {"reason": "x"})
    assert dead(client) == [b"twice"], "dead as the producer's payload, unwrapped"
    assert q.retry_later(taken[0], 0)
    assert trim(q, taken[1:2]) == 0 and raw(client, q) == []


def test_a_segment_of_thousands_is_trimmed_marked_and_materialized_exactly(
    client: redis.Redis,
) -> None:
    """Past the 1,000 a push sends at once, and past the loader's 100 envelope tails."""
    q = new_queue(client)
    produce(client, *[b"twin"] * 2500)
    taken = q.take([], 2500).deliveries
    assert len(taken) == 2500 and marks(raw(client, q)[0]) == (taken[0].id, 2500)
    assert trim(q, taken[:1001]) == 0 and marks(raw(client, q)[0]) == (taken[1001].id, 2500)
    assert q.retry_later(taken[1700], 3600)  # materializes the 1,499 left
    rest = [d for d in taken[1001:] if d is not taken[1700]]
    assert raw(client, q) == [d.element for d in rest] and q.in_flight() == rest
    assert trim(q, rest) == 0 and raw(client, q) == []


# -- in-flight counts and status while a segment is in flight ---------------------------------


def test_status_counts_a_segment_s_deliveries(client: redis.Redis) -> None:
    q = new_queue(client)
    q.hold_lease(30)
    produce(client, *[b"twin"] * 7)
    taken = q.take([], 5).deliveries
    assert snapshot(client, QUEUE).in_flight == 5 and snapshot(client, QUEUE).waiting == 2
    assert trim(q, taken[:2]) == 0
    assert snapshot(client, QUEUE).in_flight == 3
    assert [d.id for d in q.in_flight()] == [d.id for d in taken[2:]]
    assert read_private_list(client.lrange(q.keys.processing, 0, -1)) == taken[2:]


# -- the worker loop, with a kill or a lost reply at every call to Redis ------------------------


class _Killed(BaseException):
    """The worker process ends here, as by SIGKILL."""


STARTED: set[bytes] = set()  # payloads whose delivery now in flight reached its handler
HANDLED: list[bytes] = []  # every handler run, in order
FAULT: list[tuple[int, str]] = []  # (the call to fail, how); the calls so far are counted
CALLS: list[int] = [0, 0]
# Set while a worker finishes: an error then leaves what it handled unacked in its list, for
# the slot's next worker to replay and run again (`Worker.finish`), as a kill would.
FINISHING: list[bool] = [False, False]
RUNNING: list[Worker] = []
OPENED: list[redis.Redis] = []  # the workers' clients, each with a connection kept


def _fault(when: str) -> None:
    CALLS[0] += 1 if when == "before" else 0
    if not FAULT or FAULT[0][0] != CALLS[0]:
        return
    how = FAULT[0][1]
    if how.endswith(when):
        FAULT.clear()
        FINISHING[1] = FINISHING[0]
        if how.startswith("kill"):
            raise _Killed
        raise redis.ConnectionError(f"connection reset {when} the reply ({how})")


def faulty(queue: ReliableQueue) -> ReliableQueue:
    """`queue`, whose every call to Redis on its kept connection (scripts, the fast path)
    is counted, and the one FAULT names fails: killed or its reply lost, before or after
    Redis ran it."""
    runner = queue._runner
    real_run, real_send_all = runner._run, runner.send_all  # type: ignore[attr-defined]

    def run(packed: bytes) -> object:
        _fault("before")
        reply = real_run(packed)
        _fault("after")
        return reply

    def send_all(commands: object) -> object:
        _fault("before")
        replies = real_send_all(commands)
        _fault("after")
        return replies

    runner._run = run  # type: ignore[attr-defined]
    runner.send_all = send_all  # type: ignore[method-assign]
    real_retry = queue.retry_later

    def retry_later(delivery: Delivery, delay: float) -> bool:
        moved = real_retry(delivery, delay)
        STARTED.discard(delivery.payload)  # settled: its next delivery has not started
        return moved

    queue.retry_later = retry_later  # type: ignore[method-assign]
    return queue


def fault_handler(message: bytes) -> None:
    """Counts as started, may stop its worker (as SIGTERM would) or be killed, and raises
    once for `raise...`."""
    STARTED.add(message)
    HANDLED.append(message)
    _fault("handler")
    if message == b"stop":
        RUNNING[0].on_stop_signal(signal.SIGTERM, None)
    if message.startswith(b"raise") and HANDLED.count(message) == 1:
        raise ValueError("boom")


MESSAGES = [
    b"a", b"raise1", b"b", PREFIX + b"x.1.1:0+5:y", b"c", PREFIX + b"x.1.2:0:y", b"d", b"",
    b"e", b"raise2", b"f", b"g", b"stop", b"h", b"i", b"j", b"k", b"l", b"m", b"n", b"o",
]  # fmt: skip


def in_flight_now(client: redis.Redis, q: ReliableQueue) -> dict[bytes, int]:
    """Every delivery of the worker, wherever it waits (private, fast and landing lists):
    payload -> attempts."""
    found = {
        d.payload: d.attempts for d in read_private_list(client.lrange(q.keys.processing, 0, -1))
    }
    for process in [m.decode() for m in client.smembers(q.keys.fast_owners)]:
        for name in fast_lists(q.keys, process):
            if client.type(name) == b"list":
                for p in client.lrange(name, 0, -1):
                    found[Delivery(b"f.1", 0, p).payload] = 0
    for p in client.lrange(q.keys.landing, 0, -1):
        found[p] = 0
    return found


def make_worker(
    client: redis.Redis, settings: dict[str, object], board: Scoreboard, mark: bytes | None
) -> Worker:
    settings = dict(settings)
    fast = bool(settings.pop("fast_path", False))
    pair = PairSettings(
        host="h", queue=QUEUE, handler="tests.test_segments_review:fault_handler",
        retry_delay=0.0, **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    own = redis.Redis(
        connection_pool=redis.ConnectionPool(**client.connection_pool.connection_kwargs)
    )
    OPENED.append(own)
    queue = new_queue(
        own, "node:1", fast_path=fast, level0_every=pair.level0_every, limits=pair.limits
    )
    queue = faulty(queue)
    spec = WorkerSpec(pair, "jobs-1", "node:1", os.getppid(), None, mark, lease_ttl=30)
    worker = Worker(spec, Handler(pair.handler), queue, board, StopFlag())
    worker.outage.backoff = type(worker.outage.backoff)(base=0.0, cap=0.0)
    RUNNING[:] = [worker]
    return worker


def drive(client: redis.Redis, worker: Worker) -> None:
    """Run `worker` until it exits, is stopped or finds nothing more to do."""
    k = worker.queue.keys

    def idle() -> bool:
        waiting = worker.batch or client.llen(QUEUE) or client.llen(k.processing)
        return not waiting and worker.outbox.empty and not client.zcard(k.retry)

    try:
        step_through_outages(worker, 300, lambda: idle() and not worker.replaying)
    except _Killed:
        raise  # as by SIGKILL: nothing more is sent
    FINISHING[0] = True
    try:
        worker.finish()
    finally:
        FINISHING[0] = False


SETTINGS = {
    "prefetch-10": {"prefetch": 10},
    "fast-after-a-segment": {"prefetch": 10, "max_requests": 11, "fast_path": True},
    "fast-prefetch-3": {"prefetch": 3, "fast_path": True},
    "level0-every": {"prefetch": 3, "level0_every": 2, "fast_path": True},
    "ack-every-message": {"prefetch": 10},  # ACK_INTERVAL passed after each: trims of one
    "max-running": {"prefetch": 10, "max_running": 50},  # TAKE_FLOW, the general loop
    # trims of one with limit 0, then the segment's last acked by a take of one: the fast
    # path must wait for the script's trim
    "ack-every-message-fast": {"prefetch": 5, "max_requests": 6, "fast_path": True},
}


def _run_with_fault(
    client: redis.Redis, url: str, settings: dict[str, object], call: int, how: str
) -> str:
    """One run: produce, run a worker whose `call`-th Redis call fails `how`, then its
    successors until all is done. Returns what went wrong, '' if nothing did."""
    client.flushdb()
    STARTED.clear()
    HANDLED.clear()
    CALLS[0] = 0
    FINISHING[1] = False
    FAULT[:] = [(call, how)]
    producer = Producer(url)
    producer.push(QUEUE, *MESSAGES[:6])
    producer.push(QUEUE, b"once", dedup_key="k")
    producer.push(QUEUE, *MESSAGES[6:])
    slot = Slot(PairSettings(host="h", queue=QUEUE, handler="x:y"), 1, "jobs-1", "node:1")
    slot.previous_unstarted = b""  # its list was empty, as its manager knows
    slot.board.prepare()
    slot.spawned(os.getpid(), now=100.0)
    worker = make_worker(client, settings, slot.board, b"")
    wrong = ""
    try:
        drive(client, worker)
    except _Killed:
        before = in_flight_now(client, worker.queue)
        slot.ended(signal.SIGKILL, now=101.0, backoff=ExponentialBackoff(base=0.0, cap=0.0))
        # what the slot's next worker replays, as its manager hands it on
        successor = new_queue(client, "node:1", keep_connection=False)
        left = successor.replay(slot.previous_unstarted or b"", spared=slot.spared)
        after = {d.payload: d.attempts for d in left}
        charged = {p for p in after if after[p] == before.get(p, -9) + 1}
        expected = {p for p in before if p in STARTED}
        if set(after) != set(before) or charged != expected:
            wrong = f"before {before}, after {after}, started {STARTED}"
    FAULT.clear()
    CALLS[1] = CALLS[0]  # the first worker's calls
    for _ in range(8):  # what is left, by the slot's next workers
        STARTED.clear()
        drive(client, make_worker(client, settings, Scoreboard(), b""))
    # Each message handled once, those that raise once twice: more only after a kill,
    # for what had started; nothing lost.
    unhandled = {m for m in [*MESSAGES, b"once"] if m not in HANDLED}
    if unhandled or client.llen(QUEUE) or client.zcard(Keys(QUEUE).retry) or dead(client):
        wrong += f" unhandled {unhandled}, dead {dead(client)}"
    for opened in OPENED:
        opened.connection_pool.disconnect()
    OPENED.clear()
    twice = {m for m in HANDLED if HANDLED.count(m) > 1 + m.startswith(b"raise")}
    if twice and not how.startswith("kill") and not FINISHING[1]:
        wrong += f" handled twice {twice}"
    return wrong


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_fault_at_any_call_to_redis_loses_nothing_and_charges_what_started(
    client: redis.Redis, redis_server: RedisServer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile payloads and a deduplicated one, among failing ones and a stop mid-batch, on
    the lean loop, with segments, the fast path after a segment and `level0_every`: at every
    call to Redis, a kill (before Redis ran it, or after) charges exactly the deliveries
    that reached a handler, and a lost reply neither loses nor repeats anything."""
    settings = SETTINGS[name]
    monkeypatch.setattr(loop, "BLOCK_TIMEOUT", 0.05)  # an idle worker's fetch: not for long
    if name.startswith("ack-every-message"):
        monkeypatch.setattr(outbox, "ACK_INTERVAL", -1.0)
    CALLS[0] = 0
    FAULT.clear()
    assert _run_with_fault(client, redis_server.url, settings, 10**6, "none") == ""
    calls = CALLS[1]
    assert calls > 5
    wrong = []
    for call in range(1, calls + 1):
        for how in ("kill-before", "kill-after", "lose-before", "lose-after"):
            found = _run_with_fault(client, redis_server.url, settings, call, how)
            if found:
                wrong.append((call, how, found))
    assert wrong == []


# -- Redis out of memory ----------------------------------------------------------------------


def test_out_of_memory_takes_trims_and_materializes_or_refuses_whole(client: redis.Redis) -> None:
    """Over maxmemory (noeviction), the scripts flagged allow-oom (TAKE, RETRY_LATER,
    GIVE_BACK, REPLAY) still trim, mark and materialize a segment; DEAD_LETTER, which waits
    for memory, is refused before it writes anything: the segment is left as it was."""
    q = new_queue(client)
    produce(client, *[b"twin"] * 10)
    taken = q.take([], 5).deliveries
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            client.lpush("some-key", b"x")  # Redis is out of memory indeed
        assert trim(q, taken[:1]) == 0  # marks the new oldest
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            q.dead_letter(taken[1], {"reason": "x"})
        assert marks(raw(client, q)[0]) == (taken[1].id, 5)
        assert q.in_flight() == taken[1:]
        assert q.retry_later(taken[2], 3600)  # materializes
        assert q.in_flight() == [taken[1], *taken[3:]]
        assert q.give_back([taken[4]]) == 1
        left = new_queue(client).replay(taken[3].id)  # taken[1] had started
        assert [(d.payload, d.attempts) for d in left] == [(b"twin", 1), (b"twin", 0)]
        again = new_queue(client)
        again.replay(None)
        assert trim(again, left) == 0  # a new process acks them: the list is empty
        more = again.take([], 5).deliveries  # a segment, pushed out of memory
        assert len(more) == 5 and again.in_flight() == more
    finally:
        client.config_set("maxmemory", 0)
    assert again.dead_letter(more[2], {"reason": "x"}) and dead(client) == [b"twin"]
    assert trim(again, [more[0], more[1], more[3], more[4]]) == 0
    assert raw(client, again) == [] and retrying(client) == [(b"twin", 1)]
    assert shared(client) == [b"twin"]  # 10, 5 taken, 1 given back, 5 taken


# -- reclaims, and a frozen worker waking up ---------------------------------------------------


def test_a_reclaimed_segment_and_its_frozen_worker_waking_up(client: redis.Redis) -> None:
    """Another node reclaims the list of a frozen worker while a segment is in it: each
    member once, the started one charged; the worker wakes, its trim is refused and its
    acks remove nothing of what it takes next (the reclaimed copies, under new ids)."""
    frozen = new_queue(client, "node-b:1")
    produce(client, *[b"twin"] * 10)
    taken = frozen.take([], 5).deliveries
    assert trim(frozen, taken[:1]) == 0
    # taken[1] is in its handler as the node freezes; its lease lapses (it never held one)
    assert new_queue(client, "node-b:1").reclaim(taken[2].id) == 4
    assert retrying(client) == [(b"twin", 0)] * 3 + [(b"twin", 1)]
    assert raw(client, frozen) == [] and client.llen(QUEUE) == 5
    # it wakes: its handler returns, and its ack goes with its next take
    got = frozen.take([taken[1].element, taken[1].element], 10, trim=1)
    assert got.missing_acks == -1, "not where it was: refused, nothing removed"
    assert len(got.deliveries) == 9 and frozen.in_flight() == got.deliveries
    assert sorted(d.attempts for d in got.deliveries) == [0] * 8 + [1]
    assert frozen.take([taken[1].element], 0).missing_acks == 1, "no copy removed"
    assert frozen.in_flight() == got.deliveries
    assert trim(frozen, got.deliveries) == 0 and raw(client, frozen) == []
    assert retrying(client) == [] and shared(client) == []


def test_a_frozen_worker_wakes_after_its_successor_took_a_segment(client: redis.Redis) -> None:
    frozen = new_queue(client, "node-b:1")
    produce(client, *[b"twin"] * 6)
    taken = frozen.take([], 3).deliveries
    successor = new_queue(client, "node-b:1")
    left = successor.replay(taken[1].id)
    assert [d.attempts for d in left] == [1, 0, 0]
    assert trim(successor, left) == 0
    mine = successor.take([], 3).deliveries  # a segment of the successor's
    with pytest.raises(Superseded):
        trim(frozen, taken[:1], limit=3)
    with pytest.raises(Superseded):
        frozen.take([taken[0].element], 3)
    assert successor.in_flight() == mine and client.llen(QUEUE) == 0
    assert trim(successor, mine) == 0


def test_a_paused_queue_s_take_trims_and_marks_a_segment(client: redis.Redis) -> None:
    from rqworkers.store.flow import pause, resume

    q = new_queue(client)
    produce(client, *[b"twin"] * 6)
    taken = q.take([], 4).deliveries
    assert pause(client, QUEUE, "test")
    q._pause_looked_up = float("-inf")  # its next take looks (at most once a second)
    got = q.take([taken[0].element, taken[1].element], 4, trim=2)
    assert got.held is not None and got.deliveries == [] and got.missing_acks == 0
    assert q.in_flight() == taken[2:]
    assert marks(raw(client, q)[0]) == (taken[2].id, 4)
    assert resume(client, QUEUE)
    more = q.take([taken[2].element, taken[3].element], 4, trim=2).deliveries
    assert len(more) == 2 and q.in_flight() == more
    assert marks(raw(client, q)[0]) == (more[0].id, 2), "a new segment"


# -- a rolling update: pods of the version before segments reclaim and replay new lists -------

# docs/kubernetes.md, "Upgrades": old and new pods consume the same queues meanwhile (and
# `kubectl rollout undo` goes back), so "a change of message format must be readable by
# both". The version before 4d084d0 ran RECLAIM and REPLAY as they are now, without the one
# line each that 4d084d0 added: the segment's `materialize`.
_MATERIALIZE = {
    "reclaim": "materialize(processing)  -- a segment's members, as envelopes (lua/envelope.lua)\n",
    "replay": "materialize(processing)  -- a segment's members are read as envelopes, like any\n",
}


def _before_segments(q: ReliableQueue, name: str) -> Bound[object]:
    script = scripts.RECLAIM if name == "reclaim" else scripts.REPLAY
    assert _MATERIALIZE[name] in script.body
    old = dataclasses.replace(script, body=script.body.replace(_MATERIALIZE[name], ""))
    return Bound(q._runner.bind, q.keys, old)  # type: ignore[arg-type]


PAYLOADS = [b'{"order": 1}', b'{"order": 2}', b'{"order": 3}']


def test_a_keeper_of_the_version_before_reclaims_a_segment_s_payloads_intact(
    client: redis.Redis,
) -> None:
    """A new pod SIGKILLed mid-rollout: an old pod's keeper reclaims its list. Each message
    must reach the retry set as its producer sent it, the started one charged."""
    new = new_queue(client, "new-pod:1")
    produce(client, *PAYLOADS)
    taken = new.take([], 3).deliveries  # taken[0] in its handler as the pod dies
    old_keeper = new_queue(client, "new-pod:1", keep_connection=False)
    moved = _before_segments(old_keeper, "reclaim")(
        worker_id="new-pod:1", unstarted=taken[1].id, token=scripts.new_nudge_token(),
        hold=0, spared=b"",
    )  # fmt: skip
    assert moved == 3
    assert sorted(p for p, _ in retrying(client)) == PAYLOADS, "a payload was rewritten"
    # It cannot know the members' ids, so it charges each, as for a lost node: once.
    assert retrying(client) == [(PAYLOADS[0], 1), (PAYLOADS[1], 1), (PAYLOADS[2], 1)]


def test_a_worker_of_the_version_before_replays_a_segment_s_payloads_intact(
    client: redis.Redis,
) -> None:
    """`kubectl rollout undo`, or a slot whose next worker is of the version before: its
    replay hands its handler each message as it was sent."""
    new = new_queue(client, "node:1")
    produce(client, *PAYLOADS)
    taken = new.take([], 3).deliveries
    old = new_queue(client, "node:1", keep_connection=False)
    envelopes = _before_segments(old, "replay")(
        charge="1", unstarted=taken[1].id, idbase="old.1.", mine="old.", worker_id="node:1",
        hold=0, fast="0", spared=b"",
    )  # fmt: skip
    found = [Delivery.parse(e) for e in cast(list[bytes], envelopes)]
    assert [d.payload for d in found] == PAYLOADS, "a payload was rewritten"
    assert found[0].attempts == 1  # the members it cannot know, and takes for its own
