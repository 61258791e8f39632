"""Pure arithmetic for benchmark samples: percentiles, medians and rates."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks.

    Same definition as numpy's default (``linear``): ``p50`` of ``[1, 2, 3, 4]`` is 2.5.
    ``None`` for no samples; ``q`` outside 0..100 is a programming error.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not samples:
        return None
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(samples: Sequence[float]) -> float | None:
    return percentile(samples, 50.0)


def rate(count: float, seconds: float) -> float | None:
    """``count / seconds``, or ``None`` when nothing was timed."""
    if seconds <= 0:
        return None
    return count / seconds


def megabytes_per_second(byte_count: int, seconds: float) -> float | None:
    """Throughput in MB/s (10^6 bytes per second, as iperf and the research notes use)."""
    per_second = rate(byte_count, seconds)
    return None if per_second is None else per_second / 1e6


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
