"""How close handler starts came to a limit: what the chaos and flow benches (and the flow
tests) read from the start and end times their handlers log."""

from __future__ import annotations

from collections.abc import Sequence


def most_in_window(times: Sequence[float], seconds: float) -> int:
    """The most of `times` (sorted) in any window [t, t + seconds): every start opens one."""
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= seconds:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_overlapping(spans: Sequence[tuple[float, ...]]) -> int:
    """The most of `spans` (start, end) that were open at one instant."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = running = 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    return most
