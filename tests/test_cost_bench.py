"""`python -m bench.cost`, smoke-sized: the core cases run, every figure is there and sane.

Runs the bench for real (a private redis-server, the yardsticks, `rqworkers run` at prefetch
1 and 100, one and two processes) with `--quick --only core`: about 5 s on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.support import REPO, run_bench

BUDGET = 120.0


@pytest.mark.timeout(BUDGET + 60)
@pytest.mark.service
def test_the_core_cases_report_throughput_and_redis_cpu_per_message() -> None:
    code, out, err = run_bench(
        ["bench.cost", "--quick", "--only", "core", "--json"], BUDGET, "the cost bench"
    )
    assert code == 0, err
    report = json.loads(out)
    cases = report["cases"]
    assert set(cases) == {
        "(b) 100 B",
        "p1 100 B",
        "(c) 100 B",
        "p100 100 B",
        "(c) 100 B, 2 proc",
        "p100 100 B, 2 proc",
        "(c) + worker CPU 100 B",
        "(c) + worker CPU 100 B, 2 proc",
    }
    for name, samples in cases.items():
        assert len(samples) == 1, name
        (sample,) = samples
        assert sample["rate"] > 0, name
        # Some Redis CPU per message, and less than a whole millisecond of it: the edges of
        # the window are those of the drain, not of the service's start.
        assert 0 < sample["redis_us"] < 1000, (name, sample)
        # The yardsticks' clients are measured as the workers are.
        assert sample["worker_core"] > 0, (name, sample)
    # The burn is what the worker spent beyond (c)'s client in the same round, on both.
    per_message = {
        name: samples[0]["worker_core"] / samples[0]["rate"] * 1e6
        for name, samples in cases.items()
    }
    burn = max(0.0, per_message["p100 100 B"] - per_message["(c) 100 B"])
    for name in ("(c) + worker CPU 100 B", "(c) + worker CPU 100 B, 2 proc"):
        assert cases[name][0]["extra"].get("burn_us", 0.0) == pytest.approx(burn), name
    rendered = subprocess.run(
        [sys.executable, "-m", "bench.cost", "--render", "/dev/stdin"],
        cwd=REPO,
        input=out,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "| prefetch 1 / (b) |" in rendered.stdout
    assert "| prefetch 100 / (c) |" in rendered.stdout
    assert "| 2 proc scaling, prefetch 100 / (c) + worker CPU's own |" in rendered.stdout


def test_a_burning_yardstick_spends_about_the_cpu_asked_per_message() -> None:
    from bench.yardsticks import _handler

    for burn_us in (5.0, 50.0):
        handle = _handler(0.0, burn_us)
        started = time.process_time()
        for _ in range(2_000):
            handle(b"x")
        spent_us = (time.process_time() - started) / 2_000 * 1e6
        # Calibrated on this machine a moment ago; a busy VM's preemptions only add to it.
        assert burn_us * 0.5 < spent_us < burn_us * 3, (burn_us, spent_us)


@pytest.mark.timeout(BUDGET + 60)
@pytest.mark.service
def test_the_burn_group_runs_c_at_each_cpu_per_message_on_one_and_two_processes() -> None:
    code, out, err = run_bench(
        ["bench.cost", "--quick", "--only", "burn", "--json"], BUDGET, "the cost bench"
    )
    assert code == 0, err
    cases = json.loads(out)["cases"]
    from bench.cost import BURNS

    expected = {f"(c) + {us:g} µs 100 B{suffix}" for us in BURNS for suffix in ("", ", 2 proc")}
    assert set(cases) == expected
    client_us = {}
    for name, (sample,) in cases.items():
        assert sample["rate"] > 0 and sample["extra"]["burn_us"] > 0, name
        client_us[name] = sample["worker_core"] / sample["rate"] * 1e6
    # What the handlers burn shows in the clients' own CPU a message.
    low, high = f"(c) + {min(BURNS):g} µs 100 B", f"(c) + {max(BURNS):g} µs 100 B"
    assert client_us[high] - client_us[low] > (max(BURNS) - min(BURNS)) / 2, client_us
