"""The worker process's entry point: build the handler, choose the loop, run it.

Apart from `worker` so that the loops (`worker.Worker`, `dispatch.ConcurrentWorker`) can
build on each other while this, which picks between them, sits above both.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import TYPE_CHECKING

import setproctitle

from rqworkers.common import files
from rqworkers.common.process import StopFlag
from rqworkers.common.text import printable
from rqworkers.errors import ExitCode
from rqworkers.store.connections import Client, connect
from rqworkers.store.queue import ReliableQueue
from rqworkers.worker import taskhandler
from rqworkers.worker.alarm import ALARM
from rqworkers.worker.dispatch import ConcurrentWorker
from rqworkers.worker.freeze import FreezeWatch
from rqworkers.worker.handlers import startup_failure
from rqworkers.worker.loop import BLOCK_TIMEOUT, Worker, WorkerSpec
from rqworkers.worker.scoreboard import Scoreboard

if TYPE_CHECKING:  # loaded only when tracing is on: `_tracing`
    from rqworkers.worker.tracing import Tracing

log = logging.getLogger("rqworkers.worker")


def main(spec: WorkerSpec, board: Scoreboard) -> int:
    """The worker process's entry point; returns its exit code.

    Until the handler is imported and its setup() has returned, SIGTERM and SIGINT keep
    the default action the fork left them: a setup that hangs, in Python or in C, stops at
    once. Only then does SIGTERM become a request to finish the message in hand. The
    manager ends a setup that runs past `setup_timeout`.

    With tracing on, the span exporter is made here, in this process (no exporting thread
    survives a fork), before the handler loads, so that its spans are exported too; and it
    is flushed on every way out.
    """
    setproctitle.setproctitle(f"rqworkers: worker {spec.name}")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the manager's business
    tracing = _tracing(spec) if spec.tracing else None
    if spec.tracing and tracing is None:
        return ExitCode.STARTUP_FAILED
    try:
        return _run(spec, board, tracing)
    finally:
        if tracing is not None:
            tracing.close()


def _run(spec: WorkerSpec, board: Scoreboard, tracing: Tracing | None) -> int:
    client = _client(spec)
    if client is None:
        return ExitCode.STARTUP_FAILED
    try:
        handler = taskhandler.load(spec.pair)
        handler.setup()
    except Exception as exc:
        client.close()
        what = spec.pair.handler or f"for tasks {list(spec.pair.tasks or ())}"
        log.error("cannot start handler %s: %s%s", what, *startup_failure(exc))
        return ExitCode.STARTUP_FAILED
    stop = _install_signals()
    board.ready()
    pair = spec.pair
    limits = pair.limits
    grouper = handler.grouper()
    if grouper is not None and not limits.group_by:  # `group_by` wins where both are set
        limits = dataclasses.replace(limits, grouper=grouper)
    # One message at a time, in a plain loop, is what the fast path serves (store/fast.py).
    one_at_a_time = pair.concurrency == 1 and not handler.is_async
    queue = ReliableQueue(
        client,
        pair.queue,
        spec.worker_id,
        keep_connection=True,
        limits=limits,
        level0_every=pair.level0_every,
        fast_path=one_at_a_time,
    )
    try:
        if not one_at_a_time:
            worker: Worker = ConcurrentWorker(spec, handler, queue, board, stop, tracing)
        else:
            worker = Worker(spec, handler, queue, board, stop, tracing)
            signal.signal(signal.SIGTERM, worker.on_stop_signal)
            signal.signal(signal.SIGINT, worker.on_stop_signal)
        if spec.pair.max_running or spec.pair.group_max_running:
            watch = FreezeWatch(
                spec.pair.url,
                queue.keys,
                spec.lease_ttl,
                worker.holds_permit,
                spec.manager_pid,
                queue.owner_name,
            )
            worker.freeze_watch = watch
            watch.start()
        return worker.run()
    finally:
        handler.teardown()
        handler.close()
        queue.client.close()


def _client(spec: WorkerSpec) -> Client | None:
    """The worker's Redis client, or None after one line saying why there is none. Making it
    contacts no server but reads the URL's `password_file`, which may have been swapped for
    a FIFO or a device since `check` (`files.NotRegularFileError`), removed, or made
    unreadable: a failed start the manager backs off from, not a crash with a traceback."""
    try:
        return connect(spec.pair.url, BLOCK_TIMEOUT)
    except (OSError, ValueError) as exc:  # ValueError: a password that is not UTF-8
        where = f"password_file {exc.path} " if isinstance(exc, files.NotRegularFileError) else ""
        log.error("cannot connect to %s: %s%s", spec.pair.endpoint, where, printable(str(exc)))
        return None


def _tracing(spec: WorkerSpec) -> Tracing | None:
    """This process's span exporter, or None after one line saying why there is none (the
    `otel` extra gone since `check`, an OTEL_* variable the SDK or rqworkers refuses)."""
    try:
        from rqworkers.worker.tracing import Tracing

        return Tracing(spec.pair)
    except Exception as exc:  # a bad OTEL_* value (headers, certificate...): said, not raised
        log.error("cannot start tracing: %s: %s", type(exc).__name__, printable(str(exc)))
        return None


def _install_signals() -> StopFlag:
    """SIGTERM/SIGINT set the flag; the loop looks at it between messages."""
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ALARM.install()
    return stop
