"""The handler `bench/flow.py` runs: it records every start and end in a Redis of its own.

Flow control is judged from inside the handlers, where a user meets it: how many run at
once, how many start in any window. The records go to a bookkeeping Redis (`$BENCH_FLOW_URL`),
never the one the queue lives on, so that the bench's own writes neither share the limits'
keys nor load the Redis whose CPU is measured.

A message is JSON: `{"id": 7, "sleep": 0.05, "group": "A"}` (`group` may be missing). Per
start, one round trip: the running count goes up and its peak is kept (one script, so the
peak is exact in Redis's order of events), and `start id group pid node` is appended to a list.
Per end, another: the count goes down and `end id pid` is appended.
"""

from __future__ import annotations

import json
import os
import time

import redis

URL_ENV = "BENCH_FLOW_URL"
RUNNING = "flow:running"  # handlers running now
PEAK = "flow:peak"  # the most that ever ran at once
STARTS = "flow:starts"  # list of "<time> <id> <group> <pid> <session>" (session: the node)
ENDS = "flow:ends"  # list of "<time> <id> <pid>"
READY = "flow:ready"  # list of "<pid> <time>": workers whose setup ran, and when

# KEYS: running, peak, starts  ARGV: the start record. Returns the count after the start.
_START = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
redis.call('RPUSH', KEYS[3], ARGV[1])
return n
"""


class Measure:
    """Sleeps as the message says, between a start record and an end record."""

    def setup(self) -> None:
        self.client = redis.Redis.from_url(os.environ[URL_ENV])
        self.start = self.client.register_script(_START)
        self.pid = os.getpid()
        self.node = os.getsid(0)  # its manager's session: one per node
        self.client.rpush(READY, f"{self.pid} {time.time()!r}")

    def handle(self, message: bytes) -> None:
        started = time.time()
        fields = json.loads(message)
        number, group = fields["id"], fields.get("group", "-")
        self.start(
            keys=[RUNNING, PEAK, STARTS],
            args=[f"{started!r} {number} {group} {self.pid} {self.node}"],
        )
        try:
            time.sleep(fields["sleep"])
        finally:
            pipe = self.client.pipeline(transaction=False)
            pipe.decr(RUNNING)
            pipe.rpush(ENDS, f"{time.time()!r} {number} {self.pid}")
            pipe.execute()

    def teardown(self) -> None:
        self.client.close()
