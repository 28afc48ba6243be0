"""The worker side of tasks: a handler that runs allow-listed functions named by messages.

To the worker a `TaskHandler` is a `Handler` like any other, so every guarantee of the raw
path (replay, delivery counts, timeouts, memory limits, recycling, leases) holds unchanged:

- `handle` reads the message, refuses (`Refused`: dead-lettered at once) what can never
  run, a `reply_to` outside the queue's reply keys included, and calls the function under
  the message's own `timeout`. With `reply_to`, `run` returns its success reply with the
  result; the worker holds it with the delivery that ran (twins, identical payloads, each
  have their own) and has it pushed just before that delivery's ack (`write_replies`,
  many in one round trip). A reply Redis refuses (WRONGTYPE, NOPERM, OOM past a short
  retry) fails that delivery alone (`ReplyError`): it is retried or dead-lettered like any
  failure, and the queue goes on. A reply whose ack is lost is sent again with the
  replay: a reply is sent at least once.
- An exception is retried like any message; only the last one is final. The worker calls
  `on_dead_letter` after every dead-letter, whatever the cause, and that is where the
  failure reply goes and the message's `on_failure` runs: so a caller hears once, at the
  end, and never waits forever. A refused message runs nothing, `on_failure` included:
  the same checks decide it again there, so the verdict needs no state across threads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import AsyncScript, Script

from rqworkers.client import tasks
from rqworkers.client.tasks import AllowList, ReplyKeys, Task, TaskError
from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.config import PairSettings
from rqworkers.errors import HandlerError, MessageTimeout, Refused, ReplyError
from rqworkers.store import scripts
from rqworkers.store.connections import Client, connect
from rqworkers.store.outage import REDIS_ERRORS, explain, is_outage
from rqworkers.worker.alarm import ALARM
from rqworkers.worker.handlers import Handler, Reply, awaited

log = logging.getLogger(__name__)

_REPLY_ATTEMPTS = 6  # a failure reply retried over about 3 s of Redis errors, then given up
# A success reply refused for a cause that may pass (OOM, READONLY...) is tried this many
# times over about 0.75 s; then its delivery fails, and the queue goes on.
_SUCCESS_REPLY_ATTEMPTS = 5


def load(pair: PairSettings) -> Handler:
    """The handler of a pair: its `handler`, or a `TaskHandler` for a task pair."""
    if pair.tasks is not None:
        return TaskHandler(pair)
    if pair.handler is None:
        raise HandlerError(f"queue {pair.queue!r} has neither a handler nor tasks")
    return Handler(pair.handler)


class TaskHandler(Handler):
    """Runs the task messages of one task pair, in one worker process."""

    def __init__(self, pair: PairSettings) -> None:  # nothing to import by path: no super()
        assert pair.tasks is not None
        self.path = f"tasks {list(pair.tasks)!r}"
        self.allowed = AllowList(pair.tasks)
        self.reply_keys = ReplyKeys(pair.queue, pair.reply_keys)
        self.pair_timeout = pair.timeout
        self.queue = pair.queue
        self.url = pair.url
        self._client: Client | None = None
        self._instance = None
        # The value alone: the worker's loops call `run`, which returns the reply too.
        self.handle: Callable[[bytes], Any] = lambda message: self.run(message)[0]
        self.has_callbacks = True  # a message may name an `on_success`
        self._signatures: dict[Callable[..., Any], inspect.Signature] = {}
        self._last: tuple[bytes, Task] | None = None
        self._reply_script: AsyncScript | Script | None = None

    @property
    def client(self) -> Client:
        """Made on first use, in the worker process (never shared across a fork)."""
        if self._client is None:
            self._client = connect(self.url)
        return self._client

    def setup(self) -> None:
        """Import every allow-listed module now: a broken one stops the worker at start."""
        problems = self.allowed.problems()
        if problems:
            raise HandlerError("; ".join(problems))

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()

    def run(self, message: bytes) -> tuple[Any, Reply | None]:
        """Run the task in `message`: its return value and, with `reply_to`, its success
        reply (`handle` is the value alone); or whatever it raised.

        `Refused` for a message that can never run: unreadable, outside the allow-list, a
        function that does not exist, callbacks that are not allowed, arguments that do not
        fit the function's signature.
        """
        task, function = self._admit(message)
        self._last = (message, task)
        result = self._call(function, task)
        if task.reply_to is None:
            return result, None
        return result, (task.reply_to, task.result_ttl, tasks.success_reply(task.id, result))

    def _admit(self, message: bytes) -> tuple[Task, Callable[..., Any]]:
        """The task in `message` and its function, if it may run; `Refused` otherwise."""
        task = tasks.parse(message)
        refusal = None if task.reply_to is None else self.reply_keys.refusal(task.reply_to)
        if refusal:
            raise Refused(refusal)
        function = self.allowed.resolve(task.task)
        for callback in (task.on_success, task.on_failure):
            if callback is not None:
                self.allowed.resolve(callback)
        self._check_arguments(function, task)
        return task, function

    def _check_arguments(self, function: Callable[..., Any], task: Task) -> None:
        signature = self._signatures.get(function)
        if signature is None:
            try:
                signature = self._signatures[function] = inspect.signature(function)
            except (TypeError, ValueError):  # some builtins have none: let the call decide
                return
        try:
            signature.bind(*task.args, **task.kwargs)
        except TypeError as exc:
            raise Refused(f"task {task.task!r} cannot take these arguments: {exc}") from None

    def _call(self, function: Callable[..., Any], task: Task) -> Any:
        """`function(*args, **kwargs)`, within the message's `timeout` if that is shorter
        than what is left of the pair's (the worker's `ALARM` keeps both)."""
        if threading.current_thread() is not threading.main_thread() or task.timeout is None:
            # A pool thread (`concurrency` > 1): no signal can reach it; the worker's loop
            # keeps the deadline instead (see `own_timeout`).
            return self._invoke(function, task)
        try:
            return ALARM.call(task.timeout, self._invoke, function, task)
        except MessageTimeout:
            outer = ALARM.deadline  # the pair's, restored; passed too if it was the one
            if outer and time.monotonic() >= outer:
                raise
            raise MessageTimeout(task.timeout) from None  # the task's own ran out

    def _invoke(self, function: Callable[..., Any], task: Task) -> Any:
        """Call the task; an `async def` one runs on the handler's event loop, and is
        cancelled there if the wait for it is cut short (a timeout)."""
        result = function(*task.args, **task.kwargs)
        if not inspect.isawaitable(result):
            return result
        future = asyncio.run_coroutine_threadsafe(awaited(result), self.loop)
        try:
            return future.result()
        finally:
            future.cancel()  # a no-op once it is done

    def own_timeout(self, message: bytes) -> float | None:
        """The message's own `timeout`, which the concurrent loop applies to a thread."""
        try:
            return tasks.parse(message).timeout
        except Exception:  # refused when it runs; no deadline of its own meanwhile
            return None

    def on_success(self, message: bytes, result: Any) -> None:
        task = self._task(message)
        if task.on_success is not None:
            self._callback(task.on_success, result)

    def on_failure(self, message: bytes, error: BaseException) -> None:
        """Nothing: a failure that will be retried is not final (see `on_dead_letter`)."""

    def on_dead_letter(self, message: bytes, reason: str, error: BaseException | None) -> None:
        """Tell the caller (`reply_to`) and the message's `on_failure` that the task failed;
        a refused message's caller only: nothing of a refused message runs."""
        try:
            task: Task | None = self._task(message)
        except Refused:
            task = None
        address = tasks.reply_address(message)  # read even from a message that was refused
        timeout = min(task.timeout or self.pair_timeout, self.pair_timeout) if task else None
        failure = TaskError.from_dead_letter(address.id if address else "", reason, error, timeout)
        if address is not None and self.reply_keys.permits(address.key):
            self._send_patiently(address.key, address.ttl, tasks.failure_reply(failure))
        if task is not None and task.on_failure:
            self._callback(task.on_failure, failure)

    def _task(self, message: bytes) -> Task:
        """`message`'s task if `run` lets it run, else `Refused`: usually the one it just ran.
        A task is what its bytes say, so a twin's will do; `_last` is read once, as handler
        threads replace it meanwhile."""
        last = self._last
        if last is not None and last[0] == message:
            return last[1]
        return self._admit(message)[0]

    def _callback(self, path: str, argument: Any) -> None:
        """A message's `on_success` or `on_failure`: its exception is logged, never raised."""
        function = self.allowed.resolve(path)
        try:
            function(argument)
        except Exception:
            log.exception("task callback %s raised; ignored", path)

    def _send(self, key: str, ttl: float, reply: bytes) -> None:
        """Push `reply` onto `key`, which expires `ttl` seconds after the newest reply
        (`scripts.REPLY`)."""
        if self._reply_script is None:
            self._reply_script = self.client.register_script(scripts.REPLY.source)
        self._reply_script(keys=[key], args=_reply_args(reply, ttl))

    def write_replies(self, replies: list[Reply]) -> list[Exception | None]:
        """Push `replies`, of deliveries about to be acked, in one round trip. For each, in
        order: None once written, else a `ReplyError` naming the key and why Redis refused
        it: that delivery fails instead of being acked; the others go on.

        A reply reaches Redis before its delivery's ack, never after: a crash between the two
        repeats the task (at-least-once), and its caller keeps the first reply. A Redis that
        does not answer raises, as for any command: the replies go again with the acks (a
        second copy of one already written is harmless).
        """
        if not replies:
            return []
        backoff = ExponentialBackoff(base=0.05, cap=0.4)
        refused = self._push(list(enumerate(replies)))
        for attempt in range(1, _SUCCESS_REPLY_ATTEMPTS):
            passing = [(index, exc) for index, exc in refused if _may_pass(exc)]
            if not passing:
                break
            time.sleep(backoff.compute(attempt))  # OOM, say: Redis may free memory
            lasting = [(index, exc) for index, exc in refused if not _may_pass(exc)]
            refused = lasting + self._push([(index, replies[index]) for index, _ in passing])
        errors: list[Exception | None] = [None] * len(replies)
        for index, exc in refused:
            errors[index] = ReplyError(
                f"reply to {replies[index][0]!r} not written: {explain(exc)}"
            )
        return errors

    def _push(self, items: list[tuple[int, Reply]]) -> list[tuple[int, redis.ResponseError]]:
        """Push the reply of every (index, reply) of `items`; the indexes of those Redis
        refused, each with its error reply."""
        results: list[Any] = []
        if isinstance(self.client, RedisCluster):  # replies may sit in several slots
            for _, (key, ttl, reply) in items:
                try:
                    self._send(key, ttl, reply)
                    results.append(None)
                except redis.ResponseError as exc:
                    results.append(exc)
        else:
            pipe = self.client.pipeline(transaction=False)
            for _, (key, ttl, reply) in items:
                pipe.eval(scripts.REPLY.source, 1, key, *_reply_args(reply, ttl))
            results = pipe.execute(raise_on_error=False)
        return [
            (index, result)
            for (index, _), result in zip(items, results, strict=True)
            if isinstance(result, redis.ResponseError)
        ]

    def _send_patiently(self, key: str, ttl: float, reply: bytes) -> None:
        """`_send`, retried through a short Redis outage: the dead letter is already made,
        so this reply is the caller's only news of it."""
        backoff = ExponentialBackoff(base=0.1, cap=1.0)
        for attempt in range(1, _REPLY_ATTEMPTS + 1):
            try:
                self._send(key, ttl, reply)
                return
            except REDIS_ERRORS as exc:
                if attempt == _REPLY_ATTEMPTS or not _may_pass(exc):
                    log.error("failure reply to %r not written: %s", key, explain(exc))
                    return
                time.sleep(backoff.compute(attempt))


def _reply_args(reply: bytes, ttl: float) -> list[Any]:
    """ARGV of `scripts.REPLY`."""
    return scripts.REPLY.argv(reply=reply, ttl_ms=tasks.milliseconds(ttl))


def _may_pass(exc: Exception) -> bool:
    """Whether a reply Redis refused may go through if sent again soon: Redis is out of
    memory, read-only, loading... A refusal of the key itself (WRONGTYPE, NOPERM) stays."""
    return is_outage(exc) and not isinstance(exc, redis.exceptions.NoPermissionError)
