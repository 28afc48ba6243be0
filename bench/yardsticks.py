"""Reliable-queue consumers in plain redis-py: what rqworkers should be measured against.

Each moves messages from a shared list to a private list and removes them once handled, the
same reliability rqworkers gives, without its delivery counting, retries or supervision:

- `a`: BLMOVE one message, handle it, LREM it: two round trips per message.
- `b`: the ack of a message and the fetch of the next in one pipeline: one round trip.
- `c`: one Lua script acks the last batch with a single LTRIM and LMOVEs up to 100 more: one
  round trip per 100 messages.

Run as `python -m bench.yardsticks --url URL --queue Q --mode a --n N [--sleep S]` on a
queue already holding N messages; it prints one JSON line. Connecting and loading the
script happen before the clock starts.

With `--go KEY`, several of them share one queue, as the processes of one rqworkers pair
do: each pushes onto `KEY:ready` once it is connected, starts its clock when `KEY` gets an
element, stops when the queue is empty, and reports its own first and last instants
(`time.time()`), so the caller can take the rate over the union of their runs. Each then
uses its own private list, `Q:processing:<pid>`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import redis

BATCH = 100

# KEYS: queue, processing. ARGV: how many of the oldest messages to ack, batch size.
_TAKE_BATCH = """
local acks = tonumber(ARGV[1])
if acks > 0 then redis.call('LTRIM', KEYS[2], 0, -acks - 1) end
local out = {}
for _ = 1, tonumber(ARGV[2]) do
  local message = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not message then break end
  out[#out + 1] = message
end
return out
"""


Handle = Callable[[bytes], None]


def _handler(sleep: float) -> Handle:
    if sleep <= 0:

        def noop(message: bytes) -> None:
            pass

        return noop

    def work(message: bytes) -> None:
        time.sleep(sleep)

    return work


def blmove_lrem(client: redis.Redis, queue: str, processing: str, n: int, handle: Handle) -> int:
    """(a) The textbook reliable queue: two round trips per message."""
    handled = 0
    while handled < n:
        message: Any = client.blmove(queue, processing, 1, "RIGHT", "LEFT")
        if message is None:
            break
        handle(message)
        client.lrem(processing, -1, message)
        handled += 1
    return handled


def pipelined(client: redis.Redis, queue: str, processing: str, n: int, handle: Handle) -> int:
    """(b) The ack of one message travels with the fetch of the next: one round trip."""
    pipe = client.pipeline(transaction=False)
    previous: Any = None
    handled = 0
    while handled < n:
        if previous is not None:
            pipe.lrem(processing, -1, previous)
        pipe.lmove(queue, processing, "RIGHT", "LEFT")
        message = pipe.execute()[-1]
        if message is None:
            previous = None
            break
        handle(message)
        previous = message
        handled += 1
    if previous is not None:
        client.lrem(processing, -1, previous)
    return handled


def lua_batch(client: redis.Redis, queue: str, processing: str, n: int, handle: Handle) -> int:
    """(c) 100 LMOVEs per script call; the whole batch acked by one LTRIM in the next call."""
    take = client.register_script(_TAKE_BATCH)  # loaded by the caller, before its clock
    acks = 0
    handled = 0
    while handled < n:
        batch = take(keys=[queue, processing], args=[acks, min(BATCH, n - handled)])
        if not batch:
            break
        for message in batch:
            handle(message)
        acks = len(batch)
        handled += acks
    take(keys=[queue, processing], args=[acks, 0])  # the last batch's ack
    return handled


MODES: dict[str, Callable[[redis.Redis, str, str, int, Handle], int]] = {
    "a": blmove_lrem,
    "b": pipelined,
    "c": lua_batch,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--go", help="start when this list gets an element (see above)")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.url)
    client.ping()
    if args.mode == "c":
        client.script_load(_TAKE_BATCH)
    processing = f"{args.queue}:processing"
    if args.go:
        processing += f":{os.getpid()}"
        client.rpush(f"{args.go}:ready", os.getpid())
        client.blpop([args.go])
    began, started = time.time(), time.perf_counter()
    handled = MODES[args.mode](client, args.queue, processing, args.n, _handler(args.sleep))
    elapsed = time.perf_counter() - started
    left = client.llen(processing)
    result = {"handled": handled, "expected": args.n, "elapsed": elapsed, "left": left}
    print(json.dumps({**result, "began": began, "ended": began + elapsed}))


if __name__ == "__main__":
    main()
