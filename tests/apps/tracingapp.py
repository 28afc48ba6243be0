"""Handlers and tasks for the tracing tests (tests/test_tracing.py): what a worker process
has loaded, and a span of the handler's own, made with OpenTelemetry's API alone."""

from __future__ import annotations

import json
import sys
import time

from testapp import client


def loaded() -> list[str]:
    """The modules of OpenTelemetry, and of rqworkers' tracing, this process has loaded."""
    return sorted(
        name
        for name in sys.modules
        if name.split(".")[0] == "opentelemetry" or name == "rqworkers.worker.tracing"
    )


def modules(message: bytes) -> None:
    """Records what this worker process has loaded of OpenTelemetry (`loaded`)."""
    client().rpush("tracing:loaded", json.dumps(loaded()))


def inner(tag: str) -> str:
    """A task that makes a span of its own, which must be the delivery's span's child."""
    from opentelemetry import trace

    with trace.get_tracer("tracingapp").start_as_current_span(f"inner {tag}"):
        return tag


def slow(seconds: float) -> None:
    time.sleep(seconds)


async def async_inner(message: bytes) -> None:
    """An `async def` handler that makes a span of its own, named after the message."""
    from opentelemetry import trace

    with trace.get_tracer("tracingapp").start_as_current_span(f"inner {message.decode()}"):
        if message == b"fail":
            raise RuntimeError("async failure")
