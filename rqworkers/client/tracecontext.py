"""The caller's trace context in a task message: W3C `traceparent` and `tracestate`.

A producer whose program traces with OpenTelemetry sends, in each task message's `trace`
field, the context of the span active when it submits, and the worker's span joins that
trace as its child. Nothing here needs the `otel` extra: if the program has not loaded
OpenTelemetry's API, no span can be active and nothing is sent (nor imported).

A worker reads the field leniently: anyone who can push writes task messages, so a `trace`
that is not an object of well-formed, bounded W3C values is dropped, and the task runs
without it. It never refuses a message, nor lets a hostile one grow a span.
"""

from __future__ import annotations

import re
import sys
from typing import Any

# W3C Trace Context, level 1: version 00 to fe, a trace id and a parent id not all zeros.
_TRACEPARENT = re.compile(
    r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"
)
# At most 32 `key=value` members, comma separated, of printable ASCII; 512 characters is
# what a vendor may keep (W3C: propagate at least 512).
_TRACESTATE_LIMIT = 512
_TRACESTATE = re.compile(r"^[\x20-\x7e]*$")


def current() -> dict[str, str] | None:
    """The context of the caller's active span, to send with a task; None when there is
    none, or when this program never loaded OpenTelemetry (it is not loaded here)."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return None
    if not api.get_current_span().get_span_context().is_valid:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return read(carrier)


def read(value: Any) -> dict[str, str] | None:
    """`value` as a trace context if it is a well-formed one, else None: a `traceparent`,
    and a `tracestate` when it has one that is well-formed. Other keys are dropped."""
    if not isinstance(value, dict):
        return None
    parent = value.get("traceparent")
    if not isinstance(parent, str) or len(parent) != 55 or not _TRACEPARENT.fullmatch(parent):
        return None
    found = {"traceparent": parent}
    state = value.get("tracestate")
    if (
        isinstance(state, str)
        and state
        and len(state) <= _TRACESTATE_LIMIT
        and _TRACESTATE.fullmatch(state)
        and state.count(",") < 32
    ):
        found["tracestate"] = state
    return found
