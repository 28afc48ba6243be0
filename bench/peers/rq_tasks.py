"""RQ jobs: `noop` for SimpleWorker (jobs run in the worker), `noop_forked` for Worker."""

from __future__ import annotations

from typing import Any

from rq import get_current_job

from bench.peers.common import RECORDER, hit_shared


def noop(payload: str) -> None:
    RECORDER.hit()


def noop_forked(payload: str) -> None:
    job = get_current_job()
    assert job is not None
    hit_shared(job.connection)


def echo(value: Any) -> Any:
    """For round trips with results (`bench/peers/roundtrip.py`)."""
    return value
