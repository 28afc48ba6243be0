"""The fleet bench, small: two real nodes, one killed while it holds messages, and not one
message lost or handled twice.

Runs `python -m bench.fleet` for real (redis-servers, two `rqworkers run` managers, a
SIGKILL of one whole node); the full measurement (up to 200 nodes) is in bench/RESULTS.md.
"""

from __future__ import annotations

import json

import pytest

from tests.support import run_bench

ARGS = ["--nodes", "2", "--redis", "single", "--lease-ttl", "2", "--reclaim-interval", "0.5",
        "--window", "1", "--settle", "1", "--monitor", "1", "--json"]  # fmt: skip
BUDGET = 120.0  # seconds; a run takes about 15 s on 2 cores


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(BUDGET + 30)
def test_two_nodes_one_lost_nothing_lost_nothing_twice() -> None:
    code, out, err = run_bench(["bench.fleet", *ARGS], BUDGET, "the fleet bench")
    assert out.strip(), f"no report (exit code {code}):\n{err}"
    report = json.loads(out.strip().splitlines()[-1])
    [row] = report["rows"]
    assert row["produced"] > 0 and row["handled"] == row["produced"], err
    assert (row["lost"], row["duplicates"]) == (0, 0), err
    assert row["victims"] == 1 and row["reclaimed_messages"] >= 1, err
    assert row["reclaim_seconds"] is not None, f"not reclaimed: {row['notes']}\n{err}"
    assert row["idle_commands_per_s"] > 0 and row["keeper_commands_per_s"] > 0, err
    assert report["ok"] and code == 0, err
