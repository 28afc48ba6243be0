"""The fault-injection harness, short: every kind of fault, and not one message lost.

Runs `python -m bench.chaos` for real (two managers, a redis-server, SIGKILLs, SIGSTOPs,
Redis restarts, a node lost for good) with a fixed seed, so that the fault plan is the same
every time and includes each kind at least once.
"""

from __future__ import annotations

import json

import pytest

from bench.chaos import FAULT_KINDS
from tests.support import run_bench

ARGS = ["--messages", "1500", "--faults", "12", "--duration", "20", "--seed", "7"]
BUDGET = 240.0  # seconds; a run takes about 25 s on 2 cores


@pytest.mark.timeout(BUDGET + 60)
@pytest.mark.parametrize(
    "extra",
    [
        [],
        # Each run takes about 25 s: all but the first run only with `-m slow` (or `-m ""`),
        # to keep the default suite within its 15-minute budget on 2 cores.
        pytest.param(["--distinct", "10", "--max-attempts", "3"], marks=pytest.mark.slow),
        pytest.param(["--concurrency", "20"], marks=pytest.mark.slow),
        pytest.param(["--max-running", "3", "--rate-limit", "400/s"], marks=pytest.mark.slow),
        pytest.param(["--prioritised", "0.5", "--delayed", "0.2"], marks=pytest.mark.slow),
    ],
    ids=[
        "unique-payloads",
        "ten-repeating-payloads",
        "concurrency-20",
        "flow-limits",
        "prioritised-and-delayed",
    ],
)
@pytest.mark.service
def test_no_message_is_lost_under_every_kind_of_fault(extra: list[str]) -> None:
    """With repeating payloads too: twins are separate messages, so with no poison pushed
    none is dead-lettered, even with only 3 attempts each."""
    args = ["bench.chaos", *ARGS, *extra, "--drain-timeout", "90", "--json"]
    code, out, err = run_bench(args, BUDGET, "the chaos run")
    assert out.strip(), f"no report (exit code {code}):\n{err}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["produced"] == 1500, err
    assert report["lost"] == 0, f"lost messages: {report['lost_sample']}\n{err}"
    assert report["drained"], f"not drained: {report['stuck']}\n{err}"
    assert report["handled"] + report["dead_lettered"] == report["produced"], err
    if extra:
        assert report["dead_lettered"] == 0, err
    if "--prioritised" in extra:
        assert report["prioritised"] > 0 and report["early"] == 0, err
    if "--max-running" in extra:  # and under every fault, the limits held
        assert report["limits_held"], err
        assert report["max_running_seen"] <= 3 and report["most_starts_in_window"] <= 400
    assert report["unexpected_payloads"] == 0, err
    missing = [kind for kind in FAULT_KINDS if report["faults"].get(kind, 0) < 1]
    assert not missing, f"fault kinds never injected: {missing}\n{err}"
    assert code == 0, err
