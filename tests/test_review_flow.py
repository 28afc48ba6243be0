"""A hostile review of flow control (issue 19): limits, groups, pause and resume attacked
where a production user meets them."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from rqworkers.store import flow
from rqworkers.store.flow import Limits
from rqworkers.store.queue import ReliableQueue
from tests.support import RedisServer, run_cli, write_config

QUEUE = "jobs"


def worker(client: redis.Redis, n: int, **limits: object) -> ReliableQueue:
    return ReliableQueue(client, QUEUE, f"node:{n}", limits=Limits(**limits))  # type: ignore[arg-type]


def test_numeric_group_ids_keep_every_digit(redis_server: RedisServer) -> None:
    """Tenant ids are often numbers of 15 or 16 digits (below 2**53, exact in JSON's
    doubles). Two tenants must never share a group, nor its limit, and a group is named
    as its payloads spell it. Lua's `tostring` keeps 14 digits: 123456789012341 and
    123456789012342 were one group, `1.2345678901234e+14`."""
    client = redis_server.client()
    ids = [123456789012341, 123456789012342, 4503599627370497, 7, -12, 2.5]
    client.lpush(QUEUE, *[json.dumps({"kwargs": {"tenant": t}}).encode() for t in ids])
    q = worker(client, 1, group_by="kwargs.tenant", group_max_running=1)
    q.take([], 0)  # sorts them into their groups
    names = {g.name for g in flow.group_states(client, QUEUE).busiest}
    assert names == {str(t) for t in ids}
    assert len(q.take([], 10).deliveries) == len(ids), "a tenant each: a permit each"
