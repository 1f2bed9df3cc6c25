"""Latencies in a log histogram (2 % buckets), its one percentile function, and spreads.

A histogram is a fixed-size int64 array: adding a batch is one ``bincount``, histograms of
several processes add up, and a percentile is the geometric middle of its bucket (within 1 %).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

HIST_BASE_NS = 1000  # bucket 0 holds everything under 1 us
HIST_GROWTH = 1.02
HIST_K = 1.0 / math.log(HIST_GROWTH)
HIST_BUCKETS = int(math.log(1e12 / HIST_BASE_NS) * HIST_K) + 1  # up to 1,000 s

I64Array = npt.NDArray[np.int64]


def histogram() -> I64Array:
    return np.zeros(HIST_BUCKETS, dtype=np.int64)


def buckets(latency_ns: I64Array) -> I64Array:
    """The bucket counts of a batch of latencies, to add to a histogram."""
    idx = (np.log(np.maximum(latency_ns, HIST_BASE_NS) / HIST_BASE_NS) * HIST_K).astype(np.intp)
    return np.bincount(np.minimum(idx, HIST_BUCKETS - 1), minlength=HIST_BUCKETS)


def percentile_ns(hist: I64Array, q: float) -> float:
    """The ``q``-th percentile (0..100) in nanoseconds; NaN when the histogram is empty."""
    total = int(hist.sum())
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * total))
    bucket = int(np.searchsorted(np.cumsum(hist), rank))
    return float(HIST_BASE_NS * HIST_GROWTH ** (bucket + 0.5))


def spread(values: Sequence[float]) -> tuple[float, float, float] | None:
    """Min, median and max of repeated runs; None when there are none."""
    if not values:
        return None
    return min(values), statistics.median(values), max(values)
