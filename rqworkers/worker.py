"""One worker process: replay leftovers, then fetch, count, handle, settle, until recycled.

The loop, for every message:
check the parent → take a leftover or fetch → count the delivery → handle under a timer
→ ack, retry later or dead-letter → recycle if `max_requests` is reached or a timeout hit.

A Redis error at any step sends the worker into backoff and, once Redis answers again,
back to replaying its private list: whatever reply was lost, the message is there.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from rqworkers.backoff import ExponentialBackoff, Outage
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode, MessageTimeout
from rqworkers.handlers import Handler
from rqworkers.queue import TRANSIENT_ERRORS, ReliableQueue, connect
from rqworkers.scoreboard import Scoreboard

log = logging.getLogger(__name__)

BLOCK_TIMEOUT = 1.0  # seconds a fetch blocks: how often an idle worker checks its parent
PROMOTE_INTERVAL = 1.0  # seconds between moves of due retries back to the shared list
_REASON_LIMIT = 2000  # characters of an exception kept as a dead letter's reason


@dataclass(frozen=True)
class WorkerSpec:
    """What the manager tells a worker it forks."""

    pair: PairSettings
    name: str
    worker_id: str
    manager_pid: int
    previous_exit: str | None  # how this slot's last worker ended, if it ended badly
    lease_owner: str
    lease_ttl: float
    log_messages: bool = False


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
        self.replaying = True  # the private list may hold an earlier life's messages
        self.needs_lease = True  # taken before any replay, so no reclaimer races us
        self.pending_ack: bytes | None = None  # handled, but Redis went away before the ack
        self.next_promote = 0.0
        self.retry_backoff = ExponentialBackoff(self.pair.retry_delay, self.pair.retry_delay_max)
        self.outage = Outage(f"redis at {self.pair.endpoint}")

    def run(self) -> int:
        while not self.stop.set:
            if os.getppid() != self.spec.manager_pid:
                log.warning("manager %d is gone; exiting", self.spec.manager_pid)
                return ExitCode.ORPHANED
            try:
                code = self.step()
            except TRANSIENT_ERRORS as exc:
                self.replaying = self.needs_lease = True
                self.outage.wait(exc, lambda: self.stop.set)
                continue
            self.outage.over()
            if code is not None:
                return code
        return ExitCode.OK

    def step(self) -> int | None:
        """Take and settle at most one message. An exit code means: recycle now."""
        if self.needs_lease:
            self.queue.take_lease(self.spec.lease_owner, self.spec.lease_ttl)
            self.needs_lease = False
        if self.pending_ack is not None:
            self.settle_ack(self.pending_ack)
            self.pending_ack = None
        now = time.monotonic()
        if now >= self.next_promote:
            self.queue.promote_due()
            self.next_promote = now + PROMOTE_INTERVAL
        message = self.next_message()
        if message is None:
            return None
        timed_out = self.deliver(message)
        self.handled += 1
        if timed_out:
            return ExitCode.TIMEOUT
        if self.max_requests and self.handled >= self.max_requests:
            log.info("handled %d messages; recycling", self.handled)
            return ExitCode.MAX_REQUESTS
        return None

    def next_message(self) -> bytes | None:
        if self.replaying:
            leftover = self.queue.leftover()
            if leftover is not None:
                log.info("replaying a message left in %s", self.queue.keys.processing)
                return leftover
            self.replaying = False
        return self.queue.fetch(BLOCK_TIMEOUT)

    def deliver(self, message: bytes) -> bool:
        """Count, handle and settle one message; True if it ran out of time."""
        attempts = self.queue.count_delivery(message)
        if attempts > self.pair.max_attempts:
            reason = self.spec.previous_exit or "worker died while handling it"
            self.dead_letter(message, reason, attempts - 1)
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
        self.board.idle(failed=error is not None)
        timed_out = isinstance(error, MessageTimeout)
        callback_timed_out = self.run_callback(message, result if error is None else None, error)
        if error is None:
            self.pending_ack = message
            self.settle_ack(message)
            self.pending_ack = None
            if self.spec.log_messages:
                log.info("handled %d bytes in %.3fs", len(message), elapsed)
        else:
            self.settle_failure(message, error, attempts)
        return timed_out or callback_timed_out

    def run_callback(self, message: bytes, result: Any, error: BaseException | None) -> bool:
        """on_success/on_failure under the same time limit; True if it ran out of time."""
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

    def settle_ack(self, message: bytes) -> None:
        if not self.queue.ack(message):
            log.warning(
                "ack removed nothing from %s: the message was moved by someone else and may "
                "run twice",
                self.queue.keys.processing,
            )

    def settle_failure(self, message: bytes, error: BaseException, attempts: int) -> None:
        if isinstance(error, MessageTimeout):
            reason = f"timeout after {self.pair.timeout:g}s"
        else:
            reason = f"{type(error).__name__}: {error}"[:_REASON_LIMIT]
        if attempts >= self.pair.max_attempts:
            self.dead_letter(message, reason, attempts)
            return
        delay = self.retry_backoff.compute(attempts)
        self.queue.retry_later(message, delay)
        log.warning(
            "delivery %d/%d failed (%s); retrying in %.1fs",
            attempts,
            self.pair.max_attempts,
            reason,
            delay,
        )

    def dead_letter(self, message: bytes, reason: str, attempts: int) -> None:
        self.queue.dead_letter(message, reason, attempts)
        log.error(
            "dead-lettered a %d-byte message to %s after %d deliveries: %s",
            len(message),
            self.queue.keys.dead,
            attempts,
            reason,
        )
