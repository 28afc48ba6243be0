"""Sending work: raw payloads and task messages, to any Redis the config can name.

    from rqworkers import Producer

    producer = Producer("redis://127.0.0.1:6379/0")
    producer.push("queue1", b"hello", "world")
    replies = producer.reply_key("tasks")   # tasks:replies:<128 random bits>
    task_id = producer.submit("tasks", "myapp.jobs:add", (1, 2), reply_to=replies)
    print(producer.wait_reply(replies, timeout=30))

A message is pushed with `LPUSH`, as workers take from the right: first in, first out.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, Unpack, cast

from rqworkers.client import tasks, tracecontext
from rqworkers.client.tasks import Task
from rqworkers.store.connections import Client, connect

_BATCH = 1000  # payloads per LPUSH: big inputs go in bounded round trips
_BLOCK = 1.0  # seconds per BRPOP while waiting for a reply (the client's reply timeout is 11 s)


class TaskOptions(TypedDict, total=False):
    """What a task message may say beside its function and arguments (see `submit`)."""

    timeout: float | None
    reply_to: str | None
    result_ttl: float | None
    on_success: str | None
    on_failure: str | None
    task_id: str | None


class Producer:
    """Pushes onto queues of one Redis: `url` in any form a config host accepts (a single
    server, `redis+cluster://`, `redis+sentinel://`, TLS, `password_file`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Client = connect(url)

    def push(self, queue: str, *payloads: bytes | str | Task) -> int:
        """Push raw payloads (str is sent as UTF-8) and task messages (`task`), in order;
        the queue's length after."""
        return self.push_many(queue, payloads)

    def push_many(self, queue: str, payloads: Iterable[bytes | str | Task]) -> int:
        """`push` for an iterable of any size, sent in batches of 1,000 per round trip. A
        task message that cannot be encoded raises when its turn comes, once the batches
        before it are sent."""
        length = 0
        batch: list[bytes | str] = []
        for payload in payloads:
            batch.append(tasks.encode(payload) if isinstance(payload, Task) else payload)
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
        """
        message = self.task(task, args, kwargs, **options)
        self.client.lpush(queue, tasks.encode(message))
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
