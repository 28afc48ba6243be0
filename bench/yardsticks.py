"""Reliable-queue consumers in plain redis-py: what rqworkers should be measured against.

Each moves messages from a shared list to a private list and removes them once handled, the
same reliability rqworkers gives, without its delivery counting, retries or supervision:

- `a`: BLMOVE one message, handle it, LREM it: two round trips per message.
- `b`: the ack of a message and the fetch of the next in one pipeline: one round trip.
- `c`: one Lua script acks the last batch with a single LTRIM and LMOVEs up to 100 more: one
  round trip per 100 messages.

Run as `python -m bench.yardsticks --url URL --queue Q --mode a --n N [--sleep S]` on a
queue already holding N messages; it prints one JSON line, with the process's own CPU
seconds over its run (`cpu`). Connecting and loading the script happen before the clock
starts.

`--burn US` makes the handler spend about US microseconds of CPU on each message (a loop
timed before the clock starts). With it, a yardstick's client costs per message what a
heavier consumer's does, at the same round trips and the same Redis work: `bench/cost.py`
gives (c) the rqworkers worker's own CPU per message this way, to tell apart what a
client's CPU does to scaling on a small machine from what rqworkers' design does.

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
from itertools import repeat
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


def _burner(loops: int) -> Handle:
    def burn(message: bytes) -> None:
        for _ in repeat(None, loops):  # the same cost per turn at any count (a range's
            pass  # turns past 256 make new ints)

    return burn


def _fastest_call_us(handle: Handle, calls: int = 100, seconds: float = 0.05) -> float:
    """CPU µs of one call of `handle`, at its fastest window of `calls` calls over
    `seconds` (the first windows run slower, on a core still waking)."""
    best = float("inf")
    until = time.process_time() + seconds
    while time.process_time() < until:
        started = time.process_time()
        for _ in range(calls):
            handle(b"")
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


def _burner_of(burn_us: float) -> Handle:
    """A handler that spends about `burn_us` of CPU a call more than a no-op one: its
    loop is sized by timing the very function it returns at two sizes (a call costs a
    fixed part and a part per turn)."""
    noop = _fastest_call_us(_handler(0.0))
    short, long = _fastest_call_us(_burner(100)), _fastest_call_us(_burner(2_000))
    per_turn = max(1e-6, (long - short) / 1_900)
    fixed = short - 100 * per_turn
    return _burner(max(1, round((burn_us + noop - fixed) / per_turn)))


def _handler(sleep: float, burn_us: float = 0.0) -> Handle:
    if burn_us > 0:
        return _burner_of(burn_us)
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
    parser.add_argument("--burn", type=float, default=0.0, help="µs of CPU per message")
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
    handle = _handler(args.sleep, args.burn)
    began, started, cpu = time.time(), time.perf_counter(), time.process_time()
    handled = MODES[args.mode](client, args.queue, processing, args.n, handle)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    left = client.llen(processing)
    result = {"handled": handled, "expected": args.n, "elapsed": elapsed, "left": left}
    result["cpu"] = cpu
    print(json.dumps({**result, "began": began, "ended": began + elapsed}))


if __name__ == "__main__":
    main()
