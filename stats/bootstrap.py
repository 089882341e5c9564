"""Paired BCa bootstrap with scipy's exact conventions (STATS_SPEC §2-4, §6).

Conventions copied from `scipy.stats.bootstrap(method="BCa")`: mid-rank bias correction z0,
delete-one jackknife acceleration, type-7 ("linear") quantiles, float64 throughout. The tests
check this by handing scipy our own bootstrap distribution and comparing intervals to 1e-12.

Statistics:
- "mean": of one array, or of x − y for a pair (a per-example delta). O(n) closed-form acceleration.
- "ratio": a corpus metric of summed per-example sufficient statistics (ratio of sums, micro-F1,
  chrF, BLEU; see `stats.corpus`), or its paired difference. Jackknife θ_(i) = f(total − row_i).
- a vectorised callable f(*arrays, axis=-1), scipy style, with the general delete-one jackknife.
Quantiles are refused here: the jackknife is inconsistent for them; see `stats.quantile`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import ndtr, ndtri

from stats import corpus
from stats.resample import Seed, all_index_blocks, lattice_scale, to_lattice, totals

Statistic = Callable[..., np.ndarray]
LOW_N = 20
DEGENERATE = "all paired deltas equal"


class NoData(ValueError):
    """Fewer than 2 usable examples: there is nothing to bootstrap (a gate reads this as NODATA)."""


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
    seed: Seed
    method: str = "BCa"
    n_dropped: int = 0
    degenerate: bool = False
    low_n: bool = False
    reason: str = ""
    warnings: tuple[str, ...] = ()
    p_value: float | None = None
    p_value_se: float | None = None
    bootstrap_distribution: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)


@dataclass(frozen=True)
class _Draws:
    """θ̂ and θ*, plus the keys their order is judged by (exact integers on a lattice, else θ itself)."""

    estimate: float
    dist: np.ndarray
    estimate_key: float
    keys: np.ndarray
    key_of: Callable[[float], float]  # maps a null value θ0 onto the key scale

    @classmethod
    def plain(cls, estimate: float, dist: np.ndarray) -> _Draws:
        """Off a lattice, θ is its own key."""
        return cls(estimate, dist, estimate, dist, float)


def drop_nan(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Drop whole examples (pairs) where any array has a NaN; count them (STATS_SPEC §1)."""
    bad = np.zeros(len(arrays[0]), dtype=bool)
    for a in arrays:
        bad |= np.isnan(a).reshape(len(a), -1).any(axis=1)
    return [a[~bad] for a in arrays], int(bad.sum())


def _mid_rank(keys: np.ndarray, value: float) -> float:
    """(#{θ* < v} + #{θ* ≤ v}) / (2B): ties count one half."""
    return float((np.count_nonzero(keys < value) + np.count_nonzero(keys <= value)) / (2 * len(keys)))


def _acceleration(u: np.ndarray) -> float:
    """a = Σu³ / (6·(Σu²)^{3/2}) over jackknife deviations u; 0 when they are all equal."""
    den = 6.0 * np.sum(u**2) ** 1.5
    return float(np.sum(u**3) / den) if den > 0 else 0.0


def mean_acceleration(d: np.ndarray) -> float:
    """For a mean, θ̄ − θ_(i) = (d_i − d̄)/(n − 1) and the ratio is scale-free: use c = d − d̄. O(n)."""
    return _acceleration(d - d.mean())


def bca_quantile(dist: np.ndarray, z0: float, a: float, alpha: float) -> tuple[float, float, bool]:
    """(the BCa endpoint at nominal lower-tail level alpha, its adjusted level, whether 1 − a(z0+z) ≤ 0)."""
    z = float(ndtri(alpha))
    denom = 1 - a * (z0 + z)
    adjusted = float(ndtr(z0 + (z0 + z) / denom))
    return float(np.quantile(dist, adjusted, method="linear")), adjusted, denom <= 0


def _finish(
    draws: _Draws,
    a: float,
    *,
    level: float,
    n: int,
    n_dropped: int,
    n_resamples: int,
    seed: Seed,
    null: float | None,
) -> BootstrapResult:
    """z0, the BCa endpoints and (with `null`) the one-sided p-value, from θ* (STATS_SPEC §3-4)."""
    low_n = n < LOW_N
    est = draws.estimate

    def result(low: float, high: float, z0: float, a: float, **extra) -> BootstrapResult:
        return BootstrapResult(
            est,
            low,
            high,
            level,
            z0,
            a,
            n,
            n_resamples,
            seed,
            n_dropped=n_dropped,
            low_n=low_n,
            bootstrap_distribution=draws.dist,
            **extra,
        )

    if np.all(draws.keys == draws.keys[0]):
        return result(est, est, 0.0, 0.0, degenerate=True, reason=DEGENERATE)
    z0 = float(ndtri(_mid_rank(draws.keys, draws.estimate_key)))
    warnings: list[str] = []
    ends, alphas = [], []
    for alpha in ((1 - level) / 2, (1 + level) / 2):
        value, adjusted, bad = bca_quantile(draws.dist, z0, a, alpha)
        ends.append(value)
        alphas.append(adjusted)
        if bad:
            warnings.append("extreme endpoints: 1 − a(z0 + z) ≤ 0")
    if any(not 5 / n_resamples <= al <= 1 - 5 / n_resamples for al in alphas):
        warnings.append("extreme endpoints: BCa levels within 5/B of 0 or 1")
    p_value = p_se = None
    if null is not None:
        p_value = one_sided_p(draws.keys, draws.key_of(null), z0, a)
        p_se = float(np.sqrt(p_value * (1 - p_value) / n_resamples))
    return result(
        ends[0],
        ends[1],
        z0,
        a,
        warnings=tuple(warnings),
        reason="small n: BCa undercovers" if low_n else "",
        p_value=p_value,
        p_value_se=p_se,
    )


def one_sided_p(keys: np.ndarray, null_key: float, z0: float, a: float) -> float:
    """BCa p for H0: θ ≤ θ0 (STATS_SPEC §4): p = Φ(w/(1 + a·w) − z0), w = Φ⁻¹(Ĝ(θ0)) − z0."""
    b = len(keys)
    g = min(max(_mid_rank(keys, null_key), 1 / (2 * b)), 1 - 1 / (2 * b))
    w = float(ndtri(g)) - z0
    return float(ndtr(w / (1 + a * w) - z0))


def _linear_draws(
    m: np.ndarray, g: Callable[[np.ndarray], np.ndarray], n_resamples: int, seed: Seed
) -> _Draws:
    """θ = g(Σ rows of M), a corpus metric; integer statistics keep the totals exact."""
    return _Draws.plain(float(g(m.sum(axis=0))), _checked(g(totals(m, n_resamples, seed))))


def _checked(dist: np.ndarray) -> np.ndarray:
    """A statistic undefined on some resample (say Σ denominator = 0) makes the bootstrap meaningless."""
    if not np.isfinite(dist).all():
        bad = int((~np.isfinite(dist)).sum())
        raise ValueError(f"the statistic is not finite on {bad} of {len(dist)} resamples")
    return dist


def _mean_draws(d: np.ndarray, t: np.ndarray, scale: int | None) -> _Draws:
    """θ̂ and θ* = t/n for the mean of d, given resampled totals t of d (of d·scale on a lattice).

    On a lattice the keys are the integer numerators, so ties with θ̂ count exactly (STATS_SPEC §3).
    """
    n = len(d)
    if scale is None:
        return _Draws.plain(float(np.mean(d)), t / n)
    t_hat, div = float(to_lattice(d, scale).sum()), n * scale
    return _Draws(t_hat / div, t / div, t_hat, t, lambda v: v * div)


def _lattice_or_self(d: np.ndarray) -> tuple[np.ndarray, int | None]:
    scale = lattice_scale(d)
    return (d, None) if scale is None else (to_lattice(d, scale), scale)


def resampled(arrays: list[np.ndarray], f: Statistic, n_resamples: int, seed: Seed) -> np.ndarray:
    """θ*_b = f of each resample of whole examples (pairs share indices), on this thread: a user's
    callable may not be thread-safe."""
    dist = np.empty(n_resamples)
    for lo, idx in all_index_blocks(seed, len(arrays[0]), n_resamples):
        dist[lo : lo + len(idx)] = f(*(a[idx] for a in arrays), axis=-1)
    return dist


def _callable_draws(arrays: list[np.ndarray], f: Statistic, n_resamples: int, seed: Seed) -> _Draws:
    return _Draws.plain(float(f(*arrays, axis=-1)), _checked(resampled(arrays, f, n_resamples, seed)))


def _callable_jackknife(arrays: list[np.ndarray], f: Statistic) -> np.ndarray:
    n = len(arrays[0])
    theta = np.empty(n)
    keep = np.ones(n, dtype=bool)
    for i in range(n):  # one deletion at a time: never the n×(n−1) matrix
        keep[i] = False
        theta[i] = f(*(a[keep] for a in arrays), axis=-1)
        keep[i] = True
    return theta


def _ratio_parts(arrays: list[np.ndarray], metric: corpus.Metric) -> tuple[np.ndarray, Callable]:
    """Stack the arms' sufficient statistics side by side: θ = f(T_variant) [− f(T_baseline)]."""
    for a in arrays:
        if a.ndim != 2:
            raise ValueError(
                f"'ratio' needs per-example sufficient statistics as n×k arrays, got shape {a.shape}"
            )
    k = arrays[0].shape[1]
    if any(a.shape[1] != k for a in arrays):
        raise ValueError(f"paired sufficient statistics differ in width: {[a.shape[1] for a in arrays]}")
    if len(arrays) == 1:
        return arrays[0], metric
    return np.hstack(arrays), lambda t: metric(t[..., :k]) - metric(t[..., k:])


def bca(
    data: Sequence[np.ndarray | Sequence[float]],
    statistic: str | Statistic = "mean",
    *,
    paired: bool = False,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: Seed = None,
    null: float | None = None,
    metric: corpus.Metric = corpus.ratio_of_sums,
) -> BootstrapResult:
    """BCa interval for `statistic` of `data` (scipy's data convention: a sequence of arrays).

    `statistic` is "mean", "ratio" (a corpus `metric` of summed n×k sufficient statistics) or a
    vectorised callable f(*arrays, axis=-1). Two arrays must be paired: resampled with shared
    indices, with mean and ratio taken as first − second. Examples with a NaN are dropped and counted.
    With `null` given, the result carries the one-sided BCa p-value for H0: θ ≤ null and its MC SE.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in data]
    if len(arrays) > 1 and not paired:
        raise ValueError("several arrays are only supported paired (paired=True); unpaired samples are not")
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"paired arrays differ in length: {[len(a) for a in arrays]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if statistic in ("median", "quantile"):
        raise ValueError(
            "BCa is inconsistent for quantiles (the jackknife is); use stats.quantile for a percentile CI"
        )
    if isinstance(statistic, str) and statistic not in ("mean", "ratio"):
        raise ValueError(f"unknown statistic {statistic!r}; use 'mean', 'ratio' or a vectorised callable")
    if statistic == "mean" and len(arrays) > 2:
        raise ValueError(f"'mean' takes one array or a (variant, baseline) pair, got {len(arrays)} arrays")
    arrays, n_dropped = drop_nan(arrays)
    n = len(arrays[0])
    if n < 2:
        raise NoData(
            f"NODATA: the bootstrap needs at least 2 examples, got {n} ({n_dropped} dropped for NaN)"
        )

    if statistic == "mean":
        d = arrays[0] if len(arrays) == 1 else arrays[0] - arrays[1]
        m, scale = _lattice_or_self(d)
        draws = _mean_draws(d, totals(m[:, None], n_resamples, seed)[:, 0], scale)
        a = mean_acceleration(d)
    elif statistic == "ratio":
        m, g = _ratio_parts(arrays, metric)
        draws = _linear_draws(m, g, n_resamples, seed)
        jack = g(m.sum(axis=0) - m)  # θ_(i) = f(total − row_i): O(n·k)
        a = _acceleration(jack.mean() - jack)
    else:
        assert callable(statistic)
        draws = _callable_draws(arrays, statistic, n_resamples, seed)
        jack = _callable_jackknife(arrays, statistic)
        a = _acceleration(jack.mean() - jack)
    return _finish(
        draws, a, level=level, n=n, n_dropped=n_dropped, n_resamples=n_resamples, seed=seed, null=null
    )


def paired_bca(
    baseline: np.ndarray | Sequence[float],
    variant: np.ndarray | Sequence[float],
    *,
    statistic: str | Statistic = "mean",
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: Seed = None,
    null: float = 0.0,
    metric: corpus.Metric = corpus.ratio_of_sums,
) -> BootstrapResult:
    """variant − baseline on per-example paired data, with the p-value for H0: variant − baseline ≤ null."""
    return bca(
        (variant, baseline),
        statistic,
        paired=True,
        n_resamples=n_resamples,
        level=level,
        seed=seed,
        null=null,
        metric=metric,
    )


def bca_family(
    deltas: np.ndarray,
    *,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: Seed = None,
    null: float = 0.0,
) -> list[BootstrapResult]:
    """One BCa result per column of the n×m per-example deltas, all from one shared count matrix.

    Θ* = C @ D in one GEMM (STATS_SPEC §6): m comparisons cost one resampling, and the columns keep
    their joint dependence. Each column gets its own z0, acceleration, endpoints and p. A column
    with NaNs must be handled by the caller (the family's examples are shared by definition).
    """
    d = np.asarray(deltas, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"deltas must be n×m (examples × comparisons), got shape {d.shape}")
    if np.isnan(d).any():
        raise ValueError("a family shares its examples: deltas contain NaN; drop those examples first")
    n = len(d)
    if n < 2:
        raise NoData(f"NODATA: the bootstrap needs at least 2 examples, got {n}")
    m, scale = _lattice_or_self(d)
    t_star = totals(m, n_resamples, seed)
    return [
        _finish(
            _mean_draws(d[:, j], t_star[:, j], scale),
            mean_acceleration(d[:, j]),
            level=level,
            n=n,
            n_dropped=0,
            n_resamples=n_resamples,
            seed=seed,
            null=null,
        )
        for j in range(d.shape[1])
    ]


def lower_bound(result: BootstrapResult, level: float) -> float:
    """The one-sided level-`level` BCa lower bound from the same draws (for FCR-adjusted intervals)."""
    if result.method != "BCa":
        raise ValueError(f"a BCa bound needs a BCa result, got {result.method}")
    if result.degenerate:
        return result.estimate
    return bca_quantile(result.bootstrap_distribution, result.z0, result.acceleration, 1 - level)[0]


def with_interval(result: BootstrapResult, level: float) -> BootstrapResult:
    """The same result re-intervalled at another two-sided level from the same draws."""
    if result.degenerate:
        return replace(result, level=level)
    dist, z0, a = result.bootstrap_distribution, result.z0, result.acceleration
    low = bca_quantile(dist, z0, a, (1 - level) / 2)[0]
    high = bca_quantile(dist, z0, a, (1 + level) / 2)[0]
    return replace(result, level=level, low=low, high=high)
