"""A `concurrent.futures.Executor` whose work runs on rqworkers task pairs, anywhere.

    from rqworkers import Executor

    with Executor("redis://127.0.0.1:6379/0", "tasks") as executor:   # was ProcessPoolExecutor()
        print(list(executor.map(myapp.jobs.square, range(10))))

Each `submit` pushes one task message whose `reply_to` is this executor's own reply list;
one background thread blocks on that list and resolves futures as replies arrive: no
polling, no connection per future. What the workers guarantee (at-least-once, replay
after a crash, timeouts, dead letters) holds for every future; a dead-letter sends a
reply too, so a future never waits forever for a task that ended. A duplicate run may
reply twice: the first reply wins.

The reply list and the task ids are random (128 bits each), so no one who has not read a
message can send a result to its future. A reply for an id this executor never sent (an
id carries a tag only it can make) is ignored, and logged once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from rqworkers.client import tasks
from rqworkers.client.producer import Delay, Producer, When, due_time
from rqworkers.client.tasks import TaskError
from rqworkers.errors import RqworkersError
from rqworkers.store.connections import connect, redact
from rqworkers.store.keys import Keys
from rqworkers.store.outage import REDIS_ERRORS, Outage, explain, is_outage

__all__ = ["Executor", "TaskError", "TaskFuture"]

log = logging.getLogger(__name__)

_BLOCK = 5.0  # seconds the reply reader blocks; shutdown wakes it at once anyway
_REPLIES_PER_READ = 100  # replies taken per round trip when they queue up
_PUSH_BATCH = 100  # task messages per LPUSH while `map` submits
_WAKE = b""  # pushed by `shutdown` onto the reply list so the reader stops blocking


class TaskFuture(concurrent.futures.Future[Any]):
    """A future of one task message. `cancel()` succeeds while the message still waits in
    the queue, and takes it out; once a worker has it, it cannot be cancelled."""

    def __init__(
        self, executor: Executor, task_id: str, payload: bytes, due: float | None = None
    ) -> None:
        super().__init__()
        self.task_id = task_id
        self._executor = executor
        self.payload = payload
        self.due = due  # epoch seconds, for `submit_later` and `submit_at`
        self.member = b""  # its envelope in the retry set, once a delayed one is sent

    def cancel(self) -> bool:
        if self.cancelled():
            return True
        if self.done() or not self._executor._withdraw(self):
            return False
        super().cancel()
        # What an executor does for a cancelled future it meets: without it, `wait` and
        # `as_completed` would never count the future as done.
        self.set_running_or_notify_cancel()
        return True


class Executor(concurrent.futures.Executor):
    """Runs `fn(*args, **kwargs)` as task messages on `queue` of the Redis at `url`.

    `timeout`: seconds each task may run (capped by the pair's `timeout`); `max_pending`:
    `submit` blocks while that many futures are unfinished; `result_ttl`: seconds a reply
    waits in Redis for an executor that is away. A number out of range (NaN, infinite, not
    above 0, not whole for `max_pending`) is a `ValueError` here, before anything starts.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        timeout: float | None = None,
        max_pending: int | None = None,
        result_ttl: float = tasks.DEFAULT_RESULT_TTL,
    ) -> None:
        if max_pending is not None and (
            isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1
        ):
            raise ValueError(f"max_pending must be a whole number at least 1, not {max_pending!r}")
        self.queue = queue
        self._timeout = None if timeout is None else tasks.seconds(timeout, "timeout")
        self._result_ttl = tasks.seconds(result_ttl, "result_ttl")
        self.reply_key = tasks.new_reply_key(queue)
        self._id_key = secrets.token_bytes(16)  # tags the ids this executor sends
        self._stray_logged = False  # a reply that is not one of its own was logged
        self._producer = Producer(url)
        self._reader_client = connect(url, _BLOCK)
        self._endpoint = redact(url)
        self._futures: dict[str, TaskFuture] = {}
        self._lock = threading.Lock()
        self._room = threading.Semaphore(max_pending) if max_pending else None
        self._shutdown = False
        self._closing = False  # no new futures will come: the reader ends when none pend
        self._broken: Exception | None = None  # why the reader stopped for good, if it did
        self._batch = threading.local()  # futures `map` has not pushed yet, per thread
        self._reader = threading.Thread(
            target=self._read_replies, name=f"rqworkers-replies-{queue}", daemon=True
        )
        self._reader.start()

    # Read-only: checked once, so that no later value can fail `submit`, or `shutdown`
    # (which sets the reply list's TTL) and hide the error that ended a `with` block.
    @property
    def timeout(self) -> float | None:
        return self._timeout

    @property
    def result_ttl(self) -> float:
        return self._result_ttl

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Send `fn(*args, **kwargs)`; `fn` is a module-level function or `"module:function"`.

        `ValueError` for a function a worker could not import by name, `TypeError` for
        arguments that are not JSON, `RuntimeError` after `shutdown`.
        """
        return self._submit(None, fn, args, kwargs)

    def submit_later(
        self, delay: Delay, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> TaskFuture:
        """`submit`, the task taken no sooner than `delay` seconds (or a `timedelta`) from
        now. `cancel()` succeeds until it is taken. `ValueError` for a delay that is not
        seconds from 0 to ten years."""
        return self._submit(due_time(delay, None), fn, args, kwargs)

    def submit_at(
        self, when: When, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> TaskFuture:
        """`submit`, the task taken no sooner than `when`: an aware `datetime` or epoch
        seconds (`ValueError` for a naive `datetime`); one in the past is due at once."""
        return self._submit(due_time(None, when), fn, args, kwargs)

    def _submit(
        self,
        due: float | None,
        fn: Callable[..., Any] | str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> TaskFuture:
        message = Producer.task(
            tasks.path_of(fn),
            args,
            kwargs,
            timeout=self.timeout,
            reply_to=self.reply_key,
            result_ttl=self.result_ttl,
            task_id=self._new_id(),
        )
        payload = tasks.encode(message)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._broken is not None:  # no reply could ever be read: fail now, not hang
            raise self._broken
        self._wait_for_room()
        future = TaskFuture(self, message.id, payload, due)
        with self._lock:
            self._futures[message.id] = future  # before the push: a reply may come at once
        future.add_done_callback(self._finished)
        self._push(future)
        return future

    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """As `concurrent.futures.Executor.map`; messages are pushed 100 per round trip."""
        self._batch.futures = []
        try:
            # The base class types `fn` as a callable; `submit` takes a name as well.
            return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)  # type: ignore[arg-type]
        finally:
            self._flush()
            del self._batch.futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As the standard library's: no new submits; with `cancel_futures`, tasks still
        waiting in the queue are taken out; with `wait`, return once every future is done."""
        with self._lock:
            self._shutdown = True
            pending = list(self._futures.values())
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)
        with self._lock:
            self._closing = True
        self._wake_reader()
        if wait:
            self._reader.join()

    # --- sending -----------------------------------------------------------------------

    def _new_id(self) -> str:
        """128 random bits, then a tag of them that only this executor can make."""
        nonce = secrets.token_hex(16)
        return nonce + self._tag(nonce)

    def _tag(self, nonce: str) -> str:
        return hashlib.blake2b(nonce.encode(), key=self._id_key, digest_size=8).hexdigest()

    def _issued(self, task_id: str) -> bool:
        nonce, tag = task_id[:32], task_id[32:]
        return len(task_id) == 48 and secrets.compare_digest(tag, self._tag(nonce))

    def _wait_for_room(self) -> None:
        if self._room is not None and not self._room.acquire(blocking=False):
            self._flush()  # unsent messages would never finish and free a slot
            self._room.acquire()

    def _push(self, future: TaskFuture) -> None:
        batch: list[TaskFuture] | None = getattr(self._batch, "futures", None)
        if future.due is not None:
            self._send_delayed(future)
            return
        if batch is None:
            self._send([future])
            return
        batch.append(future)
        if len(batch) >= _PUSH_BATCH:
            self._flush()

    def _flush(self) -> None:
        batch: list[TaskFuture] | None = getattr(self._batch, "futures", None)
        if batch:
            futures = batch[:]
            batch.clear()
            self._send(futures)

    def _send(self, futures: list[TaskFuture]) -> None:
        """One LPUSH of their messages. If it fails, so do they (with its error), and the
        error is raised: they may or may not have been sent, but no reply will be awaited."""
        try:
            self._producer.client.lpush(self.queue, *(f.payload for f in futures))
        except BaseException as exc:
            for future in futures:
                future.set_exception(exc)  # frees its slot; a late reply is ignored
            raise

    def _send_delayed(self, future: TaskFuture) -> None:
        """Its message into the retry set, due at `future.due`; on failure, as `_send`."""
        assert future.due is not None
        try:
            _, members = self._producer.delayed.push(self.queue, [future.payload], future.due)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        future.member = members[0]

    def _withdraw(self, future: TaskFuture) -> bool:
        """Take a message out of the queue (or the retry set, if delayed) if it is still
        waiting there."""
        client = self._producer.client
        try:
            if future.member:
                return bool(client.zrem(Keys(self.queue).retry, future.member))
            return bool(client.lrem(self.queue, 1, future.payload))  # type: ignore[arg-type]
        except REDIS_ERRORS as exc:
            log.warning("cannot cancel a task while redis at %s fails: %s", self._endpoint, exc)
            return False

    def _finished(self, future: concurrent.futures.Future[Any]) -> None:
        assert isinstance(future, TaskFuture)
        with self._lock:
            self._futures.pop(future.task_id, None)
            last = self._closing and not self._futures
        if self._room is not None:
            self._room.release()
        if last:
            self._wake_reader()

    # --- receiving ---------------------------------------------------------------------

    def _read_replies(self) -> None:
        """The reply thread: resolve futures until shut down and none is pending."""
        outage = Outage(f"redis at {self._endpoint} (replies of {self.queue})")
        client = self._reader_client
        while not self._done_reading():
            try:
                replies = cast(list[bytes] | None, client.rpop(self.reply_key, _REPLIES_PER_READ))
                if not replies:
                    popped = cast(Any, client.brpop([self.reply_key], timeout=_BLOCK))
                    replies = [popped[1]] if popped else []
            except REDIS_ERRORS as exc:
                if not is_outage(exc):
                    self._break(exc)
                    return
                outage.wait(exc, self._done_reading)
                continue
            outage.over()
            for reply in replies:
                self._resolve(reply)
        with contextlib.suppress(*REDIS_ERRORS):
            client.delete(self.reply_key)
        client.close()
        self._producer.close()

    def _break(self, exc: Exception) -> None:
        """Redis refuses to read the reply list, and always will (a WRONGTYPE: someone
        wrote another type there): fail every pending future, and every later `submit`,
        with that error rather than let them wait for replies that cannot be read."""
        error = RqworkersError(f"replies on {self.reply_key} cannot be read: {explain(exc)}")
        log.error("%s", error)
        with self._lock:
            self._broken = error
            pending = list(self._futures.values())
        for future in pending:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(error)
        self._reader_client.close()
        self._producer.close()

    def _done_reading(self) -> bool:
        with self._lock:
            return self._closing and not self._futures

    def _resolve(self, reply: bytes) -> None:
        if reply == _WAKE:
            return
        try:
            task_id, result, error = tasks.read_reply(reply)
        except ValueError:
            self._stray(f"a reply that is not a task reply: {reply[:80]!r}")
            return
        with self._lock:
            future = self._futures.get(task_id)
        if future is None:
            if not self._issued(task_id):
                self._stray(f"a reply for task id {task_id[:80]!r}, which it never sent")
            return  # else a duplicate run's second reply, or a cancelled task's
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _stray(self, what: str) -> None:
        """Log the first reply that is not one of this executor's: whoever can push to
        its list must not be able to flood the log too."""
        if not self._stray_logged:
            self._stray_logged = True
            log.warning(
                "ignored %s on %s (forged, or pushed there by mistake); more are ignored silently",
                what,
                self.reply_key,
            )

    def _wake_reader(self) -> None:
        """Unblock the reader's BRPOP at once. The list gets the replies' TTL, so a wake-up
        that comes after the reader deleted it does not leave a key behind for good."""
        if not self._reader.is_alive():
            return
        pipe = self._producer.client.pipeline(transaction=False)
        pipe.lpush(self.reply_key, _WAKE)
        pipe.pexpire(self.reply_key, tasks.milliseconds(self.result_ttl))
        with contextlib.suppress(*REDIS_ERRORS):
            pipe.execute()
