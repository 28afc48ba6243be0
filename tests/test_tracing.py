"""OpenTelemetry traces (docs/tracing.md): the `otel` extra, `[telemetry] tracing`, one
consumer span per delivery exported over OTLP from the worker processes, and the caller's
trace context carried by task messages.

The service tests export to a real OTLP/HTTP receiver run here (`Receiver`), which decodes
what the workers send with the protobuf classes of `opentelemetry-proto`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from bench.redisproc import wait_for
from rqworkers import Executor, Producer
from rqworkers.client import tasks, tracecontext
from rqworkers.errors import MessageTimeout, Refused
from rqworkers.store.queue import Delivery
from rqworkers.worker.outbox import Failure
from rqworkers.worker.tracing import FLUSH_TIMEOUT, Tracing
from tests.support import APPS, REPO, RedisServer, run_cli, task_pair, write_config

TASKS = ["taskapp:*", "tracingapp:*"]
WORKERS = (
    '[hosts]\nh = "redis://127.0.0.1:1/0"\n[[workers]]\nhost = "h"\nqueue = "q"\nhandler = "m:f"\n'
)
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# -- an OTLP/HTTP receiver ---------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status: int
    events: tuple[str, ...]


class Receiver:
    """Accepts POST /v1/traces (OTLP/HTTP, protobuf) and keeps every span it decodes."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Received(
                            service=str(resource.get("service.name")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status=span.status.code,
                            events=tuple(event.name for event in span.events),
                        )
                    )
        with self.lock:
            self.spans.extend(found)

    def named(self, name: str) -> list[Received]:
        with self.lock:
            return [span for span in self.spans if span.name == name]

    def where(self, key: str, value: Any) -> list[Received]:
        with self.lock:
            return [span for span in self.spans if span.attributes.get(key) == value]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.thread.start()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()


def _exporting_to(receiver: Receiver, monkeypatch: pytest.MonkeyPatch, delay_ms: int) -> None:
    """The service's workers export to `receiver`, `delay_ms` after a span ends at most."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "traced-test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", str(delay_ms))
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)


# -- the service, exporting over OTLP ----------------------------------------------------------


def test_a_traced_service_exports_one_trace_from_submit_to_the_workers_span(
    service: Any, redis_server: RedisServer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _exporting_to(receiver, monkeypatch, delay_ms=100)
    service([task_pair(max_attempts=1, tasks=TASKS)], telemetry={"tracing": True}).wait_workers(1)
    caller = TracerProvider().get_tracer("caller")
    with Executor(redis_server.url, "tasks") as executor:
        with caller.start_as_current_span("caller") as span:
            assert executor.submit("taskapp:add", 2, 3).result(timeout=30) == 5
            context = span.get_span_context()
            fails = executor.submit("taskapp:fail", "boom")
        with pytest.raises(tasks.TaskError):
            fails.result(timeout=30)
        assert executor.submit("tracingapp:inner", "x").result(timeout=30) == "x"

    added = wait_for(lambda: receiver.where("messaging.rqworkers.task.name", "taskapp:add"), 20)
    (span_of_add,) = added
    assert span_of_add.service == "traced-test"
    assert span_of_add.name == "process tasks"
    assert span_of_add.kind == 5  # SPAN_KIND_CONSUMER
    attributes = span_of_add.attributes
    assert attributes["messaging.destination.name"] == "tasks"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.system"] == "rqworkers"
    assert attributes["messaging.rqworkers.outcome"] == "ack"
    assert attributes["messaging.rqworkers.message.delivery_count"] == 1
    assert attributes["messaging.message.id"]
    # One trace: the worker's span is the child of the caller's, across the queue.
    assert span_of_add.trace_id == format(context.trace_id, "032x")
    assert span_of_add.parent_id == format(context.span_id, "016x")

    failed = wait_for(lambda: receiver.where("messaging.rqworkers.task.name", "taskapp:fail"), 20)
    assert failed[0].status == 2  # STATUS_CODE_ERROR
    assert failed[0].attributes["messaging.rqworkers.outcome"] == "dead"
    assert failed[0].attributes["error.type"] == "ValueError"
    assert "exception" in failed[0].events
    assert failed[0].trace_id == span_of_add.trace_id  # submitted inside the caller's span

    # Outside any span, a task starts a trace of its own; the spans its code makes with
    # OpenTelemetry's API alone are exported too, as the delivery's span's children.
    inner = wait_for(lambda: receiver.named("inner x"), 20)[0]
    (outer,) = receiver.where("messaging.rqworkers.task.name", "tracingapp:inner")
    assert inner.parent_id == outer.span_id and inner.trace_id == outer.trace_id
    assert outer.trace_id != span_of_add.trace_id and not outer.parent_id


def test_handler_threads_and_coroutines_run_inside_their_deliverys_span(
    service: Any, redis_server: RedisServer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `concurrency` > 1 a handler runs in a pool thread or as a coroutine: each sees
    its own delivery's span as current, so the spans it makes are that span's children."""
    _exporting_to(receiver, monkeypatch, delay_ms=100)
    threads = task_pair(concurrency=3, tasks=TASKS)
    coroutines = {"queue": "async", "handler": "tracingapp:async_inner", "concurrency": 3}
    coroutines["max_attempts"] = 1
    service([threads, coroutines], telemetry={"tracing": True}).wait_workers(2)
    producer = Producer(redis_server.url)
    caller = TracerProvider().get_tracer("caller")
    with caller.start_as_current_span("caller") as span:
        for tag in "abc":
            producer.submit("tasks", "tracingapp:inner", (tag,))
        trace_id = format(span.get_span_context().trace_id, "032x")
    producer.push("async", b"d", b"e", b"fail")
    for tag in "abcde":
        inner = wait_for(lambda tag=tag: receiver.named(f"inner {tag}"), 20)[0]
        (outer,) = [
            s
            for s in receiver.named(f"process {'tasks' if tag < 'd' else 'async'}")
            if s.span_id == inner.parent_id
        ]
        assert outer.trace_id == inner.trace_id
        if tag < "d":
            assert outer.trace_id == trace_id
    (failed,) = wait_for(lambda: receiver.where("messaging.rqworkers.outcome", "dead"), 20)
    assert failed.status == 2 and failed.attributes["error.type"] == "RuntimeError"
    assert receiver.named("inner fail")[0].parent_id == failed.span_id


def _loaded_by(code: str) -> set[str]:
    """What a fresh interpreter has loaded of OpenTelemetry after running `code`."""
    script = f"import json, tracingapp; {code}; print(json.dumps(tracingapp.loaded()))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_with_tracing_off_a_worker_loads_nothing_of_opentelemetry_itself(
    service: Any, redis_server: RedisServer
) -> None:
    """redis-py 8 loads OpenTelemetry's API and metrics SDK at `import redis` when they are
    installed (its own, opt-in, command metrics): beyond that, a worker loads nothing, and
    no tracer provider, exporter or span of ours."""
    service([{"queue": "raw", "handler": "tracingapp:modules"}]).wait_workers(1)
    Producer(redis_server.url).push("raw", b"which modules?")
    client = redis_server.client()
    (found,) = wait_for(lambda: client.lrange("tracing:loaded", 0, -1), 20)
    loaded = set(json.loads(found))
    assert loaded <= _loaded_by("import redis")
    assert not {"rqworkers.worker.tracing", "opentelemetry.sdk.trace"} & loaded


def test_sending_a_task_loads_nothing_of_opentelemetry() -> None:
    """A program that does not trace pays nothing for it: no import beyond redis-py's."""
    send = "from rqworkers import Producer; from rqworkers.client import tasks;"
    send += "tasks.encode(Producer.task('m:f', (1,)))"
    assert _loaded_by(send) <= _loaded_by("import redis")
    assert "opentelemetry.trace.propagation.tracecontext" not in _loaded_by(send)


def test_a_worker_flushes_its_last_spans_on_recycle_timeout_and_sigterm(
    service: Any, redis_server: RedisServer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exported every 10 minutes, the spans arrive only because each way out flushes."""
    _exporting_to(receiver, monkeypatch, delay_ms=600_000)
    pair = task_pair(max_requests=2, max_attempts=1, timeout=1.0, tasks=TASKS)
    svc = service([pair], telemetry={"tracing": True})
    svc.wait_workers(1)
    producer = Producer(redis_server.url)

    def spans_of(task: str) -> list[Received]:
        return receiver.where("messaging.rqworkers.task.name", task)

    producer.submit("tasks", "taskapp:add", (1, 1))
    producer.submit("tasks", "taskapp:square", (3,))  # the second: max_requests recycles
    wait_for(lambda: spans_of("taskapp:add") and spans_of("taskapp:square"), 20)
    producer.submit("tasks", "tracingapp:slow", (30,))  # past `timeout`: the worker recycles
    (timed_out,) = wait_for(lambda: spans_of("tracingapp:slow"), 20)
    assert timed_out.status == 2 and timed_out.attributes["error.type"] == "timeout"
    assert timed_out.attributes["messaging.rqworkers.outcome"] == "dead"
    client = redis_server.client()
    wait_for(lambda: svc.workers(), 20)
    producer.submit("tasks", "taskapp:count", (1, 2, 3))
    wait_for(lambda: client.llen("tasks") == 0 and not client.keys("tasks:processing:*"), 20)
    svc.signal(signal.SIGTERM)
    assert svc.wait() == 0
    assert wait_for(lambda: spans_of("taskapp:count"), 10)


def test_a_collector_that_never_answers_holds_a_stopping_worker_3_seconds_at_most(
    service: Any, redis_server: RedisServer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exporter would wait 10 s for it (and the SDK's flush keeps to no timeout)."""
    import socket

    with socket.socket() as hole:  # listens, never reads: a POST to it hangs
        hole.bind(("127.0.0.1", 0))
        hole.listen()
        _exporting_to(receiver, monkeypatch, delay_ms=600_000)
        monkeypatch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{hole.getsockname()[1]}"
        )
        svc = service([task_pair(tasks=TASKS)], telemetry={"tracing": True})
        svc.wait_workers(1)
        producer = Producer(redis_server.url)
        reply = producer.reply_key("tasks")
        producer.submit("tasks", "taskapp:add", (1, 2), reply_to=reply)
        assert producer.wait_reply(reply, timeout=20) == 3
        began = time.monotonic()
        svc.signal(signal.SIGTERM)
        assert svc.wait() == 0
        assert time.monotonic() - began < FLUSH_TIMEOUT + 2
    assert "the last spans were not exported within 3s; dropped" in svc.output()


def test_a_reload_that_turns_tracing_on_replaces_the_workers(
    service: Any, redis_server: RedisServer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _exporting_to(receiver, monkeypatch, delay_ms=100)
    svc = service([task_pair(tasks=TASKS)], telemetry={"tracing": False})
    (first,) = svc.wait_workers(1)
    svc.config_path.write_text(
        svc.config_path.read_text().replace("tracing = false", "tracing = true")
    )
    svc.signal(signal.SIGHUP)
    wait_for(lambda: [w for w in svc.workers() if w.pid != first.pid], 20)
    Producer(redis_server.url).submit("tasks", "taskapp:add", (1, 2))
    assert wait_for(lambda: receiver.where("messaging.rqworkers.task.name", "taskapp:add"), 20)
    assert "[telemetry] changed" in svc.output()


# -- check and run, without the extra ----------------------------------------------------------


def _without_the_extra(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import opentelemetry` fails, as where the extra is missing:
    a package of that name that raises comes first on the path (and shadows the real one,
    a namespace package)."""
    hidden = tmp_path / "hidden"
    (hidden / "opentelemetry").mkdir(parents=True)
    (hidden / "opentelemetry" / "__init__.py").write_text(
        'raise ImportError("No module named \'opentelemetry\'", name="opentelemetry")\n'
    )
    paths = [str(hidden), str(APPS), str(REPO)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.mark.service
def test_tracing_on_without_the_extra_is_a_check_error_and_run_refuses_to_start(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = write_config(
        tmp_path / "traced.toml",
        redis_server.url,
        [{"queue": "raw", "handler": "tracingapp:modules"}],
        telemetry={"tracing": True},
    )
    env = _without_the_extra(tmp_path)
    checked = run_cli("check", "-c", str(path), env=env)
    assert checked.returncode == 2, checked.stderr
    (line,) = [line for line in checked.stderr.splitlines() if "telemetry.tracing" in line]
    assert line.startswith(f"{path}: telemetry.tracing: tracing is on but OpenTelemetry")
    assert "pip install 'rqworkers[otel]'" in line
    assert "Traceback" not in checked.stderr

    ran = run_cli("run", "-c", str(path), env=env)
    assert ran.returncode == 2
    assert "pip install 'rqworkers[otel]'" in ran.stderr
    assert not redis_server.client().keys("raw:lease:*")  # no worker started

    # The same file with the extra there, or tracing off without it, is fine.
    assert run_cli("check", "-c", str(path)).returncode == 0
    path.write_text(path.read_text().replace("tracing = true", "tracing = false"))
    assert run_cli("check", "-c", str(path), env=env).returncode == 0


@pytest.mark.service
def test_an_exporter_the_otel_variables_cannot_name_is_a_check_error(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = write_config(
        tmp_path / "traced.toml",
        redis_server.url,
        [{"queue": "raw", "handler": "tracingapp:modules"}],
        telemetry={"tracing": True},
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)])}
    checked = run_cli("check", "-c", str(path), env={**env, "OTEL_TRACES_EXPORTER": "zipkin"})
    assert checked.returncode == 2
    assert f"{path}: telemetry.tracing: OTEL_TRACES_EXPORTER='zipkin'" in checked.stderr
    checked = run_cli("check", "-c", str(path), env={**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "udp"})
    assert checked.returncode == 2
    assert "OTLP protocol 'udp' is not one of grpc, http/protobuf" in checked.stderr


def test_the_otel_variables_are_checked_as_a_worker_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rqworkers.worker.tracing import problems

    def found(**variables: str) -> list[str]:
        for name in ("TRACES_EXPORTER", "EXPORTER_OTLP_PROTOCOL", "EXPORTER_OTLP_COMPRESSION"):
            monkeypatch.delenv(f"OTEL_{name}", raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(f"OTEL_{name}", value)
        return problems()

    assert found() == []
    assert found(TRACES_EXPORTER=" OTLP , console") == []
    assert found(TRACES_EXPORTER="none", EXPORTER_OTLP_PROTOCOL="x") == []
    assert found(EXPORTER_OTLP_PROTOCOL="http/protobuf") == []
    (line,) = found(TRACES_EXPORTER="otlp,zipkin")
    assert "OTEL_TRACES_EXPORTER='otlp,zipkin'" in line
    (line,) = found(EXPORTER_OTLP_COMPRESSION="bogus")
    assert line.startswith("cannot make the span exporter: ") and "bogus" in line


def test_the_telemetry_section_is_validated_naming_the_field(tmp_path: Path) -> None:
    from rqworkers.config import load
    from rqworkers.errors import ConfigError

    for section, problem in [
        ('tracing = "yes"', "telemetry.tracing"),
        ("tracing = true\nsampler = 1", "telemetry.sampler"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(f"[telemetry]\n{section}\n{WORKERS}")
        with pytest.raises(ConfigError) as caught:
            load(path, environ={})
        assert str(path) in str(caught.value) and problem in str(caught.value)
    path.write_text(f"[telemetry]\ntracing = true\n{WORKERS}")
    assert load(path, environ={}).telemetry.tracing is True


# -- the client side: what a task message carries ----------------------------------------------


def test_a_task_message_carries_the_callers_trace_context_only_inside_a_span() -> None:
    assert Producer.task("m:f").trace is None  # no span active
    tracer = TracerProvider().get_tracer("caller")
    with tracer.start_as_current_span("caller") as span:
        message = Producer.task("m:f")
        context = span.get_span_context()
    assert message.trace is not None
    assert message.trace["traceparent"] == (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )
    sent = json.loads(tasks.encode(message))
    assert sent["trace"] == message.trace
    assert tasks.parse(tasks.encode(message)).trace == message.trace


@pytest.mark.parametrize(
    "trace",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # not an object
        {"traceparent": "x" * 10_000_000},
        {"traceparent": PARENT.upper()},
        {"traceparent": "ff" + PARENT[2:]},  # the forbidden version
        {"traceparent": "00-" + "0" * 32 + PARENT[35:]},  # an all-zero trace id
        {"traceparent": PARENT[:-19] + "0" * 16 + "-01"},  # an all-zero parent id
        {"traceparent": PARENT + "-extra"},
        {"traceparent": 42},
        {"tracestate": "a=b"},
        [PARENT],
        None,
    ],
    ids=repr,
)
def test_a_malformed_or_huge_trace_context_is_ignored_and_the_task_still_runs(
    trace: object,
) -> None:
    message = json.dumps({"task": "m:f", "trace": trace}).encode()
    assert tasks.parse(message).trace is None
    label = tasks.label(message)
    assert label is not None and label.task == "m:f" and label.trace is None


def test_a_tracestate_is_kept_only_when_well_formed_and_bounded() -> None:
    assert tracecontext.read({"traceparent": PARENT, "tracestate": "a=1,b=2"}) == {
        "traceparent": PARENT,
        "tracestate": "a=1,b=2",
    }
    for state in ["a" * 513, "a=\u00e9", "a=1\n", 7, ",".join(["k=v"] * 33), ""]:
        assert tracecontext.read({"traceparent": PARENT, "tracestate": state}) == {
            "traceparent": PARENT
        }
    assert tracecontext.read({"traceparent": PARENT, "other": "x"}) == {"traceparent": PARENT}


def test_a_span_leaves_out_a_huge_task_name_or_id() -> None:
    message = json.dumps({"task": "m:" + "f" * 10_000, "id": "i" * 10_000}).encode()
    assert tasks.label(message) == tasks.Label(None, None, None)
    assert tasks.label(b"[" * 100_000) is None  # too deep for the parser: no label, no error


def test_other_fields_are_still_refused_beside_a_trace() -> None:
    message = json.dumps({"task": "m:f", "trace": {"traceparent": PARENT}, "x": 1}).encode()
    with pytest.raises(Refused, match="unknown field"):
        tasks.parse(message)


def test_a_producer_pushes_task_messages_with_their_context() -> None:
    import fakeredis

    producer = Producer.__new__(Producer)
    producer.client = fakeredis.FakeRedis()
    with TracerProvider().get_tracer("caller").start_as_current_span("caller"):
        made = Producer.task("m:f", (1,))
    producer.push("q", made, b"raw")
    raw, sent = producer.client.lrange("q", 0, -1)
    assert raw == b"raw"
    assert tasks.parse(sent).trace == made.trace is not None


# -- the worker's span, in process -------------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    from rqworkers.config import PairSettings

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    pair = PairSettings(queue="jobs", url="redis://127.0.0.1:1/0", host="h", tasks=("m:*",))
    tracing = Tracing(pair)
    memory = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(memory))
    yield tracing, memory
    tracing.close()


def test_a_delivery_span_names_the_task_and_joins_the_message_context(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, memory = spans
    message = json.dumps({"task": "m:f", "id": "t1", "trace": {"traceparent": PARENT}})
    traced = tracing.start(Delivery(b"d1", 2, message.encode()))
    traced.end(None, None)
    (span,) = memory.get_finished_spans()
    assert span.name == "process jobs"
    assert dict(span.attributes or {}) == {
        "messaging.system": "rqworkers",
        "messaging.destination.name": "jobs",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": "d1",
        "messaging.message.body.size": len(message),
        "messaging.rqworkers.message.delivery_count": 3,
        "messaging.rqworkers.task.name": "m:f",
        "messaging.rqworkers.task.id": "t1",
        "messaging.rqworkers.outcome": "ack",
    }
    assert format(span.context.trace_id, "032x") == PARENT[3:35]
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT[36:52]
    assert span.status.status_code == StatusCode.UNSET


def test_a_failed_or_timed_out_delivery_span_is_an_error_with_its_exception(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, memory = spans
    delivery = Delivery(b"d2", 0, b"not json")
    error = ValueError("bad")
    tracing.start(delivery).end(Failure(delivery, {}, 1.0, error), error)
    timeout = MessageTimeout(5)
    tracing.start(delivery).end(Failure(delivery, {}, None, timeout), timeout)
    retried, dead = memory.get_finished_spans()
    assert retried.status.status_code == StatusCode.ERROR
    assert retried.status.description == "ValueError: bad"
    assert retried.attributes is not None and retried.attributes["error.type"] == "ValueError"
    assert retried.attributes["messaging.rqworkers.outcome"] == "retry"
    assert "messaging.rqworkers.task.name" not in retried.attributes  # not a task message
    assert [event.name for event in retried.events] == ["exception"]
    assert dead.attributes is not None and dead.attributes["error.type"] == "timeout"
    assert dead.attributes["messaging.rqworkers.outcome"] == "dead"
    assert dead.status.status_code == StatusCode.ERROR
