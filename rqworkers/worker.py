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

import logging
import os
import random
import signal
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from rqworkers.backoff import ExponentialBackoff, Outage, describe
from rqworkers.config import PairSettings
from rqworkers.connections import connect
from rqworkers.errors import ExitCode, MessageTimeout
from rqworkers.handlers import Handler
from rqworkers.queue import TRANSIENT_ERRORS, ReliableQueue
from rqworkers.scoreboard import Scoreboard

log = logging.getLogger(__name__)

BLOCK_TIMEOUT = 1.0  # seconds a fetch blocks: how often an idle worker checks its parent
PROMOTE_INTERVAL = 1.0  # seconds between moves of due retries back to the shared list
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
    previous_started: int  # in-flight messages that had reached its handler when it ended
    lease_ttl: float
    log_handled: float = 0.0  # share of handled messages that get a log line
    log_failures: float = 1.0  # share of failed and dead-lettered messages that do


def main(spec: WorkerSpec, board: Scoreboard) -> int:
    """The worker process's entry point; returns its exit code."""
    stop = _install_signals()
    try:
        handler = Handler(spec.pair.handler)
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


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop looks at it between messages."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.set = True


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise MessageTimeout()


def _install_signals() -> _StopFlag:
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the manager's business
    signal.signal(signal.SIGALRM, _raise_timeout)
    return stop


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise `MessageTimeout` in this (main) thread if the block runs past `seconds`."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
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
        stop: _StopFlag,
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
        self.replay_started = spec.previous_started
        self.batch: deque[tuple[bytes, int]] = deque()  # taken, not yet started; oldest first
        self.acks: list[bytes] = []  # handled; the ack travels with the next `take`
        self.acks_since = 0.0
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
            self.batch.extend(self.queue.replay(self.replay_started))
            self.replaying = False
            if self.batch:
                log.info("replaying %d message(s) left in flight", len(self.batch))
        if not self.batch and not self.fill_batch():
            if os.getppid() != self.spec.manager_pid:
                log.warning("manager %d is gone; exiting", self.spec.manager_pid)
                return ExitCode.ORPHANED
            return None
        message, count = self.batch.popleft()
        timed_out = self.deliver(message, count)
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
        self.batch.extend(self.flush_acks(self.pair.prefetch))
        if self.batch:
            return True
        message = self.queue.fetch(BLOCK_TIMEOUT)
        if message is None:
            return False
        self.batch.append((message, self.queue.count_delivery(message)))
        return True

    def flush_acks(self, limit: int = 0) -> list[tuple[bytes, int]]:
        taken = self.queue.take(self.acks, limit)
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
        """After a Redis error: forget the batch; the private list is the truth to replay."""
        self.batch.clear()
        self.replaying = self.needs_lease = True
        self.replay_started = self.board.started

    def finish(self) -> None:
        """On the way out: send pending acks, give unstarted messages back to the queue."""
        if not (self.acks or self.batch):
            return
        try:
            self.flush_acks()
            if self.batch:
                moved = self.queue.give_back([message for message, _ in self.batch])
                log.info("gave %d unstarted message(s) back to %s", moved, self.queue.keys.queue)
                self.batch.clear()
        except TRANSIENT_ERRORS as exc:
            # They stay in the private list: the next worker of this slot replays them.
            log.warning("could not settle in-flight messages on exit: %s", describe(exc))

    def deliver(self, message: bytes, count: int) -> bool:
        """Handle and settle one message whose delivery `count` is recorded; True on timeout."""
        if count > self.pair.max_attempts:
            reason = self.spec.previous_exit or "earlier deliveries never finished (worker lost)"
            self.dead_letter(message, reason, count - 1)
            return False
        self.board.busy()
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            with _deadline(self.pair.timeout):
                result: Any = self.handler.handle(message)
        except (Exception, MessageTimeout) as exc:
            error = exc
        elapsed = time.perf_counter() - started
        self.board.idle(error is not None, elapsed)
        callback_timed_out = self.run_callback(message, result if error is None else None, error)
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
            with _deadline(self.pair.timeout):
                if error is None:
                    self.handler.on_success(message, result)
                else:
                    self.handler.on_failure(message, error)
        except MessageTimeout:
            log.error("handler callback ran past %ss; recycling", self.pair.timeout)
            return True
        return False

    def settle_failure(self, message: bytes, error: BaseException, attempts: int) -> None:
        if isinstance(error, MessageTimeout):
            reason = f"timeout after {self.pair.timeout:g}s"
        else:
            reason = f"{type(error).__name__}: {error}"[:_REASON_LIMIT]
        if attempts >= self.pair.max_attempts:
            self.dead_letter(message, reason, attempts)
        else:
            delay = self.retry_backoff.compute(attempts)
            if self.queue.retry_later(message, delay):
                self.board.count("retried")
            else:
                log.warning("a failed message was moved by someone else; not retried here")
            if _sampled(self.spec.log_failures):
                log.warning(
                    "delivery %d/%d failed (%s); retrying in %.1fs",
                    attempts,
                    self.pair.max_attempts,
                    reason,
                    delay,
                    extra={"event": "failed"},
                )
        self.board.settled(1)

    def dead_letter(self, message: bytes, reason: str, attempts: int) -> None:
        if not self.queue.dead_letter(message, reason, attempts):
            log.warning("a message to dead-letter was moved by someone else; left alone")
            return
        self.board.count("dead_lettered")
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
