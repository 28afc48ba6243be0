"""One worker process: replay leftovers, then take, handle, settle, until recycled.

The loop, for every message:
take the next of the batch, or ack what is done and take a new batch in one round trip,
blocking only when the queue is empty → handle under a timer → settle: queue the ack, or
retry later or dead-letter, as `settle.Settler` decides → recycle if `max_requests` is
reached or a timeout hit. On the way out, pending acks are sent and unstarted messages
given back.

A Redis error at any step sends the worker into backoff and, once Redis answers again,
back to replaying its private list: whatever reply was lost, the message is there, and
the outbox sends again what was not confirmed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from rqworkers.common.process import StopFlag
from rqworkers.config import PairSettings
from rqworkers.errors import ExitCode, MessageTimeout, Superseded
from rqworkers.store.flow import PERMIT_HOLD
from rqworkers.store.outage import REDIS_ERRORS, Outage, explain, is_outage
from rqworkers.store.queue import PAUSE_LOOKUP, Delivery, Lot, ReliableQueue, Taken
from rqworkers.store.scripts import Held
from rqworkers.worker.alarm import ALARM
from rqworkers.worker.batch import LOST_WORKER, Batch
from rqworkers.worker.freeze import FreezeWatch
from rqworkers.worker.handlers import Handler, Reply
from rqworkers.worker.scoreboard import Scoreboard
from rqworkers.worker.settle import Settler

if TYPE_CHECKING:  # loaded only when tracing is on (`worker.main`)
    from rqworkers.worker.tracing import Traced, Tracing

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds an idle fetch blocks, which bounds an idle worker's Redis traffic (two commands
# per block) and how often it checks that its manager lives. A stop signal cuts it short.
BLOCK_TIMEOUT = 10.0
# Seconds an idle worker blocks again, without a take, after its blocking fetch timed out
# and no retry it knows of is due (see `Worker.fill_batch`): the bound for a retry it could
# not know of (given back by a stopping worker) to be found by an idle pair.
IDLE_TAKE_EVERY = 30.0
# Seconds a worker held back by a full `max_running` or a pause waits for a wake-up before
# it asks again: wake-ups come when permits are given back or the queue is resumed, so
# this only bounds the cost of one lost (a holder's node vanished: its reclaim wakes too).
WAKE_TIMEOUT = 2.0
# With a limit, a worker takes at most what it will start within about this many seconds:
# a message held in its private list is a message no other worker can start.
LIMITED_BATCH_SECONDS = 1.0
MIN_BLOCK = 0.01  # seconds: a blocking fetch of 0 would wait forever


@dataclass(frozen=True)
class WorkerSpec:
    """What the manager tells a worker it forks."""

    pair: PairSettings
    name: str
    worker_id: str
    manager_pid: int
    previous_exit: str | None  # how this slot's last worker ended, if it ended badly
    # The first delivery its private list held that never reached a handler (see
    # `Scoreboard.mark_unstarted`); the ones before it are charged. None: unknown.
    previous_unstarted: bytes | None
    lease_ttl: float
    # Earlier lives of this slot that died in their replay, after it had charged what had
    # started (`Scoreboard.replay_interrupted`): their ids are not charged again.
    spared: tuple[bytes, ...] = ()
    sample_succeeded: float = 0.0  # share of succeeded messages that get a log line
    sample_failed: float = 1.0  # share of failed and dead-lettered messages that do
    tracing: bool = False  # `[telemetry] tracing`: a span per delivery (`worker.tracing`)


class Worker:
    """The loop of one worker process. Its state is what is in flight, nothing more."""

    def __init__(
        self,
        spec: WorkerSpec,
        handler: Handler,
        queue: ReliableQueue,
        board: Scoreboard,
        stop: StopFlag,
        tracing: Tracing | None = None,
    ) -> None:
        self.spec = spec
        self.tracing = tracing  # None: tracing is off, and costs one test per message
        self.pair = spec.pair
        self.handler = handler
        self.queue = queue
        self.board = board
        self.stop = stop
        samples = (spec.sample_succeeded, spec.sample_failed)
        self.settler = Settler(spec.pair, handler, queue, board, samples, self.before_take)
        self.outbox = self.settler.outbox
        self.outbox.holding = self.holding
        self.pace = LIMITED_BATCH_SECONDS  # seconds a handler takes, on average (EWMA)
        # Idle: until when (epoch seconds) a take would find nothing, after a fetch timed
        # out; whether that time is a retry's due time (a take is needed then).
        self.quiet_until = 0.0
        self.quiet_due = False
        self.freeze_watch: FreezeWatch | None = None  # set under a limit (worker/main.py)
        self.needs_lease = True  # taken before any replay, so no reclaimer races us
        # Replay what the private list holds before taking anything new, charging the
        # deliveries an earlier life of this worker had started (all, if that is unknown).
        self.replaying = True
        self.charge_before: bytes | None = spec.previous_unstarted or b""
        self.batch = Batch()  # taken, not yet started, oldest first
        self.marked = False  # the scoreboard names an unstarted delivery of the private list
        self.in_handler = False  # user code runs: this worker's Redis client is idle
        self.lean: bool | None = None  # `can_run_lean`, known at the first batch
        # Its outages are published, so that `/healthz` and `status` can tell them.
        self.outage = Outage(f"redis at {self.pair.endpoint}", report=board.waiting)
        ALARM.install()

    def run(self) -> int:
        code: int = ExitCode.OK
        while self.keep_going():
            try:
                result = self.step()
            except Superseded as exc:
                code = self.superseded(exc)
                break
            except REDIS_ERRORS as exc:
                if not is_outage(exc):
                    code = self.lasting_error(exc)
                    break
                self.board.count("redis_errors")
                self.lose_track()
                self.outage.wait(exc, lambda: not self.keep_going())
                continue
            self.outage.over()
            if result is not None:
                code = result
                break
        self.finish()
        return code

    def keep_going(self) -> bool:
        return not self.stop.set

    def parent_gone(self) -> int | None:
        """ORPHANED if the manager that forked this worker is gone; checked when idle."""
        if os.getppid() != self.spec.manager_pid:
            log.warning("manager %d is gone; exiting", self.spec.manager_pid)
            return ExitCode.ORPHANED
        return None

    def step(self) -> int | None:
        """Take a batch if none is in hand, and handle it. An exit code means: stop and
        recycle."""
        self.resume()
        if not self.batch and not self.fill_batch():
            return self.parent_gone()
        self.outage.over()  # Redis answers: say so now, not after a batch of slow messages
        return self.run_batch()

    def run_batch(self) -> int | None:
        """Handle the batch in turn until it is done, a stop is asked for, or a limit hit."""
        if self.runs_lean():
            return self.run_lean()
        batch, stop = self.batch, self.stop
        while batch and not stop.set:
            delivery, lost_reason = batch.popleft()
            if self.deliver(delivery, lost_reason):
                return ExitCode.TIMEOUT
            code = self.settler.recycle()
            if code is None and self.paused_mid_batch():
                return None
            if code is not None:
                return code
        return None

    def runs_lean(self) -> bool:
        """`can_run_lean`, asked once: at the first batch, when everything it reads is set
        (`worker.main` sets the freeze watch after construction)."""
        if self.lean is None:
            self.lean = self.can_run_lean()
        return self.lean

    def can_run_lean(self) -> bool:
        """Whether `run_lean` may run this worker's batches: a plain handler, which makes
        no replies and has no callbacks, no tracing, no log line per success, and no flow
        limit (whose permits and pace the lean loop does not keep)."""
        handler, limits = self.handler, self.queue.limits
        return (
            type(handler).run is Handler.run
            and not (handler.has_callbacks or handler.is_async)
            and self.tracing is None
            and self.freeze_watch is None
            and not self.settler.sample_succeeded
            and not (limits.any or limits.sorter)
        )

    def run_lean(self) -> int | None:
        """`run_batch` for a lean worker (`can_run_lean`): a take's lot, kept whole in
        the batch, is run by `run_lot`; anything else (a replay's leftovers) by `deliver`."""
        batch, stop = self.batch, self.stop
        while batch and not stop.set:
            if batch.waiting or batch.lot is None:
                delivery, lost_reason = batch.popleft()
                if self.deliver(delivery, lost_reason):
                    return ExitCode.TIMEOUT
                code = self.settler.recycle()
            else:
                code = self.run_lot(batch.lot)
            if code is not None:
                return code
            if self.paused_mid_batch():
                return None
        return None

    def paused_mid_batch(self) -> bool:
        """Whether the queue was paused while a batch ran, its rest then given back.

        A pause stops every start within about a second: the messages a worker took
        before it, up to `prefetch`, must not start for minutes after. They go back to the
        head of the queue, uncharged, in their place, where they wait like any other (a
        private list holds only what starts soon); the next take finds the pause and waits
        for the resume. Looked up at most once a second (`ReliableQueue.paused_now`)."""
        if not self.batch or not self.queue.paused_now():
            return False
        self.outbox.flush()
        self.give_back_batch()
        return True

    def run_lot(self, lot: Lot) -> int | None:
        """Run the batch's `lot` in take order from its cursor on, until it is done, a
        stop is asked for, or a limit hit.

        One with no attempts and no deduplication key whose handler returns is run with the
        scoreboard's writes and the timer of `deliver`, and counted in a run of successes
        whose acks the outbox sends as one trim (`Outbox.ack_run`): no `Delivery` is made
        for it, and no call per message settles it. At a prefetch of 100 and a short
        handler, those were a quarter of a worker's own CPU. Any other, and any that raises
        or runs out of time, is made a `Delivery` for `deliver` or `ended`, once the run
        of successes before it is queued.
        """
        batch, stop, board, settler = self.batch, self.stop, self.board, self.settler
        handle, timeout, monotonic = self.handler.handle, self.pair.timeout, time.monotonic
        payloads, prefix, plain = lot.payloads, lot.prefix, lot.plain
        count, index = len(payloads), batch.next
        max_requests = settler.max_requests
        first = -1  # the first of the run of successes not yet queued, if any
        oldest = 0.0  # when that run's first ended (monotonic seconds)
        due = 0.0  # when it, or an older ack pending in the outbox, is overdue
        numbered = False  # the scoreboard's current mark is `mark_in` of this take
        ended = 0.0  # when the last success ended (monotonic seconds)
        look_at = monotonic() + PAUSE_LOOKUP  # when to look for a pause before the next
        try:
            while index < count and not stop.set:
                # It starts: a stop signal gives back the rest (none, after the last).
                last = index + 1 == count
                if last:
                    batch.moved_to(count)
                else:
                    batch.next = index + 1
                payload = payloads[index]
                delivery = None if plain else lot.delivery(index)
                if delivery is not None:
                    if delivery.attempts or delivery.dedup is not None:
                        self.queue_run(lot, first, index - 1, oldest)
                        first, numbered = -1, False  # `deliver` marks by id
                        if self.deliver(delivery, LOST_WORKER):
                            return ExitCode.TIMEOUT
                        index += 1
                        if settler.recycle() is not None:
                            break
                        continue
                    payload = delivery.payload  # unwrapped
                # `mark_unstarted`: from here on, its worker's end charges it
                since = monotonic()
                if last:
                    self.mark_unstarted()
                    board.busy(since)
                elif numbered:
                    board.start(index + 2, since)
                else:
                    board.mark_in(prefix, index + 2)
                    board.busy(since)
                    numbered = self.marked = True
                self.in_handler = True
                try:
                    ALARM.until(since + timeout, handle, payload)
                except (Exception, MessageTimeout) as exc:
                    self.queue_run(lot, first, index - 1, oldest)
                    first, numbered = -1, False  # a failure's retry may move the list on
                    if self.ended(delivery or lot.delivery(index), since, exc):
                        return ExitCode.TIMEOUT
                    ended = monotonic()  # for the look for a pause below
                else:
                    ended = monotonic()
                    self.in_handler = False
                    board.succeeded_in(ended - since)
                    if first < 0:
                        first, oldest = index, ended
                        due = self.outbox.overdue_at(ended)
                    if ended > due:  # a slow batch must not hold finished work unacked long
                        self.queue_run(lot, first, index, oldest)
                        first = -1
                        self.outbox.flush()
                index += 1
                if max_requests:
                    unqueued = index - first if first >= 0 else 0  # counts as finished too
                    if settler.finished + unqueued >= max_requests:
                        break
                if ended >= look_at and index < count:  # run_lean gives the rest back
                    look_at = ended + PAUSE_LOOKUP
                    if self.queue.paused_now():
                        break
        finally:
            self.queue_run(lot, first, index - 1, oldest)
        return settler.recycle()

    def queue_run(self, lot: Lot, first: int, last: int, oldest: float) -> None:
        """Queue the acks of the deliveries `first` to `last` of `lot`, which succeeded
        (none if `first` < 0), the first of them at monotonic `oldest`."""
        if 0 <= first <= last:
            self.settler.succeeded_run(lot, first, last, oldest)

    def resume(self) -> None:
        """Before taking anything: hold the lease, then replay the private list if a start
        or a Redis error left it unknown. The lease comes first, so no reclaimer races us."""
        if self.needs_lease:
            self.queue.hold_lease(self.spec.lease_ttl)
            self.needs_lease = False
        if self.replaying:
            self.replay()

    def replay(self) -> None:
        """Settle what a lost reply left unconfirmed, then queue the private list's leftovers."""
        self.outbox.flush()
        reason = self.spec.previous_exit or LOST_WORKER
        # A predecessor this manager saw end is gone; one it did not see (a new manager)
        # may run on, orphaned: its permits stay counted a moment (`flow.PERMIT_HOLD`).
        unseen = self.spec.previous_unstarted is None and self.charge_before is not None
        if self.charge_before is not None:  # what it charges now, it must never charge again
            self.board.replay_begun(self.queue.owner_name)
        leftovers = self.queue.replay(
            self.charge_before, PERMIT_HOLD if unseen else 0.0, unseen, self.spec.spared
        )
        self.charge_before = None  # from here on this process knows what it ran
        running = self.running_elements()
        leftovers = [d for d in leftovers if d.element not in running]
        if not self.queue.limits.sorter:  # groups removed by a reload: their lists emptied
            self.queue.ungroup()
        if leftovers and self.queue.limits.any:
            # Under a limit a leftover must get its permit like any message: back to the
            # head of the queue (counts kept), to be taken again through the limits.
            self.queue.give_back(leftovers)
            leftovers = []
        self.batch.extend((d, reason) for d in leftovers)
        self.mark_unstarted()
        self.replaying = False
        self.board.replayed()
        if leftovers:
            log.info("replaying %d message(s) left in flight", len(leftovers))

    def running_elements(self) -> set[bytes]:
        """Envelopes of the deliveries in a handler now (none between two messages)."""
        return set()

    def mark_unstarted(self) -> None:
        """Tell the scoreboard which delivery is the oldest not started: call before each
        handler starts, and whenever the batch is refilled.

        The mark stays when the batch is dropped but its deliveries stay in the private list
        (a Redis error, an exit), and moves on only once they are given back.
        """
        first = self.batch.first_id()
        self.board.mark_unstarted(first)
        self.marked = bool(first)

    def before_take(self) -> None:
        """A take is about to be sent: if no delivery in hand is unstarted, what it takes
        is the oldest unstarted, even should this worker die before the reply is read.
        Under `max_running`, a worker woken from a freeze past its lease whose list was
        taken over exits here rather than take the list back (`FreezeWatch.check`)."""
        self.guard_permits()
        if not self.marked:
            self.board.mark_unstarted(self.queue.next_take_id)

    def guard_permits(self) -> None:
        """Under `max_running`: exit now if this worker was frozen past its lease and its
        list taken over (`FreezeWatch.check`), before its handler's outcome is settled or
        its next take makes the list its own again."""
        if self.freeze_watch is not None:
            self.freeze_watch.check()

    def took(self, taken: Taken) -> None:
        """Add what a take brought to the batch."""
        self.batch.add(taken, whole=self.runs_lean())
        if not self.marked and self.batch:
            self.mark_unstarted()

    def holding(self) -> list[Delivery]:
        """Deliveries of this worker that hold a permit beside what a take brings: taken,
        not yet started (between two messages, none is in a handler)."""
        return self.batch.deliveries()

    def holds_permit(self) -> bool:
        """Whether a delivery of this worker is in its handler or about to be (for
        `FreezeWatch`, from its own thread: a glance, no lock needed)."""
        return self.in_handler or bool(self.batch)

    def take_limit(self) -> int:
        """How many to take: up to `prefetch`; with a limit, only what starts soon. Under a
        rate limit that is one (each start is counted when taken, so it must start now);
        under `max_running`, about a second's worth at the handler's pace."""
        limit = max(1, self.settler.cap(self.pair.prefetch))
        limits = self.queue.limits
        if limits.rate or limits.group_rate:
            return 1
        if limits.max_running or limits.group_max_running:
            return max(1, min(limit, int(LIMITED_BATCH_SECONDS / max(self.pace, 1e-4))))
        return limit

    def fill_batch(self) -> bool:
        """Ack what is done and take up to `prefetch` messages; block only if there are none,
        or until a limit lets this worker take one.

        An idle worker whose blocking fetch timed out blocks again without a take, until a
        retry it knows of is due or IDLE_TAKE_EVERY has passed: the take would find nothing
        (a push wakes the fetch; a delayed message, a reclaim and a resume push a nudge or a
        wake), and it is most of what an idle pair costs Redis."""
        limit = self.take_limit()
        quiet = self.outbox.empty and time.time() < self.quiet_until
        if quiet:  # the last take found nothing, and nothing it knows of is due yet
            next_due: float | None = self.quiet_until if self.quiet_due else None
        else:
            taken = self.outbox.take(limit)
            if taken.count:
                self.took(taken)
                return bool(self.batch)
            if taken.held is not None:
                self.wait_for_permit(taken.held)
                return False
            next_due = taken.next_due
            # Until the retry it knows of is due, or IDLE_TAKE_EVERY: a take finds nothing.
            self.quiet_due = next_due is not None
            self.quiet_until = next_due if next_due is not None else time.time() + IDLE_TAKE_EVERY
        if not self.wait_for_message(_block_for(next_due)):
            if next_due is not None and next_due <= time.time() + MIN_BLOCK:
                self.quiet_until = 0.0  # a retry is due now: the next call takes it
            return False
        self.quiet_until = 0.0
        taken = self.outbox.take(limit, landed=True)
        self.took(taken)
        return bool(self.batch)

    def wait_for_permit(self, held: Held) -> None:
        """Sleep until the pause or a limit may let a take through: until the rate window
        has room, or a worker gives a permit back, or the queue is resumed. No polling: a
        wake-up comes through the queue's `wake` list; WAKE_TIMEOUT bounds a lost one.
        A rate window's wait (up to an hour under "N/h") is cut to BLOCK_TIMEOUT, the
        longest block the connection's socket allows: longer, it ends in a `TimeoutError`
        taken for a Redis outage. The next take finds how long is left."""
        if self.stop.set:
            return
        seconds = min(held.wait, BLOCK_TIMEOUT) if held.wait is not None else WAKE_TIMEOUT
        if interruptible(self.stop, self.queue.wait_for_wake, max(MIN_BLOCK, seconds)) is None:
            _drop_connections(self.queue.client)

    def wait_for_message(self, seconds: float) -> bool:
        """Block until a message lands or `seconds` pass; a stop signal ends it at once.

        Cut short, the blocking command's reply is never read, so the connection is dropped:
        a message Redis moved meanwhile waits in the landing list for this slot's next
        worker, or for a reclaim.
        """
        if self.stop.set:
            return False
        landed = interruptible(self.stop, self.queue.fetch, seconds)
        if landed is None:
            _drop_connections(self.queue.client)
        return bool(landed)

    def lose_track(self) -> None:
        """After a Redis error: forget the batch; the private list is the truth to replay.

        The outbox keeps what it has not had confirmed and sends it again first, so nothing
        settled is handled again; the replay then finds only deliveries that never reached
        the handler, and charges none of them.
        """
        self.batch.clear()
        self.replaying = self.needs_lease = True
        self.outbox.lost_reply()

    def superseded(self, exc: Superseded) -> int:
        """Another process replayed this worker's private list: it now owns what is there,
        acks of this one's finished messages included (they run again there). Exit."""
        log.error(
            "%s; exiting. Two managers given the same node name share worker ids (this "
            "one's is %s): give every node its own",
            exc,
            self.spec.worker_id,
        )
        self.batch.clear()
        self.outbox.forget_acks()
        return ExitCode.SUPERSEDED

    def lasting_error(self, exc: Exception) -> int:
        """An error reply that waiting cannot cure: name the keys at fault, and exit."""
        log.error(
            "redis refused an operation on %s: %s%s; exiting",
            self.queue.keys.queue,
            explain(exc),
            _wrong_types(self.queue),
        )
        self.batch.clear()  # left in the private list for the next worker
        return ExitCode.REDIS_LASTING_ERROR

    def finish(self) -> None:
        """On the way out: send pending settlements, give unstarted messages back."""
        ALARM.disarm()
        limits = self.queue.limits
        permits = bool(limits.max_running or limits.sorter)  # none held past its end
        if self.outbox.empty and not self.batch and not permits:
            return
        try:
            self.outbox.flush()
            self.give_back_batch()
            if permits:
                self.outbox.take(0)
        except Superseded:
            pass  # its list, and its permits, are another process's business now
        except REDIS_ERRORS as exc:
            # They stay in the private list: the next worker of this slot replays them.
            log.warning("could not settle in-flight messages on exit: %s", explain(exc))

    def give_back_batch(self) -> None:
        """Return what was taken but never started to the head of the queue, at once: if the
        worker is then killed (a slow message past `shutdown_timeout`), a new manager would
        have to charge every leftover, not knowing which one ran."""
        if self.batch:
            moved = self.queue.give_back(self.batch.deliveries())
            log.info("gave %d unstarted message(s) back to %s", moved, self.queue.keys.queue)
            self.batch.clear()
            self.marked = False  # the one it names has left the list

    def on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: stop after the message in hand; while a handler runs (and so
        this worker's Redis client is idle), give the unstarted messages back right away."""
        self.stop(signum, frame)
        if self.in_handler and self.batch:
            try:
                self.give_back_batch()
            except Exception as exc:  # the normal way out will try again
                log.warning("could not give unstarted messages back yet: %s", exc)

    def deliver(self, delivery: Delivery, lost_reason: str) -> bool:
        """Handle and settle one delivery; True if the handler or a callback timed out.

        A message whose earlier deliveries all ended without a result (its workers died)
        goes to the dead list with `lost_reason`, unhandled, once they reach `max_attempts`.
        """
        if not self.admit(delivery, lost_reason):
            return False
        traced = None if self.tracing is None else self.tracing.start(delivery)
        since = time.monotonic()
        self.board.busy(since)
        error: BaseException | None = None
        handler = self.handler
        self.in_handler = True
        result: Any = None
        reply: Reply | None = None
        try:
            result, reply = ALARM.until(since + self.pair.timeout, handler.run, delivery.payload)
        except (Exception, MessageTimeout) as exc:
            error = exc
        return self.ended(delivery, since, error, result, reply, traced)

    def admit(self, delivery: Delivery, lost_reason: str) -> bool:
        """`Settler.admit`, and the scoreboard's mark moved off `delivery`, which is out of
        the batch: from here on, its worker's end charges it.

        One whose attempts are used up is dead-lettered unhandled, and the mark moves
        first: a mark left on a delivery gone from the list is found nowhere, and charges
        everything (the unstarted behind it too); charging it changes nothing, since it is
        dead either way. Any other moves after: what is finished is settled first.
        """
        if delivery.attempts >= self.pair.max_attempts:
            self.mark_unstarted()
        admitted = self.settler.admit(delivery, lost_reason)
        self.mark_unstarted()
        return admitted

    def ended(
        self,
        delivery: Delivery,
        since: float,
        error: BaseException | None,
        result: Any = None,
        reply: Reply | None = None,
        traced: Traced | None = None,
    ) -> bool:
        """Settle a delivery whose handler, started at monotonic `since`, returned `result`
        (and `reply`) or raised `error`; True if it or a callback timed out."""
        ended = time.monotonic()
        self.guard_permits()  # woken from a freeze: settle nothing of a run not ours now
        self.pace += (ended - since - self.pace) * 0.2
        handler, settler = self.handler, self.settler
        callback_timed_out = handler.has_callbacks and self.run_callback(
            delivery.payload, result, error
        )
        self.in_handler = False
        failure = settler.verdict(delivery, error)
        if traced is not None:
            traced.end(failure, error)
        self.board.idle(error is not None, ended - since)  # after the callbacks: busy till then
        settler.settle(delivery, failure, ended, ended - since, reply)
        if failure is None and self.outbox.acks_overdue(ended):
            self.outbox.flush()  # a slow batch must not hold finished work unacked long
        return isinstance(error, MessageTimeout) or callback_timed_out

    def run_callback(self, message: bytes, result: Any, error: BaseException | None) -> bool:
        """on_success/on_failure under the same time limit; True if it ran out of time."""
        try:
            if error is None:
                ALARM.call(self.pair.timeout, self.handler.on_success, message, result)
            else:
                ALARM.call(self.pair.timeout, self.handler.on_failure, message, error)
        except MessageTimeout:
            log.error("handler callback ran past %ss; recycling", self.pair.timeout)
            return True
        return False


class _Interrupted(BaseException):
    """A stop signal arrived while the worker was blocked waiting for a message."""


def interruptible(stop: StopFlag, fn: Callable[..., T], *args: Any) -> T | None:
    """`fn(*args)`, cut short by SIGTERM or SIGINT (then None); `stop` records the signal.

    Python retries an interrupted system call after the handler returns, so only an
    exception ends a blocking read early. A handler may run at any bytecode, even after
    it was replaced (a signal that arrived just before), so it raises only while `armed`,
    and `armed` is cleared inside a `try` whose `except` catches what it raises: the
    exception can never escape into the code around (the manager's death sends SIGTERM to
    its workers at whatever instant it happens).
    """
    armed = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        stop(signum, frame)
        if armed:
            raise _Interrupted()

    previous: dict[signal.Signals, Any] = {}
    try:
        try:
            for stop_signal in (signal.SIGTERM, signal.SIGINT):
                previous[stop_signal] = signal.signal(stop_signal, interrupt)
            armed = True
            if stop.set:  # asked before the handlers were in place
                return None
            return fn(*args)
        finally:
            armed = False
    except _Interrupted:
        return None
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


def _drop_connections(client: Any) -> None:
    """Close every connection of `client`, whichever kind it is; new ones open on demand."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()
    else:
        client.disconnect_connection_pools()


def _block_for(next_due: float | None) -> float:
    """Seconds an idle fetch may block: until the next retry is due, at most BLOCK_TIMEOUT."""
    if next_due is None:
        return BLOCK_TIMEOUT
    return min(BLOCK_TIMEOUT, max(MIN_BLOCK, next_due - time.time()))


def _wrong_types(queue: ReliableQueue) -> str:
    """' (<key> is a <type>, ...)' for the queue's keys that hold the wrong kind of value
    (each key's type is declared in `store.keys`)."""
    expected = queue.keys.types()
    try:
        found = {key: queue.client.type(key) for key in expected}
    except redis.RedisError:
        return ""
    wrong = [
        f"{key} is a {kind.decode() if isinstance(kind, bytes) else kind}, not a {expected[key]}"
        for key, kind in found.items()
        if kind not in (b"none", "none", expected[key], expected[key].encode())
    ]
    return f" ({'; '.join(wrong)})" if wrong else ""
