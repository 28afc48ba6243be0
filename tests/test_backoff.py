"""`common.backoff`: the exponential delay with free failures, a cap and jitter."""

from __future__ import annotations

from rqworkers.common.backoff import ExponentialBackoff


def test_backoff_doubles_from_base() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=100.0)
    assert [backoff.compute(n) for n in range(0, 6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_free_failures_cost_nothing() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=100.0, free=1)
    assert [backoff.compute(n) for n in range(-1, 5)] == [0.0, 0.0, 0.0, 0.5, 1.0, 2.0]
    three_free = ExponentialBackoff(base=1.0, cap=100.0, free=3)
    assert [three_free.compute(n) for n in range(0, 6)] == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]


def test_backoff_is_capped_even_after_very_many_failures() -> None:
    backoff = ExponentialBackoff(base=0.5, cap=30.0, free=1)
    assert backoff.compute(7) == 16.0
    assert backoff.compute(8) == 30.0
    assert backoff.compute(1000) == 30.0
    assert backoff.compute(10**9) == 30.0  # no OverflowError from 2**huge


def test_jitter_takes_off_at_most_its_fraction_and_never_passes_the_cap() -> None:
    backoff = ExponentialBackoff(base=1.0, cap=8.0, jitter=0.25)
    for failures, plain in ((1, 1.0), (3, 4.0), (10, 8.0)):
        samples = [backoff.compute(failures) for _ in range(300)]
        assert all(plain * 0.75 <= s <= plain for s in samples), (failures, min(samples))
        assert len(set(samples)) > 1, "jitter must actually vary the delay"
        assert min(samples) < plain * 0.9  # the range is used, not only its top
    assert backoff.compute(0) == 0.0  # no jitter on nothing
