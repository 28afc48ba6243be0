"""One worker process: replay leftovers, then fetch, count, handle, settle, until recycled.

The loop, for every message:
take the next of the batch, or ack what is done and take a new batch (counting each
delivery) in one round trip, blocking only when the queue is empty → handle under a timer →
queue the ack, or retry later or dead-letter → recycle if `max_requests` is reached or a
timeout hit. On the way out, pending acks are sent and unstarted messages given back.

A Redis error at any step sends the worker into backoff and, once Redis answers again,
back to replaying its private list: whatever reply was lost, the message is there.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from rqworkers import taskhandler
from rqworkers.backoff import ExponentialBackoff, Outage, describe
from rqworkers.config import PairSettings
from rqworkers.connections import connect
from rqworkers.errors import ExitCode, MessageTimeout, Refused
from rqworkers.handlers import Handler
from rqworkers.process import StopFlag
from rqworkers.queue import TRANSIENT_ERRORS, ReliableQueue
from rqworkers.scoreboard import Scoreboard

log = logging.getLogger(__name__)

BLOCK_TIMEOUT = 1.0  # seconds a fetch blocks: how often an idle worker checks its parent
PROMOTE_INTERVAL = 1.0  # seconds between moves of due retries back to the shared list
LOST_WORKER = "earlier deliveries never finished (worker lost)"
ACK_INTERVAL = 1.0  # seconds a handled message may wait for its ack to share a round trip
_REASON_LIMIT = 2000  # characters of an exception kept as a dead letter's reason


@dataclass(frozen=True)
class WorkerSpec:
    """What the manager tells a worker it forks."""

    pair: PairSettings
    name: str
    worker_id: str
    manager_pid: int
    previous_exit: str | None  # how this slot's last worker ended, if it ended badly
    previous_started: int | None  # in-flight messages that had reached its handler; None: unknown
    lease_ttl: float
    log_handled: float = 0.0  # share of handled messages that get a log line
    log_failures: float = 1.0  # share of failed and dead-lettered messages that do


def main(spec: WorkerSpec, board: Scoreboard) -> int:
    """The worker process's entry point; returns its exit code."""
    stop = _install_signals()
    try:
        handler = taskhandler.load(spec.pair)
        handler.setup()
    except Exception as exc:
        log.error("cannot start handler %s: %s", spec.pair.handler, exc)
        return ExitCode.STARTUP_FAILED
    queue = ReliableQueue(connect(spec.pair.url, BLOCK_TIMEOUT), spec.pair.queue, spec.worker_id)
    try:
        return Worker(spec, handler, queue, board, stop).run()
    finally:
        handler.teardown()
        queue.client.close()


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise MessageTimeout()


def _install_signals() -> StopFlag:
    """SIGTERM/SIGINT set the flag; the loop looks at it between messages."""
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the manager's business
    signal.signal(signal.SIGALRM, _raise_timeout)
    return stop


def _call_within(seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, interrupted by `MessageTimeout` in this (main) thread after `seconds`.

    A plain function rather than a context manager: it runs for every message, and a
    generator-based `with` costs twice as much.
    """
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class Worker:
    """The loop of one worker process. Its state is what is in flight, nothing more."""

    def __init__(
        self,
        spec: WorkerSpec,
        handler: Handler,
        queue: ReliableQueue,
        board: Scoreboard,
        stop: StopFlag,
    ) -> None:
        self.spec = spec
        self.pair = spec.pair
        self.handler = handler
        self.queue = queue
        self.board = board
        self.stop = stop
        jitter = random.randint(0, self.pair.max_requests_jitter)
        self.max_requests = self.pair.max_requests + jitter if self.pair.max_requests else 0
        self.handled = 0
        self.needs_lease = True  # taken before any replay, so no reclaimer races us
        # Replay what the private list holds before taking anything new; of it, the oldest
        # `replay_started` messages had reached a handler (see `scripts.REPLAY`).
        self.replaying = True
        self.replay_started: int | None = spec.previous_started
        # Taken, not yet started, oldest first: (message, deliveries, why it would be dead).
        self.batch: deque[tuple[bytes, int, str]] = deque()
        self.acks: list[bytes] = []  # handled; the ack travels with the next `take`
        self.acks_since = 0.0
        # A failed message's retry or dead-letter, until Redis has confirmed it.
        self.failure: Callable[[str], None] | None = None
        # The id of the settling operation whose reply a Redis error swallowed, if any.
        self.failure_started = True
        self.unsure: str | None = None
        self.op_prefix = os.urandom(4).hex()
        self.op_count = 0
        self.next_promote = 0.0
        self.retry_backoff = ExponentialBackoff(self.pair.retry_delay, self.pair.retry_delay_max)
        self.outage = Outage(f"redis at {self.pair.endpoint}")

    def run(self) -> int:
        code: int = ExitCode.OK
        while not self.stop.set:
            try:
                result = self.step()
            except TRANSIENT_ERRORS as exc:
                self.board.count("redis_errors")
                self.lose_track()
                self.outage.wait(exc, lambda: self.stop.set)
                continue
            self.outage.over()
            if result is not None:
                code = result
                break
        self.finish()
        return code

    def step(self) -> int | None:
        """Handle at most one message. An exit code means: stop and recycle."""
        if self.needs_lease:
            self.queue.take_lease(self.spec.lease_ttl)
            self.needs_lease = False
        if self.replaying:
            self.settle_unsure()
            reason = self.spec.previous_exit or LOST_WORKER
            replayed = self.queue.replay(self.replay_started)
            self.batch.extend((message, count, reason) for message, count in replayed)
            self.replaying = False
            self.board.replayed()
            if self.batch:
                log.info("replaying %d message(s) left in flight", len(self.batch))
        if not self.batch and not self.fill_batch():
            if os.getppid() != self.spec.manager_pid:
                log.warning("manager %d is gone; exiting", self.spec.manager_pid)
                return ExitCode.ORPHANED
            return None
        message, count, reason = self.batch.popleft()
        timed_out = self.deliver(message, count, reason)
        self.handled += 1
        if self.acks and time.monotonic() - self.acks_since > ACK_INTERVAL:
            self.flush_acks()  # a slow batch must not hold finished work unacked for long
        if timed_out:
            return ExitCode.TIMEOUT
        if self.max_requests and self.handled >= self.max_requests:
            log.info("handled %d messages; recycling", self.handled)
            return ExitCode.MAX_REQUESTS
        return None

    def fill_batch(self) -> bool:
        """Ack what is done and take up to `prefetch` messages; block only if there are none."""
        now = time.monotonic()
        if now >= self.next_promote:
            self.queue.promote_due()
            self.next_promote = now + PROMOTE_INTERVAL
        limit = self.pair.prefetch
        if self.max_requests:  # do not take what this worker will not live to start
            limit = max(1, min(limit, self.max_requests - self.handled))
        self.batch.extend((m, count, LOST_WORKER) for m, count in self.flush_acks(limit))
        if self.batch:
            return True
        message = self.queue.fetch(BLOCK_TIMEOUT)
        if message is None:
            return False
        count = self.queue.count_fetched(message)
        if count is None:
            log.warning("a fetched message was reclaimed before it started; left to its new owner")
            return False
        self.batch.append((message, count, LOST_WORKER))
        return True

    def next_op(self) -> str:
        """A new id for a settling operation, recorded as unsure until Redis confirms it."""
        self.op_count += 1
        self.unsure = f"{self.op_prefix}-{self.op_count}"
        return self.unsure

    def flush_acks(self, limit: int = 0) -> list[tuple[bytes, int]]:
        taken = self.queue.take(self.acks, limit, self.next_op())
        self.unsure = None
        self.board.settled(len(self.acks))
        if taken.missing_acks:
            log.warning(
                "%d ack(s) removed nothing from %s: moved by someone else, they may run twice",
                taken.missing_acks,
                self.queue.keys.processing,
            )
        self.acks = []
        return taken.messages

    def lose_track(self) -> None:
        """After a Redis error: forget the batch; the private list is the truth to replay.

        Pending acks and an unconfirmed failure are kept: `settle_unsure` finishes them first,
        so that nothing settled is handled again, and the replay then finds only messages that
        never reached the handler (their counts stand).
        """
        self.batch.clear()
        self.replaying = self.needs_lease = True
        self.replay_started = 0

    def settle_unsure(self) -> None:
        """Learn whether the operation whose reply was lost happened, then finish the rest.

        Acks are matched by value, so sending them twice could remove another message with
        the same bytes: the recorded operation id tells whether they already went through.
        """
        if self.unsure is not None:
            happened = self.queue.last_op() == self.unsure
            self.unsure = None
            if happened and self.failure is not None:
                self.failure = None
                if self.failure_started:
                    self.board.settled(1)
            elif happened:
                self.board.settled(len(self.acks))
                self.acks = []
        if self.failure is not None:
            self.settle_failure_now(self.failure_started)
        if self.acks:
            self.flush_acks()

    def finish(self) -> None:
        """On the way out: send pending acks, give unstarted messages back to the queue."""
        if not (self.acks or self.batch or self.failure or self.unsure):
            return
        try:
            self.settle_unsure()
            if self.batch:
                moved = self.queue.give_back([message for message, _, _ in self.batch])
                log.info("gave %d unstarted message(s) back to %s", moved, self.queue.keys.queue)
                self.batch.clear()
        except TRANSIENT_ERRORS as exc:
            # They stay in the private list: the next worker of this slot replays them.
            log.warning("could not settle in-flight messages on exit: %s", describe(exc))

    def deliver(self, message: bytes, count: int, lost_reason: str) -> bool:
        """Handle and settle one message whose delivery `count` is recorded; True on timeout.

        A message that already used up its deliveries without a result (its workers died)
        goes to the dead list with `lost_reason`, unhandled.
        """
        if count > self.pair.max_attempts:
            self.failure = functools.partial(
                self.dead_letter, message, lost_reason, count - 1, None
            )
            self.settle_failure_now(started=False)
            return False
        self.board.busy()
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            result: Any = _call_within(self.pair.timeout, self.handler.handle, message)
        except (Exception, MessageTimeout) as exc:
            error = exc
        elapsed = time.perf_counter() - started
        callback_timed_out = self.run_callback(message, result if error is None else None, error)
        self.board.idle(error is not None, elapsed)  # after the callbacks: they count as busy
        if error is None:
            if not self.acks:
                self.acks_since = time.monotonic()
            self.acks.append(message)
            if self.spec.log_handled and _sampled(self.spec.log_handled):
                log.info(
                    "handled %d bytes in %.3fs", len(message), elapsed, extra={"event": "handled"}
                )
        else:
            self.settle_failure(message, error, count)
        return isinstance(error, MessageTimeout) or callback_timed_out

    def run_callback(self, message: bytes, result: Any, error: BaseException | None) -> bool:
        """on_success/on_failure under the same time limit; True if it ran out of time."""
        if not self.handler.has_callbacks:
            return False
        try:
            if error is None:
                _call_within(self.pair.timeout, self.handler.on_success, message, result)
            else:
                _call_within(self.pair.timeout, self.handler.on_failure, message, error)
        except MessageTimeout:
            log.error("handler callback ran past %ss; recycling", self.pair.timeout)
            return True
        return False

    def settle_failure(self, message: bytes, error: BaseException, attempts: int) -> None:
        if isinstance(error, MessageTimeout):
            reason = f"timeout after {self.pair.timeout:g}s"
        elif isinstance(error, Refused):
            reason = str(error)[:_REASON_LIMIT]
        else:
            reason = f"{type(error).__name__}: {error}"[:_REASON_LIMIT]
        if isinstance(error, Refused) or attempts >= self.pair.max_attempts:
            self.failure = functools.partial(self.dead_letter, message, reason, attempts, error)
        else:
            self.failure = functools.partial(self.retry_later, message, reason, attempts)
        self.settle_failure_now()

    def settle_failure_now(self, started: bool = True) -> None:
        """Run `self.failure`; kept until Redis confirms it, so an outage cannot drop it.

        `started`: the message had reached the handler (the scoreboard counts those).
        """
        assert self.failure is not None
        self.failure_started = started
        self.failure(self.next_op())
        self.unsure = self.failure = None
        if started:
            self.board.settled(1)

    def retry_later(self, message: bytes, reason: str, attempts: int, op: str) -> None:
        delay = self.retry_backoff.compute(attempts)
        if not self.queue.retry_later(message, delay, op):
            log.warning("a failed message was moved by someone else; not retried here")
            return
        self.board.count("retried")
        if _sampled(self.spec.log_failures):
            log.warning(
                "delivery %d/%d failed (%s); retrying in %.1fs",
                attempts,
                self.pair.max_attempts,
                reason,
                delay,
                extra={"event": "failed"},
            )

    def dead_letter(
        self, message: bytes, reason: str, attempts: int, error: BaseException | None, op: str
    ) -> None:
        if not self.queue.dead_letter(message, reason, attempts, op):
            log.warning("a message to dead-letter was moved by someone else; left alone")
            return
        self.board.count("dead_lettered")
        try:
            self.handler.on_dead_letter(message, reason, error)
        except Exception:
            log.exception("handler %s.on_dead_letter() raised; ignored", self.handler.path)
        if _sampled(self.spec.log_failures):
            log.error(
                "dead-lettered a %d-byte message to %s after %d deliveries: %s",
                len(message),
                self.queue.keys.dead,
                attempts,
                reason,
                extra={"event": "dead_lettered"},
            )


def _sampled(share: float) -> bool:
    return share >= 1.0 or random.random() < share
