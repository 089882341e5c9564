"""Paired BCa bootstrap with scipy's exact conventions (STATS_SPEC §3-4).

Conventions copied from `scipy.stats.bootstrap(method="BCa")`: mid-rank bias correction z0,
delete-one jackknife acceleration, type-7 ("linear") quantiles, float64 throughout. The test suite
checks this by handing scipy our own bootstrap distribution and comparing intervals to 1e-12.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr, ndtri

Statistic = Callable[..., np.ndarray]
LOW_N = 20
_BLOCK_ELEMENTS = 1 << 23  # resample index elements per block: bounds memory at large n


@dataclass(frozen=True)
class BootstrapResult:
    estimate: float
    low: float
    high: float
    level: float
    z0: float
    acceleration: float
    n: int
    n_resamples: int
    seed: int | None
    degenerate: bool = False
    low_n: bool = False
    reason: str = ""
    warnings: tuple[str, ...] = ()
    p_value: float | None = None
    p_value_se: float | None = None
    bootstrap_distribution: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)


def _mean_of_differences(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
    """'mean' on one array is its mean; on two paired arrays (x, y) it is mean(x − y)."""
    if len(arrays) == 1:
        return np.mean(arrays[0], axis=axis)
    x, y = arrays
    return np.mean(x - y, axis=axis)


def _resampled(data: Sequence[np.ndarray], statistic: Statistic, n_resamples: int, rng: np.random.Generator):
    """θ*_b for B resamples of whole pairs (the same indices for every array), in memory-bounded blocks."""
    n = len(data[0])
    block = max(1, _BLOCK_ELEMENTS // n)
    out = np.empty(n_resamples)
    for lo in range(0, n_resamples, block):
        hi = min(n_resamples, lo + block)
        idx = rng.integers(0, n, (hi - lo, n), dtype=np.int32)
        out[lo:hi] = statistic(*(a[idx] for a in data), axis=-1)
    return out


def _jackknife_acceleration(data: Sequence[np.ndarray], statistic: Statistic, is_mean: bool) -> float:
    """a = Σu³ / (6·(Σu²)^{3/2}) with u_i = θ̄_(·) − θ_(i), the delete-one jackknife values."""
    if is_mean:
        # For a mean, θ̄ − θ_(i) = (d_i − d̄)/(n − 1): the ratio is scale-free, so use c = d − d̄. O(n).
        d = data[0] if len(data) == 1 else data[0] - data[1]
        c = d - d.mean()
        den = 6.0 * np.sum(c**2) ** 1.5
        return float(np.sum(c**3) / den) if den > 0 else 0.0
    n = len(data[0])
    theta = np.empty(n)
    keep = np.ones(n, dtype=bool)
    for i in range(n):  # one deletion at a time: never the n×(n−1) matrix
        keep[i] = False
        theta[i] = statistic(*(a[keep] for a in data), axis=-1)
        keep[i] = True
    u = theta.mean() - theta
    den = 6.0 * np.sum(u**2) ** 1.5
    return float(np.sum(u**3) / den) if den > 0 else 0.0


def _mid_rank(distribution: np.ndarray, value: float) -> float:
    """(#{θ* < v} + #{θ* ≤ v}) / (2B): ties count one half."""
    return float(
        (np.count_nonzero(distribution < value) + np.count_nonzero(distribution <= value))
        / (2 * len(distribution))
    )


def bca(
    data: Sequence[np.ndarray | Sequence[float]],
    statistic: str | Statistic = "mean",
    *,
    paired: bool = False,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int | None = None,
    null: float | None = None,
) -> BootstrapResult:
    """BCa interval for `statistic` of `data` (scipy's data convention: a sequence of arrays).

    `statistic` is "mean" or a vectorised callable f(*arrays, axis=-1). Several arrays must be
    paired (resampled with shared indices). With `null` given, the result also carries the one-sided
    BCa p-value for H0: θ ≤ null and its Monte-Carlo standard error.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in data]
    if len(arrays) > 1 and not paired:
        raise ValueError("several arrays are only supported paired (paired=True); unpaired samples are not")
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"paired arrays differ in length: {[len(a) for a in arrays]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(statistic, str):
        if statistic != "mean":
            raise ValueError(f"unknown statistic {statistic!r}; use 'mean' or a vectorised callable")
        func: Statistic = _mean_of_differences
    else:
        func = statistic
    n = len(arrays[0])
    if n < 2:
        raise ValueError(f"NODATA: the bootstrap needs at least 2 examples, got {n}")

    estimate = float(func(*arrays, axis=-1))
    rng = np.random.default_rng(seed)
    dist = _resampled(arrays, func, n_resamples, rng)
    low_n = n < LOW_N
    if np.all(dist == dist[0]):
        return BootstrapResult(
            estimate, estimate, estimate, level, 0.0, 0.0, n, n_resamples, seed,
            degenerate=True, low_n=low_n, reason="all paired deltas equal", bootstrap_distribution=dist,
        )  # fmt: skip

    z0 = float(ndtri(_mid_rank(dist, estimate)))
    a = _jackknife_acceleration(arrays, func, is_mean=func is _mean_of_differences)
    warnings: list[str] = []
    alphas = []
    for z in (ndtri((1 - level) / 2), ndtri((1 + level) / 2)):
        denom = 1 - a * (z0 + z)
        if denom <= 0:
            warnings.append("extreme endpoints: 1 − a(z0 + z) ≤ 0")
        alphas.append(float(ndtr(z0 + (z0 + z) / denom)))
    if any(not 5 / n_resamples <= al <= 1 - 5 / n_resamples for al in alphas):
        warnings.append("extreme endpoints: BCa levels within 5/B of 0 or 1")
    low, high = np.quantile(dist, alphas, method="linear")

    p_value = p_se = None
    if null is not None:
        g = min(max(_mid_rank(dist, null), 1 / (2 * n_resamples)), 1 - 1 / (2 * n_resamples))
        w = float(ndtri(g)) - z0
        p_value = float(ndtr(w / (1 + a * w) - z0))
        p_se = float(np.sqrt(p_value * (1 - p_value) / n_resamples))
    return BootstrapResult(
        estimate, float(low), float(high), level, z0, a, n, n_resamples, seed,
        low_n=low_n, reason="small n: BCa undercovers" if low_n else "", warnings=tuple(warnings),
        p_value=p_value, p_value_se=p_se, bootstrap_distribution=dist,
    )  # fmt: skip


def paired_bca(
    baseline: np.ndarray | Sequence[float],
    variant: np.ndarray | Sequence[float],
    *,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int | None = None,
) -> BootstrapResult:
    """mean(variant − baseline) on per-example paired scores, with the p-value for H0: variant ≤ baseline."""
    return bca(
        (variant, baseline), "mean", paired=True, n_resamples=n_resamples, level=level, seed=seed, null=0.0
    )
