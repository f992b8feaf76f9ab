"""Statistics of the study: mean ± SD over seeds and paired bootstrap confidence intervals.

Paired difference (pre-trained − scratch) of one cell: a matrix ``D[seed, case]`` of per-case
differences between the two arms that share a seed (same labelled cases, same data stream, same
steps) and are tested on the same held-out case. Its 95 % CI is a two-way percentile bootstrap:
each replicate draws seeds and test cases independently with replacement and takes the mean of the
selected sub-matrix, so both the seed-to-seed and the case-to-case variability enter the interval.
NaN entries (an organ absent from a case) are ignored by the means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CI_METHOD = ("95 % percentile bootstrap, 2000 replicates, seeds and test cases resampled independently "
             "with replacement (paired: both arms share seed and case)")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample SD (ddof 1; 0 for one value) of the finite values; NaN when there are none."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def paired_bootstrap_ci(differences: np.ndarray, replicates: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a ``seeds × cases`` matrix of paired differences; see the module docstring."""
    matrix = np.atleast_2d(np.asarray(differences, dtype=float))
    if matrix.ndim != 2 or not np.isfinite(matrix).any():
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    seeds, cases = matrix.shape
    rows = rng.integers(0, seeds, (replicates, seeds))
    columns = rng.integers(0, cases, (replicates, cases))
    samples = np.empty(replicates)
    for index in range(replicates):
        block = matrix[np.ix_(rows[index], columns[index])]
        samples[index] = np.nanmean(block) if np.isfinite(block).any() else np.nan
    samples = samples[np.isfinite(samples)]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(np.nanmean(matrix)), float(low), float(high)
