"""OpenTelemetry traces: one consumer span per delivery, exported from each worker process.

Imported only by a worker whose config says `[telemetry] tracing = true` (and by `check`,
to prove the `otel` extra is there): with tracing off, no module of OpenTelemetry is ever
loaded and the loops pay one `is None` test per message.

Everything is set by the standard `OTEL_*` environment variables, as the Python SDK's own
`opentelemetry-instrument` reads them: the exporter (`OTEL_TRACES_EXPORTER`: `otlp`, the
default, `console` or `none`), its protocol (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or
`OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc`, the default, or `http/protobuf`), endpoint, headers
and timeout (read by the exporter itself), the sampler (`OTEL_TRACES_SAMPLER`, `..._ARG`,
read by the `TracerProvider`), the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`;
the service is `rqworkers` when they name none) and the batch processor (`OTEL_BSP_*`).

The provider is made in the worker process, after the fork: a `BatchSpanProcessor`'s thread
does not survive a fork, and the manager never loads any of this. `Tracing.close` flushes
it, within `FLUSH_TIMEOUT`, on every way a worker leaves (recycle, stop signal, timeout, a
Redis error it cannot wait out).

The span follows the messaging semantic conventions (docs/tracing.md lists the attributes).
A task message carries its caller's `traceparent` and `tracestate` (`client.tracecontext`):
the span is that caller's span's child, so a caller sees one trace from submit to result. A
raw payload carries no context: its span starts a trace of its own.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from rqworkers.client import tasks
from rqworkers.config import PairSettings
from rqworkers.errors import MessageTimeout
from rqworkers.store.queue import Delivery
from rqworkers.worker.outbox import Failure

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 3.0  # seconds a leaving worker waits for its last spans to be exported
SYSTEM = "rqworkers"  # `messaging.system`: none is registered for Redis lists (docs/tracing.md)
DEFAULT_SERVICE = "rqworkers"  # `service.name` unless OTEL_SERVICE_NAME or the attributes say
# The exporters `OTEL_TRACES_EXPORTER` may name, and the OTLP protocols: module of each.
_OTLP = {
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
}
_EXPORTERS = ("otlp", "console", "none")
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C `traceparent` and `tracestate` only


def problems() -> list[str]:
    """What in the `OTEL_*` variables would keep a worker from exporting, one line each:
    found by making the exporters as a worker will (which sends nothing), then letting go.
    (The exporters read `os.environ` themselves.)"""
    environ = os.environ
    found = _name_problems(environ)
    if found:
        return found
    try:
        exporters = _exporters(environ)
    except Exception as exc:  # the SDK's own refusals: a compression, a header...
        return [f"cannot make the span exporter: {type(exc).__name__}: {exc}"]
    for exporter in exporters:
        exporter.shutdown()
    return []


def _name_problems(environ: Mapping[str, str]) -> list[str]:
    found = []
    names = _exporter_names(environ)
    unknown = [name for name in names if name not in _EXPORTERS]
    if unknown:
        found.append(
            f"OTEL_TRACES_EXPORTER={environ.get('OTEL_TRACES_EXPORTER', '')!r}: rqworkers "
            f"exports with {', '.join(_EXPORTERS)} (a comma-separated list of them)"
        )
    protocol = _protocol(environ)
    if "otlp" in names and protocol not in _OTLP:
        found.append(f"OTLP protocol {protocol!r} is not one of {', '.join(_OTLP)}")
    return found


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    """`OTEL_TRACES_EXPORTER`, a comma-separated list (`otlp` when unset)."""
    value = environ.get("OTEL_TRACES_EXPORTER") or "otlp"
    return [name.strip().lower() for name in value.split(",") if name.strip()] or ["otlp"]


def _protocol(environ: Mapping[str, str]) -> str:
    value = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    return (value or "grpc").strip()


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters the environment names (none for `none`); `ValueError` for another."""
    trouble = _name_problems(environ)
    if trouble:
        raise ValueError("; ".join(trouble))
    found: list[SpanExporter] = []
    for name in dict.fromkeys(_exporter_names(environ)):
        if name == "console":
            found.append(ConsoleSpanExporter())
        elif name == "otlp":
            module: Any = importlib.import_module(_OTLP[_protocol(environ)])
            found.append(module.OTLPSpanExporter())  # endpoint, headers...: from OTEL_*
    return found


def _resource() -> Resource:
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE}))
    return resource


class Tracing:
    """The spans of one worker process's deliveries, and the provider that exports them."""

    def __init__(self, pair: PairSettings) -> None:
        exporters = _exporters(os.environ)
        self.provider = TracerProvider(resource=_resource())  # the sampler from OTEL_*
        for exporter in exporters:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        # Global, so that the spans a handler makes are exported too, as this span's children.
        trace.set_tracer_provider(self.provider)
        self.tracer = self.provider.get_tracer("rqworkers")
        self.name = f"process {pair.queue}"
        self.tasks = pair.tasks is not None
        self.attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": pair.queue,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
        }

    def start(self, delivery: Delivery, current: bool = True) -> Traced:
        """The span of `delivery`, started now; `current`: made this thread's current span
        until `Traced.end` (the one-at-a-time loop), else `Traced.attach` in the thread
        that runs the handler (`concurrency` > 1)."""
        parent = None
        label = tasks.label(delivery.payload) if self.tasks else None
        if label is not None and label.trace is not None:
            parent = _PROPAGATOR.extract(label.trace)
        span = self.tracer.start_span(
            self.name, parent, kind=SpanKind.CONSUMER, attributes=self.attributes
        )
        if span.is_recording():  # sampled: the rest is worth its cost
            span.set_attributes(
                {
                    "messaging.message.id": delivery.id.decode(errors="replace"),
                    "messaging.message.body.size": len(delivery.payload),
                    "messaging.rqworkers.message.delivery_count": delivery.attempts + 1,
                }
            )
            if label is not None and label.task is not None:
                span.set_attribute("messaging.rqworkers.task.name", label.task)
            if label is not None and label.id is not None:
                span.set_attribute("messaging.rqworkers.task.id", label.id)
        traced = Traced(span)
        if current:
            traced.token = traced.attach()
        return traced

    def close(self) -> None:
        """Export what is left, within `FLUSH_TIMEOUT`: the worker is about to exit.

        In a thread of its own, waited for that long at most: the SDK's flush does not keep
        to its timeout (an exporter retries for `OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s), and a
        collector that does not answer must not hold a stopping worker past the manager's
        `shutdown_timeout`. The process leaves through `os._exit`, which ends the thread.
        """
        flush = threading.Thread(target=self._flush, name="flush-spans", daemon=True)
        flush.start()
        flush.join(FLUSH_TIMEOUT)
        if flush.is_alive():
            log.warning("the last spans were not exported within %gs; dropped", FLUSH_TIMEOUT)

    def _flush(self) -> None:
        try:
            self.provider.force_flush(int(FLUSH_TIMEOUT * 1000))
            self.provider.shutdown()
        except Exception as exc:  # an exporter's failure must not change the exit code
            log.warning("could not export the last spans: %s", exc)


class Traced:
    """One delivery's span, from the handler's start until its verdict."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.token: object = None

    def attach(self) -> object:
        """Make the span current in this thread (or coroutine); a token for `detach`."""
        return otel_context.attach(trace.set_span_in_context(self.span))

    def detach(self, token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    def end(self, failure: Failure | None, error: BaseException | None) -> None:
        """End the span with the delivery's outcome: `ack`, `retry` or `dead`; a failure
        sets the status to error and records the exception."""
        span = self.span
        if self.token is not None:
            self.detach(self.token)
            self.token = None
        if not span.is_recording():  # not sampled
            return
        if failure is None:
            span.set_attribute("messaging.rqworkers.outcome", "ack")
        else:
            outcome = "dead" if failure.delay is None else "retry"
            span.set_attribute("messaging.rqworkers.outcome", outcome)
        if error is not None:
            timeout = isinstance(error, MessageTimeout)
            span.set_attribute("error.type", "timeout" if timeout else type(error).__qualname__)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, _describe(error)))
        span.end()


def _describe(error: BaseException) -> str:
    """The status description: `Type: message`, which user code can make raise."""
    try:
        text = str(error)
    except Exception:
        text = ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text[:500]
