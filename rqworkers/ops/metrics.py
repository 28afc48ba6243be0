"""`/metrics` (Prometheus), `/healthz` and `/livez`, served by the keeper process.

Counts come from the slots' scoreboards, which are cumulative over every worker a slot has
had, so counters stay correct across recycling without the manager doing any I/O. Queue
lengths come from the keeper's last status pass, so a scrape never waits on Redis.

The server runs in a thread of the keeper: the keeper never forks, so threads are safe
there, while the manager, which forks, stays single-threaded.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from rqworkers.common.rates import Rate
from rqworkers.ops.web.server import Handler as BoundedHandler
from rqworkers.ops.web.server import Server
from rqworkers.store.flow import BUSIEST, GroupState
from rqworkers.store.queue import Snapshot
from rqworkers.worker.scoreboard import DURATION_BUCKETS, RECYCLE_REASONS, Scoreboard

log = logging.getLogger(__name__)

LABELS = ["host", "queue"]
RESTART_GRACE = 2.0  # seconds a slot may go without a worker between exit and respawn
CRASH_LOOP = 2  # failures in a row (crashes, failed starts) that make a slot unhealthy


@dataclass(frozen=True)
class SlotView:
    """One slot as metrics see it."""

    host: str  # the host's name in the config
    queue: str
    name: str
    board: Scoreboard


class Metrics(Collector):
    def __init__(
        self,
        targets: tuple[SlotView, ...],
        snapshots: Callable[[], dict[tuple[str, str], Snapshot]],
        manager_start_time: float,
        rss: Callable[[int], int],
    ) -> None:
        self.targets = targets
        self.snapshots = snapshots  # (host, queue) → the keeper's latest reading
        self.manager_start_time = manager_start_time
        self.rss = rss

    def collect(self) -> Iterator[Metric]:
        labels = LABELS
        counters = {
            "succeeded": ("rqworkers_messages_succeeded", "Messages whose handler returned."),
            "failed": ("rqworkers_messages_failed", "Messages whose handler raised or timed out."),
            "retried": ("rqworkers_messages_retried", "Failed messages parked for a retry."),
            "dead_lettered": ("rqworkers_messages_dead_lettered", "Messages dead-lettered."),
            "redis_errors": ("rqworkers_redis_errors", "Redis errors met by workers."),
        }
        families = {
            key: CounterMetricFamily(name, text, labels=labels)
            for key, (name, text) in counters.items()
        }
        recycles = CounterMetricFamily(
            "rqworkers_worker_recycles", "Worker exits by reason.", labels=[*labels, "reason"]
        )
        rss = GaugeMetricFamily(
            "rqworkers_worker_rss_bytes",
            "Resident memory of live workers.",
            labels=[*labels, "worker"],
        )
        in_handler = GaugeMetricFamily(
            "rqworkers_worker_in_flight_messages",
            "Messages in a live worker's handler now (at most its concurrency).",
            labels=[*labels, "worker"],
        )
        oldest = GaugeMetricFamily(
            "rqworkers_worker_oldest_message_seconds",
            "How long the oldest message in a live worker's handler has run.",
            labels=[*labels, "worker"],
        )
        for key, (totals, _) in self._per_queue().items():
            for name, family in families.items():
                family.add_metric(list(key), totals[name])
            for reason in RECYCLE_REASONS:
                recycles.add_metric([*key, reason], totals[f"recycled_{reason}"])
        yield from families.values()
        yield recycles
        yield from self._durations()
        for target in self.targets:
            if target.board.pid:
                labels_of = [target.host, target.queue, target.name]
                rss.add_metric(labels_of, self.rss(target.board.pid))
                in_handler.add_metric(labels_of, target.board.in_flight())
                oldest.add_metric(labels_of, target.board.busy_for())
        yield rss
        yield in_handler
        yield oldest
        yield from self._lengths()
        uptime = GaugeMetricFamily("rqworkers_manager_uptime_seconds", "Seconds since start.")
        uptime.add_metric([], time.time() - self.manager_start_time)
        yield uptime

    def _per_queue(self) -> dict[tuple[str, str], tuple[dict[str, float], list[int]]]:
        result: dict[tuple[str, str], tuple[dict[str, float], list[int]]] = {}
        for target in self.targets:
            key = (target.host, target.queue)
            totals, buckets = target.board.totals(), target.board.buckets()
            if key in result:
                old_totals, old_buckets = result[key]
                totals = {k: v + old_totals[k] for k, v in totals.items()}
                buckets = [a + b for a, b in zip(buckets, old_buckets, strict=True)]
            result[key] = (totals, buckets)
        return result

    def _durations(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "rqworkers_handler_duration_seconds",
            "Time spent in the handler per message.",
            labels=LABELS,
        )
        for key, (totals, buckets) in self._per_queue().items():
            cumulative, running = [], 0
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), buckets, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            family.add_metric(list(key), cumulative, sum_value=totals["duration_sum"])
        yield family

    def _lengths(self) -> Iterator[Metric]:
        gauges = {
            "waiting": "Messages waiting: the shared list, and prioritised ones (levels 1-9).",
            "in_flight": "Messages in workers' private lists.",
            "retrying": "Messages in the retry set: retries and delayed messages not yet due.",
            "dead": "Messages in the dead-letter list.",
        }
        families = {
            name: GaugeMetricFamily(
                f"rqworkers_queue_{name}_messages", text, labels=["host", "queue"]
            )
            for name, text in gauges.items()
        }
        next_due = GaugeMetricFamily(
            "rqworkers_queue_next_due_timestamp_seconds",
            "When the soonest message of the retry set is due (absent when it is empty).",
            labels=["host", "queue"],
        )
        for (host, queue), snap in self.snapshots().items():
            for name, family in families.items():
                family.add_metric([host, queue], getattr(snap, name))
            if snap.next_due is not None:
                next_due.add_metric([host, queue], snap.next_due)
        yield from families.values()
        yield next_due
        yield from self._flow()

    def _flow(self) -> Iterator[Metric]:
        """The pause and the flow limits of each queue, and how much of each is in use. A
        limit's gauges are there only for the queues that have it: `running / max_running`
        then never divides by a limit that is not one."""
        gauge = functools.partial(GaugeMetricFamily, labels=LABELS)
        paused = gauge("rqworkers_queue_paused", "1 while the queue is paused, else 0.")
        held = gauge(
            "rqworkers_queue_held_back_messages",
            "Waiting messages that the pause or a limit lets none of start now.",
        )
        running = gauge(
            "rqworkers_queue_running_permits",
            "max_running permits in use, across every worker of the queue.",
        )
        most = gauge("rqworkers_queue_max_running", "The queue's max_running.")
        started = gauge(
            "rqworkers_queue_rate_window_starts",
            "Handler starts in the current rate_limit window.",
        )
        allowed = gauge("rqworkers_queue_rate_limit_starts", "The N of the queue's rate_limit.")
        window = gauge(
            "rqworkers_queue_rate_limit_window_seconds", "The window of the queue's rate_limit."
        )
        group_most = gauge("rqworkers_queue_group_max_running", "The queue's group_max_running.")
        group_labels = [*LABELS, "group"]
        group_waiting = GaugeMetricFamily(
            "rqworkers_queue_group_waiting_messages",
            f"Messages waiting, per group: the {BUSIEST} busiest groups of each queue.",
            labels=group_labels,
        )
        group_running = GaugeMetricFamily(
            "rqworkers_queue_group_running_messages",
            f"Messages running, per group: the {BUSIEST} busiest groups of each queue.",
            labels=group_labels,
        )
        group_oldest = GaugeMetricFamily(
            "rqworkers_queue_group_oldest_waiting_seconds",
            f"Age of the oldest waiting message, per group: the {BUSIEST} busiest groups.",
            labels=group_labels,
        )
        for (host, queue), snap in self.snapshots().items():
            flow, labels = snap.flow, [host, queue]
            paused.add_metric(labels, 0 if flow.paused is None else 1)
            held.add_metric(labels, snap.held_back)
            if flow.max_running:
                running.add_metric(labels, flow.running)
                most.add_metric(labels, flow.max_running)
            if flow.rate_limit:
                started.add_metric(labels, flow.started)
                allowed.add_metric(labels, flow.rate_starts)
                window.add_metric(labels, Rate.parse(flow.rate_limit).seconds)
            if flow.group_max_running:
                group_most.add_metric(labels, flow.group_max_running)
            for group in busiest_groups(snap):
                labels_of = [*labels, group.name]
                group_waiting.add_metric(labels_of, group.waiting)
                group_running.add_metric(labels_of, group.running)
                if group.oldest_age is not None:  # unknown: no sample, rather than a 0
                    group_oldest.add_metric(labels_of, group.oldest_age)
        yield from (paused, held, running, most, started, allowed, window)
        yield from (group_most, group_waiting, group_running, group_oldest)


def busiest_groups(snap: Snapshot) -> list[GroupState]:
    """The groups of a queue that get series of their own: those its flow state lists (the
    `BUSIEST`), each name once. A group per tenant must not make a series per tenant, nor
    two names that read alike (undecodable bytes are escaped) one series twice."""
    seen: set[str] = set()
    found = []
    for group in snap.flow.groups[:BUSIEST]:
        if group.name not in seen:
            seen.add(group.name)
            found.append(group)
    return found


def health(
    targets: tuple[SlotView, ...], manager_pid: int, now: float | None = None
) -> tuple[bool, dict[str, object]]:
    """Healthy while the manager runs and every pair has a worker consuming.

    A slot between two workers after a normal exit (a recycle) is given `RESTART_GRACE`
    seconds; one whose workers keep failing, or that waits out a Redis error, is not.
    The body names, for each pair that cannot consume, why not.
    """
    alive, body = liveness(manager_pid)
    if not alive:
        return alive, body
    now = time.time() if now is None else now
    pairs: dict[tuple[str, str], list[str]] = {}
    for target in targets:
        problems = pairs.setdefault((target.host, target.queue), [])
        problem = _slot_problem(target, now)
        if problem is not None:
            problems.append(f"{target.name} {problem}")
        else:
            problems.append("")  # this slot consumes: the pair is fine
    failing = {
        f"{host}/{queue}": problems
        for (host, queue), problems in pairs.items()
        if "" not in problems
    }
    if failing:
        reason = "; ".join(p for problems in failing.values() for p in problems)
        return False, {"status": "unhealthy", "reason": reason, "pairs": failing}
    return True, {"status": "ok", "workers": len(targets), "pairs": len(pairs)}


def liveness(manager_pid: int) -> tuple[bool, dict[str, object]]:
    """Whether the manager still runs: the one failure here that a restart cures.

    Narrower than `health` on purpose. A Redis outage, a handler whose setup() fails or a
    slot in restart backoff make `/healthz` answer 503, and restarting the process cures
    none of them: it would only end the handlers that are still running and charge their
    messages an attempt. An orchestrator's liveness check asks this; its readiness check,
    `health`."""
    if os.getppid() != manager_pid:
        return False, {"status": "unhealthy", "reason": f"manager {manager_pid} is gone"}
    return True, {"status": "ok"}


def _slot_problem(target: SlotView, now: float) -> str | None:
    """Why the slot has no worker consuming, or None if it has one (or is between two
    after a normal exit, for less than `RESTART_GRACE` seconds)."""
    board = target.board
    state = board.state()
    if state in ("idle", "busy", "stopping"):  # stopping: finishing its message, replaced next
        return None
    if state == "waiting":
        return f"is waiting out a Redis error: {board.waiting_reason}"
    bad_exits = int(board.get("bad_exits"))
    last = f"last exit: {board.last_exit}" if board.last_exit else "no exit yet"
    if bad_exits >= CRASH_LOOP:
        restart = board.get("next_start") - now
        when = f", restart in {restart:.1f}s" if restart > 0 else ""
        return f"keeps failing ({bad_exits} times in a row, {last}{when})"
    since = board.get("since") if board.pid else board.get("ended_at")
    if now - since < RESTART_GRACE:
        return None
    if state == "starting" and board.pid:
        return f"has been in its handler's setup() for {now - since:.1f}s"
    return f"has no worker consuming ({state}, {last})"


def serve(
    address: str,
    metrics: Metrics,
    healthy: Callable[[], tuple[bool, dict[str, object]]],
    pages: Callable[[BaseHTTPRequestHandler], bool] | None = None,
    alive: Callable[[], tuple[bool, dict[str, object]]] | None = None,
) -> Server:
    """Start serving `/metrics`, `/healthz` and `/livez` on `host:port` in a daemon thread.

    `pages` answers every other request (the status page, `rqworkers.ops.web`) and returns
    False for a path it does not serve, which then gets a 404. The server is bounded
    (threads, timeouts, security headers): see `rqworkers.ops.web.server`.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)

    class Handler(BoundedHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's names
            if self.path.split("?")[0] == "/metrics":
                self.reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif self.path.split("?")[0] == "/healthz":
                self.reply_check(healthy)
            elif self.path.split("?")[0] == "/livez" and alive is not None:
                self.reply_check(alive)
            elif not (pages and pages(self)):
                self.not_found()

        def do_POST(self) -> None:  # noqa: N802
            if not (pages and pages(self)):
                self.not_found()

        def not_found(self) -> None:
            self.reply(404, "text/plain", b"not found: try /metrics, /healthz or /livez\n")

        def reply_check(self, check: Callable[[], tuple[bool, dict[str, object]]]) -> None:
            ok, body = check()
            self.reply(200 if ok else 503, "application/json", json.dumps(body).encode())

        def reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    host, _, port = address.rpartition(":")
    server = Server((host or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("serving /metrics and /healthz on http://%s:%d", *server.server_address[:2])
    return server


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
