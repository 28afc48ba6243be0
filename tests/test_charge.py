"""Issue 17, section 2: no message can make a worker run its task forever.

A delivery is charged whenever its worker ends after the handler started it, whatever the
exit code: here the handler returns, and then the worker's ack is refused (WRONGTYPE on a
queue key, exit code 74). Against a real redis-server and `rqworkers run`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import fakeredis
import pytest
import redis

from rqworkers.store import scripts
from rqworkers.store.queue import DeadLetters, Keys, ReliableQueue, bind_script, renew_leases
from tests.support import RedisServer, Service, dead_info, free_port, wait_for
from tests.test_health import healthz, manager_with_metrics
from tests.test_operate import cli, lrange, scrape

StartService = Callable[..., Service]
HANDLER = "testapp:refuse_the_ack"
NEIGHBOURS = [f"ok-{n}".encode() for n in range(20)]


def drained(server: RedisServer) -> bool:
    client = server.client()
    every = Keys("jobs", "*")
    keys = ["jobs", *client.keys(every.processing), *client.keys(every.landing)]
    return sum(client.llen(k) for k in keys) == 0 and client.zcard(Keys("jobs").retry) == 0


@pytest.mark.parametrize(("prefetch", "concurrency"), [(1, 1), (10, 1), (1, 4), (10, 4)], ids=str)
def test_a_message_whose_ack_is_refused_runs_at_most_max_attempts_times(
    service: StartService, redis_server: RedisServer, prefetch: int, concurrency: int
) -> None:
    # One at a time, at prefetch 1, the worker takes by the fast path, which reads no owner.
    handler = "testapp:end_after_handling" if (prefetch, concurrency) == (1, 1) else HANDLER
    pair = {"queue": "jobs", "handler": handler, "max_attempts": 3}
    svc = service([{**pair, "prefetch": prefetch, "concurrency": concurrency}])
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"poison", *NEIGHBOURS)  # the poison is taken first

    wait_for(lambda: client.llen(Keys("jobs").dead) >= 1, timeout=30, what="the poison dead")
    wait_for(lambda: drained(redis_server), timeout=30, what="the queue behind it drained")
    started = lrange(redis_server, "started")
    assert started.count(b"poison") == 3, "charged for every end after its handler started"
    dead = lrange(redis_server, Keys("jobs").dead)
    assert dead[-1] == b"poison"
    info = dead_info(redis_server, "jobs", b"poison")
    assert info["attempts"] == 3
    # With others in their handlers, the worker ends mid-message, and is named so.
    assert re.search(
        r"redis refused an operation|mid-message \(exit code 74\)", str(info["reason"])
    )
    done = set(lrange(redis_server, "done"))
    assert set(NEIGHBOURS) <= done | set(dead), "nothing lost"
    if concurrency == 1:  # one at a time, a neighbour never shares the poison's fate
        assert set(NEIGHBOURS) <= done and len(dead) == 1
    exits = re.findall(
        r"exited: (redis refused an operation|exited mid-message \(exit code 74\))", svc.output()
    )
    assert len(exits) >= 3
    assert svc.process is not None and svc.process.poll() is None, "the service runs on"


def test_an_exit_that_repeats_on_one_delivery_backs_off_and_shows(
    service: StartService, redis_server: RedisServer
) -> None:
    port = free_port()
    manager = manager_with_metrics(port, restart_backoff_max=4.0)
    # Prefetch 2: takes by the script, whose owner check the handler breaks (at prefetch 1
    # the fast path reads no owner: see the test above).
    pair = {"queue": "jobs", "handler": HANDLER, "max_attempts": 6, "prefetch": 2}
    svc = service([pair], manager=manager)
    svc.wait_workers(1)
    client = redis_server.client()
    client.lpush("jobs", b"poison", b"after")

    def crash_loop() -> dict[str, object] | None:
        code, body = healthz(port)
        return body if code == 503 and "keeps failing" in str(body.get("reason")) else None

    body = wait_for(crash_loop, timeout=20, what="/healthz to tell the crash loop")
    assert "last exit: redis refused an operation" in str(body["reason"])

    def backoff_in_status() -> str | None:
        text = cli("status", "-c", str(svc.config_path)).stdout.decode()
        row = next((line for line in text.splitlines() if "jobs-1" in line), "")
        return row if " backoff " in row else None

    row = wait_for(backoff_in_status, timeout=20, what="status to show the backoff")
    assert "last exit: redis refused an operation" in row

    def backoff_on_the_page() -> dict[str, object] | None:
        pairs = json.loads(scrape(port, "/api/status")[1])  # what the status page draws
        workers = [w for p in pairs for w in (p["snapshot"] or {}).get("workers", [])]
        return next((w for w in workers if w.get("state") == "backoff"), None)

    worker = wait_for(backoff_on_the_page, timeout=20, what="the page to show the backoff")
    assert worker["last_exit"] == "redis refused an operation"
    wait_for(lambda: client.llen(Keys("jobs").dead) == 1, timeout=30, what="the poison dead")
    wait_for(lambda: b"after" in lrange(redis_server, "done"), timeout=30, what="the next one")
    assert lrange(redis_server, "started").count(b"poison") == 6
    restarts = [line for line in svc.output().splitlines() if "restarting in" in line]
    assert len(restarts) >= 3, "each repeat waits longer before the next worker"


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_redis_out_of_memory_drains_the_queue_that_fills_it(
    service: StartService,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    concurrency: int,
) -> None:
    """Issue 17, section 6: over `maxmemory` with noeviction, producers are refused, but
    the workers still take, ack and so drain what is waiting; nothing is lost."""
    out = tmp_path / "handled"
    monkeypatch.setenv("TESTAPP_OUT", str(out))
    client = redis_server.client()
    sent = [b"%06d:" % n + b"." * 1000 for n in range(2000)]
    for start in range(0, len(sent), 100):
        client.lpush("jobs", *sent[start : start + 100])
    # The queue now holds 2 MB more than Redis may: it refuses every write that may grow.
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 1_000_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.lpush("jobs", b"one more")

    pair = {"queue": "jobs", "handler": "testapp:to_file", "prefetch": 10}
    svc = service([{**pair, "concurrency": concurrency}])
    wait_for(lambda: drained(redis_server), timeout=60, what="the queue drained")
    handled = out.read_bytes().splitlines()
    assert set(handled) == set(sent), "every message handled"
    assert len(handled) == len(sent), "each once"
    assert "out of memory" not in svc.output().lower()


def test_leases_are_renewed_on_a_redis_out_of_memory(redis_server: RedisServer) -> None:
    """A keeper that cannot renew leases on a Redis out of memory would let live workers'
    messages be reclaimed (and run twice) while they drain the queue."""
    client = redis_server.client()
    client.set("filler", b"x" * 2_000_000)
    client.config_set("maxmemory", 1_000_000)
    leases = {("jobs", "node:1"): '{"state": "idle"}'}
    assert renew_leases(client, leases, ttl=5.0) == 1, "it had no lease: registered"
    assert renew_leases(client, leases, ttl=5.0) == 0
    assert 0 < client.pttl(Keys("jobs", "node:1").lease) <= 5000
    assert client.smembers(Keys("jobs").registry) == {b"node:1"}
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", b"x")


def test_a_redis_that_reads_no_script_flags_runs_the_scripts_without_them() -> None:
    """Before Redis 7.0 a shebang line is a syntax error (fakeredis answers the same): the
    script runs without its flags from then on, as every script did before flags."""
    client = fakeredis.FakeRedis()
    sources: list[str] = []

    def make(source: str) -> Callable[..., object]:
        sources.append(source)
        return client.register_script(source)

    lease = bind_script(make, scripts.LEASE)
    keys = Keys.of("jobs", "node:1").of_script(scripts.LEASE)
    args = {"value": "{}", "ttl": 5000, "worker_id": "node:1"}
    assert lease(keys=keys, args=scripts.LEASE.argv(**args, register="1")) is None
    assert lease(keys=keys, args=scripts.LEASE.argv(**args, register="0")) == b"{}"
    assert [s.startswith("#!lua flags=allow-oom\n") for s in sources] == [True, False]
    assert client.smembers(Keys("jobs").registry) == {b"node:1"}


def test_dead_letters_can_be_purged_on_a_redis_out_of_memory(redis_server: RedisServer) -> None:
    """Purging frees memory: an operator must be able to do it when memory is full."""
    client = redis_server.client()
    client.lpush("jobs", b"bad-1", b"bad-2")
    queue = ReliableQueue(client, "jobs", "node:1")
    for delivery in queue.take([], 2).deliveries:
        assert queue.dead_letter(delivery, {"reason": "r", "attempts": 1})
    client.set("filler", b"x" * 2_000_000)
    client.config_set("maxmemory", 1_000_000)
    dead = DeadLetters(client, "jobs")
    assert dead.requeue(dead.page(0, 1)) == 1
    assert dead.purge(dead.page()) == 1
    assert client.llen(Keys("jobs").dead) == 0 and client.lrange("jobs", 0, -1) == [b"bad-2"]
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", b"x")
