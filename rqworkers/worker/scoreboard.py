"""The numbers a slot's worker, its manager and the keeper share through shared memory.

The manager needs to know how long the current message has run (to kill a handler stuck in
C code) and which deliveries had reached the handler when a worker died (each is charged
one attempt), without asking the worker: a dead or stuck worker cannot answer. The keeper
needs the same numbers to publish status and serve metrics. An anonymous shared mapping
made before `fork` costs the worker a few memory writes per message and no system call.

Counters are cumulative over every worker the slot has had, so metrics stay correct across
recycling; a worker's own figures are the difference from a base taken at its start.
Each field has a single writer (the worker or the manager), so no lock is needed.

Counting words, one meaning each (docs/operating.md says the same): a message *succeeded*
when its handler returned, *failed* when it raised or ran past its timeout; every delivery
that reached the handler is one or the other.
"""

from __future__ import annotations

import bisect
import mmap
import time

# Upper bounds in seconds of the handler-duration histogram (Prometheus' defaults).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
RECYCLE_REASONS = ("max_requests", "timeout", "memory_soft", "memory_hard", "crash")

_WORKER_COUNTERS = ("succeeded", "failed", "retried", "dead_lettered", "redis_errors")
_REASON_BYTES = 120  # per text field: the manager's last exit, the worker's Redis error
# What is in the handler: one entry per message a worker runs at once (up to `concurrency`),
# each the monotonic time it started (0: free).
CAPACITY = 1000
# A mark: a delivery id's length, a number, then the id (up to 56 bytes); see `mark_unstarted`
_MARK_BYTES = 72
_ID_BYTES = _MARK_BYTES - 16


def _layout() -> dict[str, int]:
    names = [
        "entries_used",  # worker: running entries ever used (readers look no further)
        "replayed",  # worker: 1 once it has replayed its private list (its mark means something)
        "replay_begun",  # worker: the length of the process id it replays as (see `replay_begun`)
        "ready",  # worker: 1 once its handler's setup() has returned
        "waiting_since",  # worker: wall-clock start of the Redis error it waits out; 0 none
        "mark_side",  # worker: which of the two unstarted marks is the current one
        # worker, cumulative over the slot's life: deliveries whose ack, retry or dead letter
        # Redis confirmed (a worker that settled none before it died made no progress)
        "settled",
        *_WORKER_COUNTERS,  # worker: cumulative over the slot's life
        "duration_sum",  # worker: seconds spent in handlers
        *(f"bucket{i}" for i in range(len(DURATION_BUCKETS) + 1)),  # worker: cumulative
        "pid",  # manager: the live worker's pid, 0 when none
        "stopping",  # manager: 1 once it asked the worker to stop
        "since",  # manager: wall-clock start time of the live worker
        "next_start",  # manager: wall-clock time of the next start while in backoff
        "ended_at",  # manager: wall-clock time the last worker ended
        "bad_exits",  # manager: the slot's consecutive failed starts or crashes
        "succeeded_base",  # manager: `succeeded` when the live worker started
        "failed_base",
        "settled_base",
        "spared",  # manager: the length of what `hand_on` wrote of the slot's spared ids
        *(f"recycled_{reason}" for reason in RECYCLE_REASONS),  # manager: cumulative
    ]
    return {name: 8 * i for i, name in enumerate(names)}


_OFFSETS = _layout()
_INDEX = {name: offset // 8 for name, offset in _OFFSETS.items()}
_REASON_OFFSET = 8 * len(_OFFSETS)  # written by the manager: why the last worker ended
_WAITING_OFFSET = _REASON_OFFSET + _REASON_BYTES  # written by the worker: its Redis error
_ENTRIES_OFFSET = _WAITING_OFFSET + _REASON_BYTES + (-(_REASON_BYTES) % 8)
# Two marks, each an id length, a number, then the id: the id of the oldest delivery in the
# private list that has not reached the handler. The worker writes the spare one and then
# flips `mark_side`, so a worker killed at any instant leaves a whole mark; or it moves the
# current one's number on (`start`), a single aligned word, as whole.
_MARKS_OFFSET = _ENTRIES_OFFSET + CAPACITY * 8
_REPLAY_BEGUN_OFFSET = _MARKS_OFFSET + 2 * _MARK_BYTES  # the process id of `replay_begun`
# Written by the manager while the slot has no worker (`hand_on`): the process ids of the
# slot's `spared`, joined by ',', for its keeper's reclaim.
_SPARED_OFFSET = _REPLAY_BEGUN_OFFSET + _MARK_BYTES
_SPARED_BYTES = 16 * 16
_SIZE = _SPARED_OFFSET + _SPARED_BYTES
_FLOATS = {"duration_sum", "since", "next_start", "waiting_since", "ended_at"}
# Indexes the per-message path uses, resolved once.
_ENTRIES_USED, _SUCCEEDED, _FAILED, _DURATION_SUM, _BUCKET0 = (
    _INDEX[name] for name in ("entries_used", "succeeded", "failed", "duration_sum", "bucket0")
)
_ENTRY0 = _ENTRIES_OFFSET // 8  # word index of entry 0, the start (a float) of each
_MARK0, _MARK_WORDS = _MARKS_OFFSET // 8, _MARK_BYTES // 8
_MARK_SIDE, _SETTLED = _INDEX["mark_side"], _INDEX["settled"]
_FIRST_BOUND = DURATION_BUCKETS[0]


class Scoreboard:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SIZE, flags=mmap.MAP_SHARED)
        # Two views of the same memory, 8 bytes a field: plain indexing is several times
        # cheaper than struct packing, and the worker writes on every message.
        self._ints = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")
        self._mark_number = _MARK0 + 1  # the word of the current mark's number (`start`)

    def get(self, name: str) -> float:
        view = self._floats if name in _FLOATS else self._ints
        return view[_INDEX[name]]

    def _set(self, name: str, value: float) -> None:
        if name in _FLOATS:
            self._floats[_INDEX[name]] = value
        else:
            self._ints[_INDEX[name]] = int(value)

    def _add(self, name: str, amount: float = 1) -> None:
        self._set(name, self.get(name) + amount)

    # -- written by the worker, per message: indexes, no lookups ---------------------------

    def busy(self, since: float, entry: int = 0) -> None:
        """A delivery reaches the handler at `since` (monotonic seconds), in running entry
        `entry` (one per message the worker runs at once). Which ones are charged should
        the worker die is `mark_unstarted`'s business."""
        self._floats[_ENTRY0 + entry] = since
        if entry >= self._ints[_ENTRIES_USED]:
            self._ints[_ENTRIES_USED] = entry + 1

    def idle(self, failed: bool, seconds: float, entry: int = 0) -> None:
        """The handler is done with it after `seconds` (the message may not be settled yet)."""
        ints = self._ints
        self._floats[_ENTRY0 + entry] = 0.0
        ints[_FAILED if failed else _SUCCEEDED] += 1
        self._floats[_DURATION_SUM] += seconds
        ints[_BUCKET0 + bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1

    def mark_unstarted(self, delivery_id: bytes) -> None:
        """`delivery_id` is the oldest delivery in the private list whose handler has not
        started (b"": every one there has started). Deliveries take their place in the list
        in the order they start, so if this worker dies, every delivery older than it in the
        list reached the handler and is charged one attempt, whatever the exit: finished but
        unsettled ones too, since nothing says their ack would ever get through."""
        self._write_mark(delivery_id, 0)

    def mark_in(self, base: bytes, n: int) -> None:
        """`mark_unstarted` for the delivery `base` + n (n >= 1), the n-th of a take whose
        ids are its id base and a count from 1: the mark `start` moves on along that take
        with one word per message (bytes, per message, were a third of a quick handler's
        scoreboard writes)."""
        self._write_mark(base, n)

    def start(self, n: int, since: float) -> None:
        """`mark_in` of the n-th delivery of the take the current mark names, then `busy`
        at `since` in entry 0: the lean loop's writes as a handler starts (`Worker.run_lot`).
        Only after `mark_in` of that take, and with entry 0 in use."""
        self._ints[self._mark_number] = n
        self._floats[_ENTRY0] = since

    def succeeded_in(self, seconds: float) -> None:
        """`idle` of entry 0 after a handler returned in `seconds`: the lean loop's writes."""
        ints, floats = self._ints, self._floats
        floats[_ENTRY0] = 0.0
        ints[_SUCCEEDED] += 1
        floats[_DURATION_SUM] += seconds
        # Most quick handlers fall in the first bucket: no search for them.
        if seconds <= _FIRST_BOUND:
            ints[_BUCKET0] += 1
        else:
            ints[_BUCKET0 + bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1

    def _write_mark(self, head: bytes, n: int) -> None:
        """The mark `head` (+ n, if n) into the spare side, then that side made current."""
        ints = self._ints
        side = 1 - ints[_MARK_SIDE]
        word = _MARK0 + side * _MARK_WORDS
        size = len(head)
        if size > _ID_BYTES:  # never for ids rqworkers makes; the slice would copy
            size, head = _ID_BYTES, head[:_ID_BYTES]
        start = word * 8 + 16
        self._map[start : start + size] = head
        ints[word] = size
        ints[word + 1] = n
        ints[_MARK_SIDE] = side
        self._mark_number = word + 1

    def settled(self, deliveries: int) -> None:
        """Redis confirmed the ack, retry or dead letter of `deliveries` more deliveries."""
        self._ints[_SETTLED] += deliveries

    def release(self, entry: int) -> None:
        """Free a running entry without counting an outcome: its delivery was settled
        elsewhere (a thread abandoned past its timeout, as the worker exits)."""
        self._floats[_ENTRY0 + entry] = 0.0

    def replay_begun(self, process: bytes) -> None:
        """The worker is about to replay its private list as `process` (its id prefix, as
        its envelopes carry it). Should it die before `replayed`, its manager learns who
        may have charged (and renamed) the deliveries its mark names, so that the next
        replay does not charge them again (`replay_interrupted`). The id is written, then
        its length: a worker killed in between leaves none."""
        self._write_sized(_REPLAY_BEGUN_OFFSET, "replay_begun", process[:_ID_BYTES])

    def replayed(self) -> None:
        self._set("replayed", 1)

    def count(self, event: str) -> None:
        """One more `retried`, `dead_lettered` or `redis_errors`."""
        self._add(event)

    # -- written by the worker, when its state changes -------------------------------------

    def ready(self) -> None:
        """The handler's setup() has returned: the worker can consume."""
        self._set("ready", 1)

    def waiting(self, reason: str | None) -> None:
        """The worker waits out a Redis error, for `reason`; None: Redis answers again."""
        if reason is None:
            self._set("waiting_since", 0.0)
            return
        self._write_text(_WAITING_OFFSET, reason)
        if not self.get("waiting_since"):
            self._set("waiting_since", time.time())

    # -- written by the manager -------------------------------------------------------------

    def prepare(self) -> None:
        """Before forking a new worker: clear what described the previous one."""
        self._clear_entries()
        self._set("entries_used", 0)
        self._set("replayed", 0)
        self._set("replay_begun", 0)
        self._set("spared", 0)
        self._set("mark_side", 0)
        self._ints[_MARK0] = self._ints[_MARK0 + 1] = 0
        self._mark_number = _MARK0 + 1
        self._set("ready", 0)
        self._set("waiting_since", 0.0)
        self._set("stopping", 0)
        self._set("since", time.time())
        self._set("next_start", 0.0)
        self._set("succeeded_base", self.get("succeeded"))
        self._set("failed_base", self.get("failed"))
        self._set("settled_base", self.get("settled"))

    def set_pid(self, pid: int) -> None:
        self._set("pid", pid)

    def worker_ended(
        self, reason: str, recycle: str, next_start: float, bad_exits: int = 0
    ) -> None:
        """Record why the worker ended (`recycle` is one of RECYCLE_REASONS or ''), and the
        slot's `bad_exits` so far: crashes and failed starts in a row, 0 after a normal exit."""
        self._set("pid", 0)
        self._clear_entries()
        self._set("waiting_since", 0.0)
        self._set("ready", 0)
        self._set("next_start", next_start)
        self._set("ended_at", time.time())
        self._set("bad_exits", bad_exits)
        if recycle:
            self._add(f"recycled_{recycle}")
        self._write_text(_REASON_OFFSET, reason)

    def _write_text(self, offset: int, text: str) -> None:
        encoded = text.encode("utf-8", "replace")[: _REASON_BYTES - 1]
        self._map[offset : offset + _REASON_BYTES] = encoded.ljust(_REASON_BYTES, b"\0")

    def _read_text(self, offset: int) -> str:
        raw = self._map[offset : offset + _REASON_BYTES]
        return raw.rstrip(b"\0").decode("utf-8", "replace")

    def _clear_entries(self) -> None:
        """Nothing counts as busy any more."""
        for entry in range(min(int(self.get("entries_used")), CAPACITY)):
            self._floats[_ENTRY0 + entry] = 0.0

    def _starts(self) -> list[float]:
        """When each running entry a worker has used started; 0 for a free one."""
        used = min(int(self.get("entries_used")), CAPACITY)
        return [self._floats[_ENTRY0 + i] for i in range(used)]

    def hand_on(self, unstarted: bytes | None, spared: tuple[bytes, ...]) -> None:
        """Once its worker has ended without replaying (it died in setup, or in its replay):
        the mark the slot hands its next worker, and the ids it spares (`Slot.spared`), so
        that the keeper, should it reclaim the slot's list meanwhile (a restart backoff
        past the lease), charges what the next worker would: not every delivery again."""
        if unstarted is not None:
            self.mark_unstarted(unstarted)
            self._set("replayed", 1)
        self._write_sized(_SPARED_OFFSET, "spared", b",".join(spared)[:_SPARED_BYTES])

    @property
    def spared(self) -> tuple[bytes, ...]:
        """What `hand_on` wrote of the slot's spared ids (none while a worker runs)."""
        joined = self._read_sized(_SPARED_OFFSET, "spared")
        return tuple(joined.split(b",")) if joined else ()

    def _write_sized(self, offset: int, length: str, data: bytes) -> None:
        """`data` at `offset`, then its size in the field `length`: a process killed in
        between leaves the size before, never a size that runs past what was written."""
        self._map[offset : offset + len(data)] = data
        self._set(length, len(data))

    def _read_sized(self, offset: int, length: str) -> bytes:
        return bytes(self._map[offset : offset + int(self.get(length))])

    def stop_requested(self) -> None:
        self._set("stopping", 1)

    # -- read by anyone ---------------------------------------------------------------------

    def busy_for(self) -> float:
        """Seconds the oldest running message has been running; 0 when idle."""
        running_since = [since for since in self._starts() if since]
        return time.monotonic() - min(running_since) if running_since else 0.0

    def in_flight(self) -> int:
        """Messages in the handler now."""
        return sum(1 for since in self._starts() if since)

    @property
    def pid(self) -> int:
        return int(self.get("pid"))

    @property
    def first_unstarted(self) -> bytes | None:
        """The mark (see `mark_unstarted`) the live or last worker left; None if it never
        got as far as replaying its list, so what its predecessor left was never taken over.
        """
        if not self.get("replayed"):
            return None
        word = _MARK0 + self._ints[_MARK_SIDE] * _MARK_WORDS
        start, number = (word + 2) * 8, self._ints[word + 1]
        head = bytes(self._map[start : start + self._ints[word]])
        return b"%s%d" % (head, number) if number else head

    @property
    def replay_interrupted(self) -> bytes | None:
        """The process id of a worker that began its replay and died before it said
        `replayed` (None if it did not begin, or finished): whatever its replay charged
        carries that id, and must not be charged again."""
        if self.get("replayed") or not self.get("replay_begun"):
            return None
        return self._read_sized(_REPLAY_BEGUN_OFFSET, "replay_begun")

    @property
    def made_progress(self) -> bool:
        """Whether the live (or last) worker of the slot settled any delivery."""
        return self.get("settled") > self.get("settled_base")

    @property
    def succeeded(self) -> int:
        """Messages of the live (or last) worker of the slot whose handler returned."""
        return int(self.get("succeeded") - self.get("succeeded_base"))

    @property
    def failed(self) -> int:
        """Messages of the live (or last) worker whose handler raised or timed out."""
        return int(self.get("failed") - self.get("failed_base"))

    @property
    def last_exit(self) -> str:
        return self._read_text(_REASON_OFFSET)

    @property
    def waiting_reason(self) -> str | None:
        """The Redis error the live worker is waiting out, or None."""
        return self._read_text(_WAITING_OFFSET) if self.get("waiting_since") else None

    def state(self) -> str:
        """`backoff`, `starting` (no worker yet, or in its handler's setup()), `stopping`,
        `waiting` (out a Redis error), `busy` or `idle`."""
        if not self.pid:
            return "backoff" if self.get("next_start") > time.time() else "starting"
        if self.get("stopping"):
            return "stopping"
        if not self.get("ready"):
            return "starting"
        if self.get("waiting_since"):
            return "waiting"
        return "busy" if self.in_flight() else "idle"

    def totals(self) -> dict[str, float]:
        """Cumulative counters for metrics."""
        names = (*_WORKER_COUNTERS, "duration_sum")
        result = {name: self.get(name) for name in names}
        result.update({f"recycled_{r}": self.get(f"recycled_{r}") for r in RECYCLE_REASONS})
        return result

    def buckets(self) -> list[int]:
        """Handler durations per histogram bucket (not cumulative), the last one +Inf."""
        return [int(self.get(f"bucket{i}")) for i in range(len(DURATION_BUCKETS) + 1)]
