"""bench.stats: percentiles (numpy's default, linear), medians, rates."""

from __future__ import annotations

import pytest

from bench.stats import median, megabytes_per_second, percentile, rate, rounded

PERCENTILE_CASES = [
    # (samples, q, expected) - the same values numpy.percentile(..., method="linear") gives
    ([5.0], 50, 5.0),
    ([5.0], 99, 5.0),
    ([1, 2, 3, 4], 50, 2.5),
    ([4, 1, 3, 2], 50, 2.5),  # order does not matter
    ([1, 2, 3, 4], 0, 1.0),
    ([1, 2, 3, 4], 100, 4.0),
    ([1, 2, 3, 4, 5], 25, 2.0),
    ([10, 20], 99, 19.9),
    (list(range(1, 101)), 99, 99.01),
    (list(range(1, 101)), 50, 50.5),
    ([100] * 99 + [10_000], 99, 199.0),  # one outlier in 100 moves p99 only a little
]


@pytest.mark.parametrize(("samples", "q", "expected"), PERCENTILE_CASES)
def test_percentile(samples: list[float], q: float, expected: float) -> None:
    assert percentile(samples, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_none_and_q_is_checked() -> None:
    assert percentile([], 50) is None
    assert median([]) is None
    for q in (-1, 100.5):
        with pytest.raises(ValueError, match="outside"):
            percentile([1.0], q)


def test_median_rate_and_throughput() -> None:
    assert median([3, 1, 2]) == 2
    assert rate(10, 4) == 2.5
    assert rate(10, 0) is None
    assert megabytes_per_second(250_000_000, 2.0) == 125.0
    assert megabytes_per_second(1, 0.0) is None
    assert rounded(1.26, 1) == 1.3
    assert rounded(None) is None
