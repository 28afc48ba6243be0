"""Deduplication keys: `Producer.push(dedup_key=)`, `submit`, `--dedup-key`: one message per
key while it waits, is scheduled or runs; throttle and debounce; against real Redis and the
real service."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from rqworkers.client.producer import Producer
from rqworkers.store.dedup import key_name
from rqworkers.store.delayed import RetrySet
from rqworkers.store.keys import Keys
from rqworkers.store.queue import Delivery, unwrap_dedup, wrap_dedup
from tests.support import RedisServer, run_cli, wait_for, write_config

QUEUE = "once"


def test_twenty_concurrent_pushes_with_one_key_enqueue_one_message(
    redis_server: RedisServer,
) -> None:
    producers = [Producer(redis_server.url) for _ in range(20)]
    start = threading.Barrier(20)
    sent: list[int] = []

    def push(producer: Producer) -> None:
        start.wait()
        sent.append(producer.push(QUEUE, b"rebuild", dedup_key="rebuild:42"))

    threads = [threading.Thread(target=push, args=(p,)) for p in producers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(sent) == [0] * 19 + [1]
    assert redis_server.client().llen(QUEUE) == 1
    ttl = redis_server.client().pttl(key_name(QUEUE, "rebuild:42"))
    assert 0 < ttl <= 86_400_000, "the key expires: a lost message cannot block it for good"


def test_throttle_blocks_for_its_ttl_whatever_became_of_the_message(
    redis_server: RedisServer,
) -> None:
    producer = Producer(redis_server.url)
    assert producer.push(QUEUE, b"ping", dedup_key="t", dedup_ttl=0.3) == 1
    client = redis_server.client()
    client.delete(QUEUE)  # the message is gone (handled, say): the key still blocks
    assert producer.push(QUEUE, b"ping", dedup_key="t", dedup_ttl=0.3) == 0
    wait_for(lambda: not client.exists(key_name(QUEUE, "t")), timeout=5, what="the ttl")
    assert producer.push(QUEUE, b"ping", dedup_key="t", dedup_ttl=0.3) == 1
    assert client.lrange(QUEUE, 0, -1) == [b"ping"], "a throttled payload travels bare"


def test_debounce_replaces_the_pending_delayed_message_and_restarts_its_delay(
    redis_server: RedisServer,
) -> None:
    producer = Producer(redis_server.url)
    assert producer.push(QUEUE, b"v1", delay=30, dedup_key="d", dedup="debounce") == 1
    time.sleep(0.05)  # so that the second due time is measurably later
    assert producer.push(QUEUE, b"v2", delay=30, dedup_key="d", dedup="debounce") == 1
    (item,) = RetrySet(redis_server.client(), QUEUE).page()
    assert item.delivery.payload == b"v2" and item.delivery.dedup is not None
    assert item.due == pytest.approx(time.time() + 30, abs=0.5)


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"dedup_key": ""}, "dedup_key must be a non-empty string"),
        ({"dedup_key": "k", "dedup_ttl": float("nan")}, "dedup_ttl must be a positive number"),
        ({"dedup_key": "k", "dedup_ttl": 0}, "dedup_ttl must be a positive number"),
        ({"dedup_key": "k", "dedup": "debounce"}, "for delayed messages"),
        ({"dedup_key": "k", "dedup": "other"}, "dedup must be 'debounce'"),
        ({"dedup_ttl": 5.0}, "dedup_key must be"),
    ],
)
def test_bad_dedup_options_are_refused_in_one_line(
    redis_server: RedisServer, kwargs: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        Producer(redis_server.url).push(QUEUE, b"x", **kwargs)
    with pytest.raises(ValueError, match="exactly one payload"):
        Producer(redis_server.url).push(QUEUE, b"x", b"y", dedup_key="k")


def test_only_a_payload_we_wrapped_is_unwrapped() -> None:
    wrapped = wrap_dedup("ab" * 16, "key:with:colons", b"pay:load")
    assert unwrap_dedup(wrapped) == (b"pay:load", "ab" * 16, "key:with:colons")
    delivery = Delivery(b"1.1.1", 0, wrapped)
    assert delivery.payload == b"pay:load" and delivery.dedup == ("ab" * 16, "key:with:colons")
    assert delivery.element.endswith(wrapped), "the envelope keeps what was pushed"
    for lookalike in (b"rqw1:dedup:x", b"rqw1:dedup:" + b"g" * 32 + b":6b:p", b"rqw1:dedup:::"):
        assert Delivery(b"1.1.1", 0, lookalike).payload == lookalike


# -- the real service ----------------------------------------------------------------------


@pytest.mark.service
def test_a_key_is_held_while_its_message_waits_and_runs_and_freed_once_acked(
    redis_server: RedisServer, service: Any
) -> None:
    client = redis_server.client()
    producer = Producer(redis_server.url)
    service([{"queue": QUEUE, "handler": "testapp:handle"}])
    assert producer.push(QUEUE, b"sleep:1", dedup_key="job") == 1
    wait_for(lambda: client.lrange("started", 0, -1) == [b"sleep:1"], timeout=15,
             what="the handler to start, seeing the bare payload")  # fmt: skip
    assert producer.push(QUEUE, b"sleep:1", dedup_key="job") == 0, "running: dropped"
    wait_for(lambda: client.llen("done") == 1, timeout=15, what="the handler to finish")
    wait_for(lambda: not client.exists(key_name(QUEUE, "job")), timeout=5, what="the release")
    assert producer.push(QUEUE, b"sleep:0", dedup_key="job") == 1, "acked: enqueued again"
    wait_for(lambda: client.llen("done") == 2, timeout=15, what="the second message")


@pytest.mark.service
def test_a_retry_keeps_the_key_and_a_dead_letter_frees_it(
    redis_server: RedisServer, service: Any
) -> None:
    client = redis_server.client()
    producer = Producer(redis_server.url)
    service([{"queue": QUEUE, "handler": "testapp:handle", "max_attempts": 2,
              "retry_delay": 1.0}])  # fmt: skip
    assert producer.push(QUEUE, b"raise", dedup_key="bad") == 1
    wait_for(lambda: client.zcard(Keys(QUEUE).retry) == 1, timeout=15, what="a retry")
    assert producer.push(QUEUE, b"raise", dedup_key="bad") == 0, "retrying: still pending"
    wait_for(lambda: client.llen(Keys(QUEUE).dead) == 1, timeout=15, what="the dead letter")
    assert client.lrange(Keys(QUEUE).dead, 0, -1) == [b"raise"], "the dead list keeps it bare"
    wait_for(lambda: not client.exists(key_name(QUEUE, "bad")), timeout=5, what="the release")
    assert producer.push(QUEUE, b"raise", dedup_key="bad") == 1


@pytest.mark.service
def test_push_dedup_key_on_the_command_line(tmp_path: Path, redis_server: RedisServer) -> None:
    path = str(write_config(tmp_path / "c.toml", redis_server.url,
                            [{"queue": QUEUE, "handler": "testapp:handle"}]))  # fmt: skip
    first = run_cli("-c", path, "push", "--dedup-key", "k", "hello")
    assert first.returncode == 0 and "pushed to once (dedup key k)" in first.stdout
    again = run_cli("-c", path, "push", "--dedup-key", "k", "hello")
    assert again.returncode == 0 and "dropped: a message with dedup key k" in again.stdout
    assert cast(int, redis_server.client().llen(QUEUE)) == 1
    two = run_cli("-c", path, "push", "--dedup-key", "k", "a", "b")
    assert two.returncode == 2 and "exactly one PAYLOAD" in two.stderr
    ttl = run_cli("-c", path, "push", "--dedup-ttl", "5", "a")
    assert ttl.returncode == 2 and "--dedup-ttl goes with --dedup-key" in ttl.stderr
