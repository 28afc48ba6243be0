"""A rate limit as an operator writes it, `"100/s"`, taken apart once.

`rate_limit = "N/s"`, `"N/m"` or `"N/h"` allows at most N handler starts in any window of
that length: a sliding window, so that no two fixed windows can let 2N through around
their shared edge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"s": 1, "m": 60, "h": 3600}
_FORM = re.compile(r"(\d{1,9})/([smh])")
MAX_STARTS = 10**6  # per window: the window's log of starts is a sorted set that size


@dataclass(frozen=True)
class Rate:
    """At most `starts` handler starts in any `seconds` window."""

    starts: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """`ValueError` naming the expected form for anything but `N/s`, `N/m`, `N/h` with
        N from 1 to a million."""
        match = _FORM.fullmatch(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not a rate: write N/s, N/m or N/h, such as '100/s'")
        starts = int(match[1])
        if not 1 <= starts <= MAX_STARTS:
            raise ValueError(f"{text!r}: N must be from 1 to {MAX_STARTS}")
        return cls(starts, _UNITS[match[2]])

    def __str__(self) -> str:
        unit = {v: k for k, v in _UNITS.items()}[self.seconds]
        return f"{self.starts}/{unit}"
