"""Sending work: raw payloads and task messages, to any Redis the config can name.

    from rqworkers import Producer

    producer = Producer("redis://127.0.0.1:6379/0")
    producer.push("queue1", b"hello", "world")
    replies = producer.reply_key("tasks")   # tasks:replies:<128 random bits>
    task_id = producer.submit("tasks", "myapp.jobs:add", (1, 2), reply_to=replies)
    print(producer.wait_reply(replies, timeout=30))

A message is pushed with `LPUSH`, as workers take from the right: first in, first out.
With `delay` (seconds, or a `timedelta`) or `at` (an aware `datetime`, or epoch seconds) it
goes to the queue's retry set instead, and is taken once due (see `store.delayed`). With
`dedup_key`, it is dropped while a message pushed with that key waits, is scheduled or
runs (see `store.dedup`):

    producer.push("queue1", b"later", delay=30)
    producer.push("queue1", b"rebuild", dedup_key="rebuild:42")   # 1 if enqueued, else 0
    producer.submit("tasks", "myapp.jobs:remind", ["bob"], at=datetime(2026, 12, 24, tzinfo=UTC))

With `priority` (0 to 9), higher levels are taken first, first in, first out within a level;
a plain push is level 0 (see `store.levels`):

    producer.push("queue1", b"urgent", priority=9)
"""

from __future__ import annotations

import datetime
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict, Unpack, cast

from rqworkers.client import tasks, tracecontext
from rqworkers.client.tasks import Task
from rqworkers.store import dedup as dedup_keys
from rqworkers.store import levels
from rqworkers.store.connections import Client, connect
from rqworkers.store.delayed import DelayedPusher

_BATCH = 1000  # payloads per LPUSH: big inputs go in bounded round trips
_BLOCK = 1.0  # seconds per BRPOP while waiting for a reply (the client's reply timeout is 11 s)
MAX_DELAY = 10 * 365 * 86400.0  # ten years: further is a mistake (milliseconds for seconds?)

Delay = float | datetime.timedelta
When = float | datetime.datetime
DedupMode = Literal["debounce"]


def due_time(delay: Delay | None, at: When | None, now: float | None = None) -> float | None:
    """When a message sent at `now` with `delay` or `at` is due, epoch seconds; None for
    neither (send it at once). `ValueError`, in one line, for both at once, a delay that is
    not a number of seconds from 0 to ten years (NaN, infinite, negative), or an `at` that
    is a naive `datetime` (whose zone would be a guess) or more than ten years ahead. An
    `at` in the past is due at once (one before 1970 as if at 1970)."""
    now = time.time() if now is None else now
    if delay is not None and at is not None:
        raise ValueError("give delay or at, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, datetime.timedelta) else delay
        if not _number(seconds) or not 0 <= seconds <= MAX_DELAY:
            raise ValueError(
                f"delay must be seconds from 0 to {MAX_DELAY:g} (ten years), not {delay!r}"
            )
        return now + seconds
    if at is None:
        return None
    if isinstance(at, datetime.datetime):
        if at.utcoffset() is None:
            raise ValueError(f"at: {at} is a naive datetime; give it a time zone (tzinfo=UTC)")
        at = at.timestamp()
    # Compared before any float(): an int too big for a float is refused, not an overflow.
    if not _number(at) or not -math.inf < at <= now + MAX_DELAY:
        raise ValueError(f"at must be a datetime or epoch seconds within ten years, not {at!r}")
    # Before 1970 is as past as any: 0, for a score below 0 is a priority band's (`levels`).
    return float(max(at, 0))


def _number(value: object) -> bool:
    if isinstance(value, float):
        return not math.isnan(value)
    return isinstance(value, int) and not isinstance(value, bool)  # any size: no float()


class TaskOptions(TypedDict, total=False):
    """What a task message may say beside its function and arguments (see `submit`)."""

    timeout: float | None
    reply_to: str | None
    result_ttl: float | None
    on_success: str | None
    on_failure: str | None
    task_id: str | None
    delay: Delay | None  # seconds (or a timedelta) before it may be taken
    at: When | None  # when it may be taken: an aware datetime, or epoch seconds
    dedup_key: str | None  # dropped while a message with this key is pending (see `push`)
    dedup_ttl: float | None  # the key blocks pushes this long instead (throttle)
    dedup: DedupMode | None  # "debounce": the newest replaces the pending delayed one
    priority: int  # 0 to 9: higher levels are taken first (see `push`)


class Producer:
    """Pushes onto queues of one Redis: `url` in any form a config host accepts (a single
    server, `redis+cluster://`, `redis+sentinel://`, TLS, `password_file`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Client = connect(url)
        self.delayed = DelayedPusher(self.client)

    def push(
        self,
        queue: str,
        *payloads: bytes | str | Task,
        delay: Delay | None = None,
        at: When | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | None = None,
        dedup: DedupMode | None = None,
        priority: int = 0,
    ) -> int:
        """Push raw payloads (str is sent as UTF-8) and task messages (`task`), in order;
        the queue's length after.

        With `delay` or `at` (see `due_time`), they wait in the queue's retry set until
        due, and the number of messages waiting there (retries too) is returned.

        With `dedup_key` (one payload only), the push is dropped while a message pushed with
        that key waits, is scheduled or runs (until it is acked or dead-lettered; a day
        after it is due at most); 1 if it was enqueued, 0 if dropped. With `dedup_ttl`
        (seconds), the key blocks pushes that long from this push instead, whatever
        becomes of the message (throttle). With `dedup="debounce"` (delayed messages),
        no push is dropped: the newest replaces the one pending, due anew.

        With `priority` from 1 to 9 (0, the default, is a plain push), the messages wait in
        the queue's retry set at that level: higher levels are taken first, and the same
        level first in, first out; the number of messages in the retry set is returned.
        A retry keeps its level. With `delay` or `at` too, they are due then, at that level.
        """
        if dedup_key is None and dedup_ttl is None and dedup is None:
            return self.push_many(queue, payloads, delay=delay, at=at, priority=priority)
        level = levels.check(priority)
        if len(payloads) != 1:
            raise ValueError("a push with dedup_key sends exactly one payload")
        payload, due = _encoded(payloads[0]), due_time(delay, at)
        return int(self._push_once(queue, payload, due, dedup_key, dedup_ttl, dedup, level))

    def _push_once(
        self,
        queue: str,
        payload: bytes,
        due: float | None,
        key: str | None,
        ttl: float | None,
        mode: DedupMode | None,
        level: int = 0,
    ) -> bool:
        """`push` with a deduplication key: whether it was enqueued."""
        key = dedup_keys.check_key(key)
        if mode not in (None, "debounce"):
            raise ValueError(f"dedup must be 'debounce' or left out, not {mode!r}")
        if mode == "debounce" and (due is None or ttl is not None):
            raise ValueError(
                "dedup='debounce' is for delayed messages (delay or at), without dedup_ttl"
            )
        if ttl is not None:
            hold = tasks.seconds(ttl, "dedup_ttl")
            return dedup_keys.push_once(
                self.client, queue, key, payload, "throttle", hold, due, level
            )
        wait = 0.0 if due is None else max(0.0, due - time.time())
        hold = dedup_keys.HOLD + wait
        return dedup_keys.push_once(
            self.client, queue, key, payload, mode or "hold", hold, due, level
        )

    def push_many(
        self,
        queue: str,
        payloads: Iterable[bytes | str | Task],
        delay: Delay | None = None,
        at: When | None = None,
        priority: int = 0,
    ) -> int:
        """`push` for an iterable of any size, sent in batches of 1,000 per round trip. A
        task message that cannot be encoded raises when its turn comes, once the batches
        before it are sent."""
        level = levels.check(priority)
        due = due_time(delay, at)
        if due is not None or level:
            return self.delayed.push(queue, [_encoded(p) for p in payloads], due, level)[0]
        length = 0
        batch: list[bytes] = []
        for payload in payloads:
            batch.append(_encoded(payload))
            if len(batch) == _BATCH:
                length = self.client.lpush(queue, *batch)
                batch = []
        if batch:
            length = self.client.lpush(queue, *batch)
        return length

    def submit(
        self,
        queue: str,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Unpack[TaskOptions],
    ) -> str:
        """Send a task message naming `task` (`"module:function"`); its id.

        `timeout` (seconds) is the task's own, capped by the pair's; with `reply_to`, the
        outcome is pushed onto that list and kept `result_ttl` seconds (default 3600). A
        worker refuses a `reply_to` outside `<queue>:replies:` (see `reply_key`) and the
        pair's `reply_keys`.
        `on_success(result)` and `on_failure(error)` run in the worker; they must be on
        the queue's allow-list too. `TypeError` if the arguments are not JSON.
        With `delay` or `at`, the task is taken once due (see `due_time`). With
        `dedup_key` (and `dedup_ttl`, `dedup`) as for `push`: "" if it was dropped. With
        `priority` (0 to 9) as for `push`.
        """
        due = due_time(options.get("delay"), options.get("at"))
        level = levels.check(options.get("priority", 0))
        message = self.task(task, args, kwargs, **options)
        if {"dedup_key", "dedup_ttl", "dedup"} & options.keys():
            key, ttl, mode = (
                options.get("dedup_key"),
                options.get("dedup_ttl"),
                options.get("dedup"),
            )
            sent = self._push_once(queue, tasks.encode(message), due, key, ttl, mode, level)
            return message.id if sent else ""
        if due is None and not level:
            self.client.lpush(queue, tasks.encode(message))
        else:
            self.delayed.push(queue, [tasks.encode(message)], due, level)
        return message.id

    @staticmethod
    def task(
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Unpack[TaskOptions],
    ) -> Task:
        """The `Task` that `submit` would send, with a fresh id unless given one, and the
        context of the caller's active OpenTelemetry span, if there is one."""
        result_ttl = options.get("result_ttl")
        return Task(
            task=task,
            args=list(args),
            kwargs=dict(kwargs or {}),
            id=options.get("task_id") or secrets.token_hex(16),
            timeout=options.get("timeout"),
            reply_to=options.get("reply_to"),
            result_ttl=tasks.DEFAULT_RESULT_TTL if result_ttl is None else result_ttl,
            on_success=options.get("on_success"),
            on_failure=options.get("on_failure"),
            trace=tracecontext.current(),
        )

    @staticmethod
    def reply_key(queue: str) -> str:
        """A fresh reply list for tasks sent to `queue`: `<queue>:replies:<128 random bits>`,
        in the reply keys every worker of the queue accepts, and that no one can guess."""
        return tasks.new_reply_key(queue)

    def wait_reply(self, reply_to: str, timeout: float | None = None) -> Any:
        """The result in the first reply on `reply_to`, taken off the list; `TaskError` if
        the task failed, `TimeoutError` if no reply came within `timeout` seconds (`None`:
        wait forever; NaN, infinite or not above 0: `ValueError`, at once)."""
        if timeout is not None:
            timeout = tasks.seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _BLOCK if deadline is None else min(_BLOCK, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"no reply on {reply_to!r} within {timeout:g}s")
            # BRPOP takes whole seconds on old servers; at least 10 ms so 0 never means forever.
            popped = cast(Any, self.client.brpop([reply_to], timeout=max(left, 0.01)))
            if popped:
                _, result, error = tasks.read_reply(popped[1])
                if error is not None:
                    raise error
                return result

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encoded(payload: bytes | str | Task) -> bytes:
    """What goes onto the list: a task message encoded, a str as UTF-8, bytes as they are."""
    if isinstance(payload, Task):
        return tasks.encode(payload)
    return payload.encode() if isinstance(payload, str) else payload
