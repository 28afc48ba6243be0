"""`python -m bench.flow`'s accuracy case, tiny: the limits hold with the bench's own fleet.

Runs the bench for real (two managers, each one process of 4 handler threads, on one
redis-server, with a bookkeeping redis-server beside) and reads its JSON report, so the
bench's measurement and the limits are checked together: 8 handlers share `max_running`
5, then a rate of 50 starts a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.flow import MAX_RUNNING, RATE
from tests.support import REPO

ARGS = ["--only", "accuracy", "--tiny", "--topology", "single", "--json"]


@pytest.mark.service
@pytest.mark.timeout(120)
def test_the_flow_bench_measures_the_limits_held() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.flow", *ARGS],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.stdout.strip(), f"no report (exit code {out.returncode}):\n{out.stderr}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {row["limit"].split()[0]: row for row in report["accuracy"]}
    running, rate = rows["max_running"], rows["rate_limit"]
    for row in (running, rate):
        assert row["handled"] == row["messages"] == row["starts"], row
    # Never above the limit, by the shared counter and by the handlers' own times; and
    # reached, so the fleet (8 handlers) did press against it.
    assert running["peak_counted"] == MAX_RUNNING, running
    assert running["peak_overlap"] <= MAX_RUNNING, running
    assert rate["most_in_window"] == RATE, f"at most {RATE} in any 1 s, and reached: {rate}"
    assert rate["peak_counted"] > MAX_RUNNING, "the rate case has no max_running"
    assert out.returncode == 0, out.stderr
