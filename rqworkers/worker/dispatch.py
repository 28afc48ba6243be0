"""Many messages at once in one worker process, for handlers that wait (HTTP, SMTP, a DB).

With `concurrency = N` a worker keeps up to N deliveries in its handler: coroutines on the
handler's event loop for an `async def` handler, else a pool of N threads. This module's
loop runs in the worker's main thread and owns every Redis call; handlers never touch the
queue. Deliveries settle in any order as each finishes: every envelope is unique, so an ack
or a retry names exactly its own delivery wherever it sits in the private list.

Timeouts: a coroutine is cancelled at its `timeout` and fails like any error; the worker
keeps going. A thread cannot be interrupted: past its `timeout` its delivery is settled as
a timeout failure, the worker takes nothing new, lets the others finish and recycles; if the
thread is still stuck `timeout_grace` later, the manager kills the process, as it does when
a coroutine blocks the loop (the scoreboard shows the oldest running message's age).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rqworkers.errors import ExitCode, MessageTimeout
from rqworkers.store.queue import Delivery
from rqworkers.worker.handlers import Handler, Reply
from rqworkers.worker.loop import WAKE_TIMEOUT, Worker

if TYPE_CHECKING:  # loaded only when tracing is on (`worker.main`)
    from rqworkers.worker.tracing import Traced

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks for new messages while others are in flight


@dataclass(frozen=True)
class Outcome:
    error: BaseException | None
    seconds: float  # time in the handler, callbacks not included
    reply: Reply | None = None  # what this run must write before its delivery's ack


@dataclass(frozen=True)
class Running:
    delivery: Delivery
    entry: int  # its scoreboard entry
    deadline: float  # monotonic seconds
    limit: float  # seconds it may run: the pair's `timeout`, or the message's own if shorter
    traced: Traced | None = None  # its span, when tracing is on


# A job runs a payload, made the current span's in the thread or coroutine that runs it.
Job = Callable[[bytes, "Traced | None"], "cf.Future[Outcome]"]


def thread_jobs(handler: Handler, threads: int) -> tuple[Job, Callable[[], None]]:
    """Submit deliveries to a pool of `threads`; and a function that lets the pool go."""
    pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="handler")

    def run(payload: bytes, traced: Traced | None) -> Outcome:
        token = None if traced is None else traced.attach()
        began = time.monotonic()
        error: BaseException | None = None
        result: Any = None
        reply: Reply | None = None
        try:
            result, reply = handler.run(payload)
        except Exception as exc:
            error = exc
        seconds = time.monotonic() - began
        if handler.has_callbacks:
            if error is None:
                handler.on_success(payload, result)
            else:
                handler.on_failure(payload, error)
        if traced is not None:
            traced.detach(token)
        return Outcome(error, seconds, reply)  # the reply goes with this run's delivery

    def submit(payload: bytes, traced: Traced | None) -> cf.Future[Outcome]:
        return pool.submit(run, payload, traced)

    return submit, lambda: pool.shutdown(wait=False)


def coroutine_jobs(handler: Handler, timeout: float) -> tuple[Job, Callable[[], None]]:
    """Run deliveries as coroutines on the handler's loop, each cancelled at `timeout`."""

    async def callback(name: str, *args: Any) -> None:
        """A callback under the same `timeout` as `handle`: past it, it is cancelled and the
        delivery settles as `handle` decided (a cancelled coroutine leaves nothing stuck)."""
        method = handler.method(name)
        if method is None:
            return
        began = time.monotonic()
        try:
            result = method(*args)
            if asyncio.iscoroutine(result):
                await asyncio.wait_for(result, timeout)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and time.monotonic() - began >= timeout:
                log.error("handler %s.%s() ran past %gs; cancelled", handler.path, name, timeout)
            else:
                log.exception("handler %s.%s() raised; ignored", handler.path, name)

    async def run(payload: bytes, traced: Traced | None) -> Outcome:
        if traced is not None:
            traced.attach()  # in this coroutine's own context, which ends with it
        began = time.monotonic()
        error: BaseException | None = None
        result: Any = None
        try:
            # An async handler makes no reply to write (tasks run in the others: `run`).
            result = await asyncio.wait_for(handler.handle(payload), timeout)
        except TimeoutError as exc:
            # wait_for's own, or one the handler raised: only the first is a timeout
            late = time.monotonic() - began >= timeout
            error = MessageTimeout() if late else exc
        except Exception as exc:
            error = exc
        seconds = time.monotonic() - began
        if error is None:
            await callback("on_success", payload, result)
        else:
            await callback("on_failure", payload, error)
        return Outcome(error, seconds)

    loop = handler.loop

    def submit(payload: bytes, traced: Traced | None) -> cf.Future[Outcome]:
        return asyncio.run_coroutine_threadsafe(run(payload, traced), loop)

    return submit, lambda: None


class ConcurrentWorker(Worker):
    """`Worker`'s replay, taking and settling, with up to `concurrency` handlers at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue.acks_in_order = False  # settled out of order: one LREM per ack
        n = self.pair.concurrency
        if self.handler.is_async:
            self.submit, self.close_jobs = coroutine_jobs(self.handler, self.pair.timeout)
        else:
            self.submit, self.close_jobs = thread_jobs(self.handler, n)
        self.running: dict[cf.Future[Outcome], Running] = {}
        self.free_entries = list(range(n - 1, -1, -1))  # scoreboard entries, 0 first
        self.exit_code: int | None = None  # set once draining: take nothing new
        self.abandoned: list[int] = []  # entries of threads left running past their timeout
        self.next_look = 0.0  # monotonic time of the next non-blocking take

    def keep_going(self) -> bool:
        return not self.stop.set or bool(self.running)

    def step(self) -> int | None:
        if self.stop.set and self.exit_code is None:
            self.exit_code = ExitCode.OK
        if self.exit_code is not None and self.batch:
            self.give_back_batch()  # draining: what never started goes back at once
        self.resume()
        if self.batch and self.exit_code is None:
            self.paused_mid_batch()  # a pause: what has not started goes back
        self.start_what_fits()
        if not self.running:
            if self.exit_code is not None:
                return self.exit_code
            if not self.batch and not self.fill_batch():  # nothing in flight: may block
                return self.parent_gone()
            return None
        self.settle_finished()
        self.look_for_more()
        return None

    def can_run_lean(self) -> bool:
        return False  # its handlers run in threads or coroutines, never in `run_lean`

    def running_elements(self) -> set[bytes]:
        return {r.delivery.element for r in self.running.values()}

    def holding(self) -> list[Delivery]:
        return [r.delivery for r in self.running.values()] + super().holding()

    def holds_permit(self) -> bool:
        return bool(self.running) or bool(self.batch)

    def take_limit(self) -> int:
        """With a limit, only what starts now: as many as there are free handlers."""
        limit = max(1, self.settler.cap(self.pair.prefetch, len(self.running)))
        if self.queue.limits.any:
            return max(1, min(limit, len(self.free_entries) - len(self.batch)))
        return limit

    def start_what_fits(self) -> None:
        while self.batch and self.free_entries and self.exit_code is None:
            delivery, lost_reason = self.batch.popleft()
            if not self.admit(delivery, lost_reason):
                continue  # dead-lettered unhandled
            entry = self.free_entries.pop()
            now = time.monotonic()
            self.board.busy(now, entry)
            traced = None if self.tracing is None else self.tracing.start(delivery, False)
            future = self.submit(delivery.payload, traced)
            own = self.handler.own_timeout(delivery.payload)
            limit = self.pair.timeout if own is None else min(own, self.pair.timeout)
            self.running[future] = Running(delivery, entry, now + limit, limit, traced)

    def settle_finished(self) -> None:
        """Wait until one delivery finishes, a thread's deadline passes, or it is time to
        look for more messages; settle what finished."""
        now = time.monotonic()
        room = len(self.free_entries) > len(self.batch) and self.exit_code is None
        until = [self.next_look if room else now + 1.0]
        if not self.handler.is_async:  # coroutines are cancelled on their loop
            until += [r.deadline for r in self.running.values()]
        wait = max(0.0, min(until) - now)
        done, _ = cf.wait(self.running, timeout=wait, return_when=cf.FIRST_COMPLETED)
        for future in done:
            self.settle(future)
        now = time.monotonic()
        for future, running in list(self.running.items()):
            if now >= running.deadline and not self.handler.is_async:
                self.abandon(future, running)

    def settle(self, future: cf.Future[Outcome]) -> None:
        self.guard_permits()
        running = self.running.pop(future)
        outcome = future.result()
        settler, delivery, error = self.settler, running.delivery, outcome.error
        failure = settler.verdict(delivery, error)
        if running.traced is not None:
            running.traced.end(failure, error)
        self.board.idle(error is not None, outcome.seconds, running.entry)
        self.free_entries.append(running.entry)
        settler.settle(delivery, failure, time.monotonic(), outcome.seconds, outcome.reply)
        if self.queue.limits.any:  # its permit is free again: use it at once
            self.next_look = 0.0
        if self.exit_code is None:
            self.exit_code = settler.recycle()

    def abandon(self, future: cf.Future[Outcome], running: Running) -> None:
        """A thread ran past its timeout: settle its delivery as a timeout failure, take
        nothing new, and recycle once the others finish. Its scoreboard entry stays busy,
        so the manager kills the process if the thread outlives `timeout_grace` too."""
        del self.running[future]
        self.abandoned.append(running.entry)
        delivery = running.delivery
        timeout = MessageTimeout(running.limit)
        failure = self.settler.failure(delivery, timeout)
        if running.traced is not None:
            running.traced.end(failure, timeout)
        self.settler.settle(delivery, failure, time.monotonic(), running.limit)
        log.error("a handler thread ran past %gs; recycling once the others finish", running.limit)
        self.exit_code = ExitCode.TIMEOUT

    def look_for_more(self) -> None:
        """Take more without blocking when there is room, at most every POLL seconds."""
        room = len(self.free_entries) - len(self.batch)
        now = time.monotonic()
        if self.exit_code is not None or room <= 0 or now < self.next_look:
            return
        self.next_look = now + POLL
        limit = self.settler.cap(min(self.pair.prefetch, room), len(self.running))
        if limit > 0:
            taken = self.outbox.take(limit)
            self.took(taken)
            if taken.count == limit:  # the queue has more: look again at once
                self.next_look = now
            elif taken.held is not None:  # look again when it may pass, or one settles
                wait = taken.held.wait
                self.next_look = now + (WAKE_TIMEOUT / 2 if wait is None else wait)
        elif self.outbox.acks_overdue(now):
            self.outbox.flush()

    def finish(self) -> None:
        super().finish()
        self.close_jobs()
        for entry in self.abandoned:  # settled already: the exit is a recycle, not a crash
            self.board.release(entry)
