"""What becomes of a delivery once its worker is done with it: the rules, in one place.

Both worker loops (`loop.Worker`, one message at a time, and `dispatch.ConcurrentWorker`,
many at once) hand every delivery to a `Settler`, which decides: acked (success), retried
later, dead-lettered (its attempts used up, a refusal, or never finished by earlier
workers), its task reply written ahead of the ack, its deduplication key freed once it is
acked or dead-lettered (not retried: it is still pending), and when the worker has finished
enough messages to recycle. A loop decides only how and when handlers run; so a rule changed here
holds in both.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable
from typing import Any

from rqworkers.common.backoff import ExponentialBackoff
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode, MessageTimeout, Refused
from rqworkers.store import dedup
from rqworkers.store.outage import REDIS_ERRORS, explain
from rqworkers.store.queue import Delivery, Lot, ReliableQueue
from rqworkers.worker.handlers import Handler, Reply
from rqworkers.worker.outbox import Failure, Outbox
from rqworkers.worker.scoreboard import Scoreboard

log = logging.getLogger(__name__)

_REASON_LIMIT = 2000  # characters of an exception kept as a dead letter's reason
_TRACEBACK_LIMIT = 8000  # characters of a traceback kept in a dead letter's record


class Settler:
    """Decides the fate of each delivery of one worker process and queues it in the outbox.

    It also counts the messages run to an end, since `max_requests` is a rule about them:
    how many more the worker may take, and when it recycles.
    """

    def __init__(
        self,
        pair: PairSettings,
        handler: Handler,
        queue: ReliableQueue,
        board: Scoreboard,
        samples: tuple[float, float],
        before_take: Callable[[], None],
    ) -> None:
        self.pair = pair
        self.handler = handler
        self.queue = queue
        self.board = board
        self.sample_succeeded, self.sample_failed = samples
        self.outbox = Outbox(queue, self.confirmed, self.write_replies, before_take, board.settled)
        jitter = random.randint(0, pair.max_requests_jitter)
        self.max_requests = pair.max_requests + jitter if pair.max_requests else 0
        self.finished = 0  # messages this process ran to an end, for `max_requests`
        self.retry_backoff = ExponentialBackoff(pair.retry_delay, pair.retry_delay_max)

    def admit(self, delivery: Delivery, lost_reason: str) -> bool:
        """True if `delivery` may reach the handler now.

        One whose earlier deliveries used up `max_attempts` without a result (their workers
        died) never does: it is dead-lettered unhandled, with `lost_reason`. One that ended
        without a result before may take this worker down again: what is finished is
        settled first, or every crash would run those again too.
        """
        if delivery.attempts >= self.pair.max_attempts:
            record = {"reason": lost_reason, "attempts": delivery.attempts}
            self.outbox.fail(Failure(delivery, record, None))
            return False
        if delivery.attempts and not self.outbox.empty:
            self.outbox.flush()
        return True

    def verdict(self, delivery: Delivery, error: BaseException | None) -> Failure | None:
        """None for a success, else the retry or dead letter the delivery has earned. Call it
        while the scoreboard still names the delivery: a crash until then charges it."""
        return None if error is None else self.failure(delivery, error)

    def settle(
        self,
        delivery: Delivery,
        failure: Failure | None,
        ended: float,
        seconds: float,
        reply: Reply | None = None,
    ) -> None:
        """Count a delivery run to an end (at monotonic `ended`, after `seconds` in its
        handler), and queue its ack, preceded by the `reply` its run made, or send its
        failure."""
        self.finished += 1
        if failure is not None:
            self.outbox.fail(failure)
            return
        self.outbox.ack(delivery, ended, reply)
        if delivery.dedup is not None:
            self.release(delivery)
        if self.sample_succeeded and _sampled(self.sample_succeeded):
            log.info(
                "succeeded: %d bytes in %.3fs",
                len(delivery.payload),
                seconds,
                extra={"event": "succeeded"},
            )

    def succeeded_run(self, lot: Lot, first: int, last: int, since: float) -> None:
        """`settle` for the deliveries `first` to `last` of `lot`, run in take order by
        `Worker.run_lot`, whose handlers returned (the first at monotonic `since`) with
        no reply, no deduplication key and no log line: count them and queue their acks,
        which travel as one trim (the caller sends them once ACK_INTERVAL has passed)."""
        self.finished += last - first + 1
        self.outbox.ack_run(lot, first, last, since)

    def cap(self, limit: int, in_flight: int = 0) -> int:
        """`limit` lowered to what `max_requests` leaves this worker to start: it must not
        take what it will not live to start (`in_flight` are started, not yet finished)."""
        if not self.max_requests:
            return limit
        return min(limit, self.max_requests - self.finished - in_flight)

    def recycle(self) -> int | None:
        """MAX_REQUESTS once this process has finished `max_requests` messages, else None."""
        if self.max_requests and self.finished >= self.max_requests:
            log.info("finished %d messages; recycling", self.finished)
            return ExitCode.MAX_REQUESTS
        return None

    def failure(self, delivery: Delivery, error: BaseException) -> Failure:
        """What to do with a delivery that raised `error`: retry it later, or dead-letter it
        on its last attempt or when the handler refused it."""
        number = delivery.attempts + 1
        record: dict[str, Any] = {"attempts": number}
        final = number >= self.pair.max_attempts
        if isinstance(error, MessageTimeout):
            record["reason"] = f"timeout after {error.seconds or self.pair.timeout:g}s"
        elif isinstance(error, Refused):  # a verdict on the message: its reason says it all
            record["reason"] = _text_of(error)[:_REASON_LIMIT]
            final = True
        else:
            record["reason"] = f"{type(error).__name__}: {_text_of(error)}"[:_REASON_LIMIT]
            if error.__traceback__ is not None:  # none for a failure found after the handler
                record["traceback"] = _traceback_text(error)
        delay = None if final else self.retry_backoff.compute(number)
        return Failure(delivery, record, delay, error)

    def write_replies(self) -> None:
        """Have the handler write the replies of the pending acks, ahead of them; a delivery
        whose own reply was refused fails instead, like any failure of its own.

        Each reply is the one its delivery's run made, and a refusal is charged to that
        delivery: a twin (the same payload) is never acked or failed in its place. A Redis
        that does not answer raises: every reply stays with its ack, to go again with it.
        """
        outbox = self.outbox
        if not outbox.replies:  # a plain handler's, always: nothing to look through
            return
        due = [delivery for delivery in outbox.acks if delivery.id in outbox.replies]
        errors = self.handler.write_replies([outbox.replies[d.id] for d in due])
        for delivery, error in zip(due, errors, strict=True):
            if error is None:
                del outbox.replies[delivery.id]  # written: once is enough
            else:
                outbox.replace_ack(delivery, self.failure(delivery, error))

    def confirmed(self, failure: Failure, moved: bool) -> None:
        """Count and log a retry or dead-letter that Redis confirmed."""
        record, error = failure.record, failure.error
        if not moved:
            log.warning("a failed message was moved by someone else; left to its new owner")
            return
        sampled = _sampled(self.sample_failed)
        show = None
        if sampled and error is not None and error.__traceback__ is not None:
            show = None if isinstance(error, MessageTimeout | Refused) else error
        if failure.delay is not None:
            self.board.count("retried")
            if sampled:
                log.warning(
                    "delivery %d/%d failed (%s); retrying in %.1fs",
                    record["attempts"],
                    self.pair.max_attempts,
                    record["reason"],
                    failure.delay,
                    exc_info=show,
                    extra={"event": "failed"},
                )
            return
        self.board.count("dead_lettered")
        if sampled:
            log.error(
                "dead-lettered a %d-byte message to %s after %d deliveries: %s",
                len(failure.delivery.payload),
                self.queue.keys.dead,
                record["attempts"],
                record["reason"],
                exc_info=show,
                extra={"event": "dead_lettered"},
            )
        if failure.delivery.dedup is not None:
            self.release(failure.delivery)
        try:
            self.handler.on_dead_letter(failure.delivery.payload, record["reason"], error)
        except Exception:
            log.exception("handler %s.on_dead_letter() raised; ignored", self.handler.path)

    def release(self, delivery: Delivery) -> None:
        """Free the deduplication key a settled message holds, so that a push with it is
        enqueued again. Best effort: should Redis fail now, the key expires on its own."""
        assert delivery.dedup is not None
        token, key = delivery.dedup
        try:
            dedup.release(self.queue.client, self.queue.keys.queue_name, token, key)
        except REDIS_ERRORS as exc:
            log.warning("could not free dedup key %r: %s; it expires by itself", key, explain(exc))


def _text_of(error: BaseException) -> str:
    """`str(error)`, which user code can make raise: that must not kill the worker."""
    try:
        return str(error)
    except Exception:
        return f"<{type(error).__name__} whose str() raised>"


def _traceback_text(error: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(error))
    except Exception:
        return ""
    if len(text) <= _TRACEBACK_LIMIT:
        return text
    return "...\n" + text[-_TRACEBACK_LIMIT:]  # the end holds the frame that raised


def _sampled(share: float) -> bool:
    return share >= 1.0 or random.random() < share
