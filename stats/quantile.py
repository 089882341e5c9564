"""Percentile bootstrap intervals for quantiles: medians, and p50 latency ratios (STATS_SPEC §2).

BCa needs the jackknife, which is inconsistent for quantiles (deleting one point barely moves a
median), so BCa would silently degrade; quantiles get the plain percentile interval instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from stats.bootstrap import DEGENERATE, LOW_N, BootstrapResult, NoData, drop_nan, resampled
from stats.resample import Seed


def percentile_result(
    estimate: float, dist: np.ndarray, *, level: float, n: int, n_dropped: int, n_resamples: int, seed: Seed
) -> BootstrapResult:
    low_n = n < LOW_N
    if np.all(dist == dist[0]):
        low = high = estimate
        degenerate, reason = True, DEGENERATE
    else:
        low, high = (float(v) for v in np.quantile(dist, [(1 - level) / 2, (1 + level) / 2], method="linear"))
        degenerate, reason = False, "small n: the percentile interval undercovers" if low_n else ""
    return BootstrapResult(
        estimate,
        low,
        high,
        level,
        0.0,
        0.0,
        n,
        n_resamples,
        seed,
        method="percentile",
        n_dropped=n_dropped,
        degenerate=degenerate,
        low_n=low_n,
        reason=reason,
        bootstrap_distribution=dist,
    )


def percentile_interval(
    data: Sequence[np.ndarray | Sequence[float]],
    statistic: Callable[..., np.ndarray],
    *,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: Seed = None,
) -> BootstrapResult:
    """Percentile interval of a vectorised f(*arrays, axis=-1); several arrays resample as pairs."""
    arrays = [np.asarray(a, dtype=np.float64) for a in data]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"paired arrays differ in length: {[len(a) for a in arrays]}")
    arrays, n_dropped = drop_nan(arrays)
    n = len(arrays[0])
    if n < 2:
        raise NoData(f"NODATA: the bootstrap needs at least 2 examples, got {n}")
    return percentile_result(
        float(statistic(*arrays, axis=-1)),
        resampled(arrays, statistic, n_resamples, seed),
        level=level,
        n=n,
        n_dropped=n_dropped,
        n_resamples=n_resamples,
        seed=seed,
    )


def quantile_ratio(
    baseline: np.ndarray | Sequence[float],
    variant: np.ndarray | Sequence[float],
    *,
    q: float = 0.5,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: Seed = None,
) -> BootstrapResult:
    """quantile_q(variant) / quantile_q(baseline) on paired examples (p50 latency ratio by default)."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")

    def ratio(v: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.quantile(v, q, axis=axis) / np.quantile(b, q, axis=axis)

    result = percentile_interval((variant, baseline), ratio, n_resamples=n_resamples, level=level, seed=seed)
    if not np.isfinite(result.bootstrap_distribution).all():
        raise ValueError(f"the baseline's q={q} quantile is 0 on some resamples: the ratio is undefined")
    return result
