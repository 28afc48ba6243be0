"""`rqworkers status`: every queue and every live worker, read from Redis alone.

Workers publish their status as the value of their lease (see `keeper.py`), so this works
from any machine that reaches Redis, for workers of every node. A host that cannot be
reached is reported as such and the others are still shown.

Exit codes (docs/operating.md): 0 when every host answered, 1 when one or more could not be
reached (or refused the reading); a config problem is 2, as for every command.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from rqworkers.common.text import printable
from rqworkers.config import Config, PairSettings
from rqworkers.errors import ExitCode
from rqworkers.store.outage import REDIS_ERRORS, explain, is_outage
from rqworkers.store.queue import Snapshot, connect, snapshot


@dataclass(frozen=True)
class PairStatus:
    host: str  # redacted URL
    queue: str
    snapshot: Snapshot | None
    error: str | None


def collect(config: Config) -> list[PairStatus]:
    """One status per configured pair; a failing host yields an error, not an exception."""
    clients: dict[str, Any] = {}
    errors: dict[str, str] = {}
    statuses = []
    for pair in config.pairs:
        statuses.append(_pair_status(pair, clients, errors))
    for client in clients.values():
        client.close()
    return statuses


def _pair_status(pair: PairSettings, clients: dict[str, Any], errors: dict[str, str]) -> PairStatus:
    if pair.url in errors:  # do not wait for the same dead host twice
        return PairStatus(pair.endpoint, pair.queue, None, errors[pair.url])
    client = clients.get(pair.url) or clients.setdefault(pair.url, connect(pair.url, 0.0))
    try:
        return PairStatus(
            pair.endpoint, pair.queue, snapshot(client, pair.queue, pair.limits), None
        )
    except REDIS_ERRORS as exc:
        if not is_outage(exc):  # this queue's keys are at fault, not the host
            return PairStatus(pair.endpoint, pair.queue, None, f"error: {explain(exc)}")
        errors[pair.url] = f"unreachable: {explain(exc)}"
        return PairStatus(pair.endpoint, pair.queue, None, errors[pair.url])


def exit_code(statuses: list[PairStatus]) -> int:
    """0 if every host answered, 1 if any could not be read."""
    return ExitCode.FAILURE if any(s.error for s in statuses) else ExitCode.OK


def as_json(statuses: list[PairStatus]) -> str:
    """JSON, strictly: a worker's lease is any client's to write, and a `NaN` copied from
    one would make the whole reading unparsable for a browser (it becomes `null`)."""
    values = _finite([_as_dict(s) for s in statuses])
    return json.dumps(values, indent=2, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _as_dict(status: PairStatus) -> dict[str, Any]:
    """A pair's status with what its snapshot derives (properties are not fields): the
    messages held back, and which of the pause and the limits hold them (`held_by`)."""
    value = asdict(status)
    snap = status.snapshot
    if snap is not None:
        value["snapshot"]["held_back"] = snap.held_back
        value["snapshot"]["flow"]["held_by"] = snap.flow.held_by
    return value


_COLUMNS = ("WORKER", "NODE", "PID", "STATE", "SUCCEEDED", "FAILED", "CURRENT", "RSS", "UPTIME")


def as_text(statuses: list[PairStatus], now: float | None = None) -> str:
    """A table per queue, for people."""
    now = time.time() if now is None else now
    lines: list[str] = []
    for status in statuses:
        lines.append(f"{status.queue} on {status.host}")
        snap = status.snapshot
        if snap is None:
            lines.append(f"  {printable(status.error or '')}")
            lines.append("")
            continue
        next_due = f" (next due {in_words(snap.next_due, now)})" if snap.next_due else ""
        lines.append(
            f"  waiting {snap.waiting}  in-flight {snap.in_flight}  "
            f"scheduled {snap.retrying}{next_due}  dead {snap.dead}  "
            "(oldest waiting: unknown, payloads carry no timestamp)"
        )
        flow = _flow_line(snap)
        if flow:
            lines.append(f"  {flow}")
        for group in snap.flow.groups:
            age = "-" if group.oldest_age is None else _duration(group.oldest_age)
            lines.append(
                f"    group {printable(group.name) or '(default)'}: waiting {group.waiting}  "
                f"running {group.running}  oldest waiting {age}"
            )
        rows: list[tuple[str, ...]] = [(*_COLUMNS, "NOTE")]
        for w in sorted(snap.workers, key=lambda w: (str(w.get("node")), str(w.get("name")))):
            rows.append(tuple(map(printable, _worker_row(w, now))))  # data any client can write
        if len(rows) == 1:
            lines.append("  no live worker")
        else:
            widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
            for row in rows:
                cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
                lines.append("  " + "  ".join([*cells, row[-1]]).rstrip())
        lines.append("")
    return "\n".join(lines)


def _flow_line(snap: Snapshot) -> str:
    """The pause and the limits, and how much of each is in use: '' if none applies."""
    flow = snap.flow
    parts = []
    if flow.paused is not None:
        paused = flow.paused
        when = paused.get("at")
        since = f" since {_clock(float(when))}" if isinstance(when, int | float) else ""
        parts.append(f"PAUSED by {printable(str(paused.get('by', '?')))}{since}")
    if flow.max_running:
        parts.append(f"running {flow.running}/{flow.max_running} (max_running)")
    if flow.rate_limit:
        parts.append(f"started {flow.started}/{flow.rate_starts} in the window ({flow.rate_limit})")
    if snap.held_back:
        why = "the pause" if flow.paused is not None else "a limit"
        parts.append(f"{snap.held_back} held back by {why}")
    return "  ".join(parts)


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _number(value: Any) -> float:
    """A figure of a published status, which any Redis client can write: 0 for anything
    that is not a finite number (a string, NaN, Infinity, 1e999)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def in_words(due: float, now: float) -> str:
    """'in 3.2s', '2.0s overdue': how far a due time is from `now`."""
    left = due - now
    span = f"{abs(left):.1f}s" if abs(left) < 60 else _duration(abs(left))
    return f"in {span}" if left >= 0 else f"{span} overdue"


def _worker_row(w: dict[str, Any], now: float) -> tuple[str, ...]:
    since = _number(w.get("since"))
    current = _number(w.get("current_age"))
    return (
        str(w.get("name", w.get("worker_id", "?"))),
        str(w.get("node", "?")),
        str(w.get("pid", "?")),
        _state(w),
        str(w.get("succeeded", "?")),
        str(w.get("failed", "?")),
        f"{current:.1f}s" if current else "-",
        f"{int(_number(w.get('rss'))) // (1024 * 1024)}MB",
        _duration(now - since) if since else "?",
        _note(w),
    )


def _state(w: dict[str, Any]) -> str:
    """The state, with how many of its `concurrency` handlers are busy when it has several."""
    state = str(w.get("state", "?"))
    concurrency = int(_number(w.get("concurrency")) or 1)
    if concurrency > 1 and state == "busy":
        return f"busy {int(_number(w.get('in_flight')))}/{concurrency}"
    return state


def _note(w: dict[str, Any]) -> str:
    """What an operator should know beyond the numbers: the Redis error a worker waits out,
    else how the slot's last worker ended."""
    if w.get("state") == "stale":
        return f"no news from its node for {w.get('stale_for')}s (manager stopped or cut off)"
    if w.get("waiting_for"):
        return f"waiting out a Redis error: {w['waiting_for']}"
    return f"last exit: {w['last_exit']}" if w.get("last_exit") else "-"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def watch(
    render: Callable[[], str], interval: float, out: TextIO, rounds: int | None = None
) -> None:
    """Redraw `render()` in place every `interval` seconds (until Ctrl-C, or `rounds`)."""
    done = 0
    while rounds is None or done < rounds:
        out.write("\x1b[H\x1b[2J" + render())
        out.flush()
        done += 1
        if rounds is None or done < rounds:
            time.sleep(interval)
