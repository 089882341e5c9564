"""Per-chunk drift tests with thresholds learnt from the reference (STATS_SPEC §11).

Reference and current data are cut into chunks (fixed size or period labels). Each input feature
gets KS, PSI, JS, KL and optionally MMD² per chunk; each "performance" column (a per-example metric
such as correctness) gets its chunk mean. Thresholds come from the reference itself: every reference
chunk is compared with the rest of the reference, and mean + 3σ of those values is the bound, so a
threshold reflects how much an undrifted chunk of that size wobbles for that feature.

Conventions (the places the spec is silent):
- bins are the reference deciles (inverted-CDF, so edges are observed values), duplicate edges merged,
  bins right-closed (a, b] with open ends;
- PSI and KL replace empty bins by ε = 1e-4 and renormalise, so KL is a true divergence (≥ 0);
  JS needs no smoothing (the mixture is positive wherever either side is) and is computed raw;
- KL is in nats (like PSI, which equals KL(r‖c) + KL(c‖r)); JS is in bits, so it lies in [0, 1];
- σ is the sample standard deviation (ddof=1) over the reference chunks;
- KS/PSI/KL alert above mean + 3σ only (they are ≥ 0 and grow with drift); performance means alert
  outside mean ± 3σ (a metric can drift either way); JS alerts above 0.1;
- p-value rules (MMD, and KS with `ks_rule="p_value"`) apply BH per statistic across the input
  features of one chunk and alert when the adjusted p < α;
- a feature drifts when any of its configured statistics alerts; dataset drift is ≥ 50% of the
  input features drifting (performance columns are reported apart and never count).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.special import rel_entr
from scipy.stats import kstwo

from stats.multitest import fdr

EPS = 1e-4
N_BINS = 10
STATISTICS = ("ks", "psi", "js", "kl", "mmd")
Rule = Literal["upper", "band", "constant", "p_value"]


# --------------------------------------------------------------------------------------------------
# Plain statistics: usable on their own, and the only place the formulas live.
# --------------------------------------------------------------------------------------------------


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample KS D and its two-sided asymptotic p, with scipy's "asymp" convention.

    scipy's asymp p is kstwo.sf(D, round(m·n/(m+n))), i.e. the one-sample KS law at the effective
    size; we copy it so our p equals `ks_2samp(method="asymp")` exactly.
    """
    r = np.sort(_finite_1d(reference, "reference"))
    c = np.sort(_finite_1d(current, "current"))
    pooled = np.concatenate([r, c])
    # side="right" evaluates both ECDFs at every observed point, ties included.
    gap = np.searchsorted(r, pooled, side="right") / len(r) - np.searchsorted(c, pooled, side="right") / len(
        c
    )
    d = float(np.max(np.abs(gap)))
    m, n = len(r), len(c)
    p = float(np.clip(kstwo.sf(d, np.round(m * n / (m + n))), 0.0, 1.0))
    return d, p


def quantile_edges(reference: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Interior edges of the reference's `n_bins` quantile bins, duplicates merged.

    Edges are observed values (inverted-CDF quantiles), so with right-closed bins a discrete feature
    gets one bin per level instead of interpolated edges between levels. Tied quantiles are merged:
    fewer bins rather than zero-width ones that would only ever hold ε.
    """
    x = _finite_1d(reference, "reference")
    if n_bins < 2:
        raise ValueError(f"n_bins must be ≥ 2, got {n_bins}")
    return np.unique(np.quantile(x, np.arange(1, n_bins) / n_bins, method="inverted_cdf"))


def bin_proportions(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of `x` in each bin (−∞, e1], (e1, e2], …, (ek, ∞); the ends are open to unseen values."""
    x = _finite_1d(x, "x")
    return _bin_counts(x, edges) / len(x)


def smooth(p: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Empty bins get ε, then renormalise: log-ratios stay finite and the result is still a distribution."""
    p = _distribution(p, "p")
    q = np.where(p > 0, p, eps)
    return q / q.sum()


def psi(reference: np.ndarray, current: np.ndarray, eps: float = EPS) -> float:
    """PSI = Σ (p_c − p_r)·ln(p_c / p_r) over binned proportions, empty bins smoothed by ε."""
    r, c = _pair(reference, current)
    r, c = smooth(r, eps), smooth(c, eps)
    return float(np.sum((c - r) * np.log(c / r)))


def kl_divergence(reference: np.ndarray, current: np.ndarray, eps: float = EPS) -> float:
    """KL(ref ‖ cur) in nats over binned proportions, both sides smoothed like PSI."""
    r, c = _pair(reference, current)
    return float(np.sum(rel_entr(smooth(r, eps), smooth(c, eps))))


def js_divergence(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits, in [0, 1].

    Not scipy's `jensenshannon`, which returns the distance (the square root of this).
    """
    r, c = _pair(reference, current)
    m = (r + c) / 2
    js = (np.sum(rel_entr(r, m)) + np.sum(rel_entr(c, m))) / (2 * np.log(2))
    return float(np.clip(js, 0.0, 1.0))  # rounding can leave it a hair outside


def median_bandwidth(z: np.ndarray) -> float:
    """Median heuristic: σ = median pairwise distance of the pooled sample (i < j).

    Discrete data can make that median 0; then the median of the non-zero distances keeps the kernel
    informative, and a constant sample (no non-zero distance) gets σ = 1, where every choice gives 0.
    """
    d = _distances(_as_points(z, "z"))
    upper = d[np.triu_indices(len(d), k=1)]
    if upper.size == 0:
        raise ValueError("the median heuristic needs at least 2 points")
    sigma = float(np.median(upper))
    if sigma == 0.0:
        nonzero = upper[upper > 0]
        sigma = float(np.median(nonzero)) if nonzero.size else 1.0
    return sigma


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD² with the RBF kernel exp(−‖a − b‖² / (2σ²)), σ by the median heuristic if not given.

    x and y are (n,) or (n, d). It can be slightly negative: that is what unbiased means.
    """
    xs, ys = _as_points(x, "x"), _as_points(y, "y")
    _check_mmd_sizes(xs, ys)
    kernel, _ = _pooled_kernel(np.concatenate([xs, ys]), bandwidth)
    labels = np.zeros(len(kernel))
    labels[: len(xs)] = 1.0
    return float(_mmd2_from_labels(kernel, labels[None, :], len(xs))[0])


@dataclass(frozen=True)
class MMDResult:
    mmd2: float
    p_value: float
    bandwidth: float
    n_permutations: int
    n_x: int  # sizes actually used, after any subsampling
    n_y: int


def mmd_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_permutations: int = 500,
    seed: int | Sequence[int] = 0,
    max_samples: int | None = 500,
    bandwidth: float | None = None,
) -> MMDResult:
    """MMD² and its permutation p = (1 + #{MMD²_perm ≥ MMD²_obs}) / (1 + B).

    The bandwidth is fixed from the pooled sample, which permutations do not change, so one N×N kernel
    serves every permutation; each permuted MMD² is then two mat-vec products, all B at once.
    Each side above `max_samples` is subsampled without replacement, seeded, so the cost stays
    O(B·N²) with N ≤ 2·max_samples whatever the reference size.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be ≥ 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    xs, ys = _as_points(x, "x"), _as_points(y, "y")
    _check_mmd_sizes(xs, ys)
    if max_samples is not None:
        if max_samples < 2:
            raise ValueError(f"max_samples must be ≥ 2, got {max_samples}")
        xs, ys = _subsample(xs, max_samples, rng), _subsample(ys, max_samples, rng)
    kernel, sigma = _pooled_kernel(np.concatenate([xs, ys]), bandwidth)
    observed = np.zeros(len(kernel))
    observed[: len(xs)] = 1.0
    # Row 0 is the observed split: computed by the same arithmetic as the permutations, ties compare exactly.
    labels = np.vstack([observed, rng.permuted(np.tile(observed, (n_permutations, 1)), axis=1)])
    mmd2 = _mmd2_from_labels(kernel, labels, len(xs))
    p = (1 + np.count_nonzero(mmd2[1:] >= mmd2[0])) / (1 + n_permutations)
    return MMDResult(float(mmd2[0]), float(p), sigma, n_permutations, len(xs), len(ys))


# --------------------------------------------------------------------------------------------------
# Monitor: learn bins and thresholds from the reference, then check chunks.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftConfig:
    statistics: tuple[str, ...] = ("ks", "psi", "js", "kl")  # add "mmd" for the (slower) kernel test
    n_bins: int = N_BINS
    eps: float = EPS
    sigmas: float = 3.0
    js_threshold: float = 0.1
    alpha: float = 0.05  # BH level for the p-value rules
    ks_rule: Literal["threshold", "p_value"] = "threshold"
    n_permutations: int = 500
    mmd_max_samples: int = 500
    dataset_drift_share: float = 0.5

    def __post_init__(self) -> None:
        unknown = set(self.statistics) - set(STATISTICS)
        if unknown or not self.statistics:
            raise ValueError(f"statistics must be a non-empty subset of {STATISTICS}, got {self.statistics}")
        if self.ks_rule not in ("threshold", "p_value"):
            raise ValueError(f"ks_rule must be 'threshold' or 'p_value', got {self.ks_rule!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.dataset_drift_share <= 1:
            raise ValueError(f"dataset_drift_share must be in (0, 1], got {self.dataset_drift_share}")


@dataclass(frozen=True)
class Threshold:
    """Alert when value < lower or value > upper (for p-value rules, value is the BH-adjusted p)."""

    rule: Rule
    lower: float = -np.inf
    upper: float = np.inf
    reference_values: tuple[float, ...] = ()  # the per-reference-chunk statistics it was learnt from

    def crossed(self, value: float) -> float | None:
        """The bound `value` lies beyond, or None when inside."""
        if value < self.lower:
            return self.lower
        if value > self.upper:
            return self.upper
        return None


@dataclass(frozen=True)
class Alert:
    feature: str
    statistic: str
    value: float  # the BH-adjusted p for rule "p_value"
    threshold: float
    rule: Rule


@dataclass(frozen=True)
class StatValue:
    feature: str
    statistic: str  # "ks", "psi", "js", "kl", "mmd", or "mean" for performance columns
    value: float  # KS D, PSI, JS, KL, MMD² or the chunk mean
    threshold: Threshold
    alert: bool
    p_value: float | None = None  # KS and MMD only
    p_adjusted: float | None = None  # BH across features, for p-value rules only


@dataclass(frozen=True)
class DriftReport:
    values: tuple[StatValue, ...]
    alerts: tuple[Alert, ...]
    drifting_features: tuple[str, ...]
    performance_drift: tuple[str, ...]  # performance columns outside their band
    n_features: int  # input features (performance columns excluded)
    drift_share: float
    dataset_drift: bool
    chunk: int | None = None  # position in `check_series`, None for a lone `check`

    def value(self, feature: str, statistic: str) -> StatValue:
        for v in self.values:
            if v.feature == feature and v.statistic == statistic:
                return v
        raise KeyError((feature, statistic))


@dataclass(frozen=True, eq=False)
class DriftMonitor:
    """Fitted state: reference columns, their bins, and one Threshold per (column, statistic)."""

    config: DriftConfig
    features: tuple[str, ...]
    performance: tuple[str, ...]
    reference: Mapping[str, np.ndarray] = field(repr=False)
    edges: Mapping[str, np.ndarray] = field(repr=False)
    thresholds: Mapping[str, Mapping[str, Threshold]]
    chunk_size: int | None
    n_reference_chunks: int
    seed: int

    @classmethod
    def fit(
        cls,
        reference: Mapping[str, np.ndarray],
        chunk_size: int | None = None,
        *,
        periods: np.ndarray | None = None,
        performance: Collection[str] = (),
        config: DriftConfig | None = None,
        seed: int = 0,
    ) -> DriftMonitor:
        """Learn bins from the whole reference and thresholds from its chunks (each vs. the rest).

        Columns named in `performance` are per-example metric values (e.g. 0/1 correctness): their
        chunk statistic is the mean and their band is two-sided. Every other column is an input feature.
        `seed` drives the MMD permutations and subsampling; nothing else is random.
        """
        config = config or DriftConfig()
        data = _columns(reference, "reference")
        _same_length(data, "reference")
        unknown = set(performance) - set(data)
        if unknown:
            raise ValueError(f"performance columns not in the reference: {sorted(unknown)}")
        chunks = chunk_indices(len(next(iter(data.values()))), chunk_size, periods=periods)
        if len(chunks) < 2:
            raise ValueError(
                f"thresholds need at least 2 reference chunks, got {len(chunks)} "
                f"({len(next(iter(data.values())))} rows, chunk_size={chunk_size})"
            )
        if min(len(c) for c in chunks) < 2:
            raise ValueError("every reference chunk needs at least 2 rows")
        features = tuple(name for name in data if name not in performance)
        perf = tuple(name for name in data if name in performance)

        edges = {f: quantile_edges(data[f], config.n_bins) for f in features}
        thresholds: dict[str, dict[str, Threshold]] = {
            f: _feature_thresholds(data[f], edges[f], chunks, config) for f in features
        }
        for name in perf:
            means = np.array([data[name][idx].mean() for idx in chunks])
            mu, sd = means.mean(), means.std(ddof=1)
            lower, upper = float(mu - config.sigmas * sd), float(mu + config.sigmas * sd)
            thresholds[name] = {"mean": Threshold("band", lower, upper, tuple(means.tolist()))}
        return cls(config, features, perf, data, edges, thresholds, chunk_size, len(chunks), seed)

    def check(self, current: Mapping[str, np.ndarray], *, chunk: int | None = None) -> DriftReport:
        """Compare one current chunk with the whole reference."""
        cols = self._monitored(current, "current chunk")
        too_small = [name for name, x in cols.items() if len(x) < 2]
        if too_small:
            raise ValueError(f"current chunk has fewer than 2 values in: {too_small}")

        raw = self._statistics(cols)
        adjusted = self._bh(raw)
        values: list[StatValue] = []
        alerts: list[Alert] = []
        for (name, s), (value, p) in raw.items():
            threshold = self.thresholds[name][s]
            checked = adjusted[name, s] if threshold.rule == "p_value" else value
            bound = threshold.crossed(checked)
            values.append(StatValue(name, s, value, threshold, bound is not None, p, adjusted.get((name, s))))
            if bound is not None:
                alerts.append(Alert(name, s, checked, bound, threshold.rule))

        alerted = {a.feature for a in alerts}
        drifting = tuple(f for f in self.features if f in alerted)
        share = len(drifting) / len(self.features) if self.features else 0.0
        dataset_drift = bool(self.features) and share >= self.config.dataset_drift_share
        return DriftReport(
            tuple(values), tuple(alerts), drifting, tuple(p for p in self.performance if p in alerted),
            len(self.features), share, dataset_drift, chunk,
        )  # fmt: skip

    def check_series(
        self,
        current: Mapping[str, np.ndarray],
        chunk_size: int | None = None,
        *,
        periods: np.ndarray | None = None,
    ) -> tuple[DriftReport, ...]:
        """Cut a long series like the reference was cut (or by `chunk_size`/`periods`); check each chunk."""
        cols = self._monitored(current, "current series")
        _same_length(cols, "current series")
        size = chunk_size if chunk_size is not None or periods is not None else self.chunk_size
        idx = chunk_indices(len(next(iter(cols.values()))), size, periods=periods)
        return tuple(self.check({k: v[i] for k, v in cols.items()}, chunk=n) for n, i in enumerate(idx))

    def _monitored(self, current: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """The monitored columns of `current`, validated; extra columns are ignored."""
        names = self.features + self.performance
        missing = [name for name in names if name not in current]
        if missing:
            raise ValueError(f"{where} lacks monitored columns: {missing}")
        return _columns({name: current[name] for name in names}, where)

    def _statistics(
        self, cols: Mapping[str, np.ndarray]
    ) -> dict[tuple[str, str], tuple[float, float | None]]:
        """(value, raw p or None) per (column, statistic), in feature order."""
        cfg = self.config
        raw: dict[tuple[str, str], tuple[float, float | None]] = {}
        for i, f in enumerate(self.features):
            ref, cur = self.reference[f], cols[f]
            if "ks" in cfg.statistics:
                raw[f, "ks"] = ks(ref, cur)
            binned = _binned_statistics(
                bin_proportions(ref, self.edges[f]), bin_proportions(cur, self.edges[f]), cfg.eps
            )
            raw.update({(f, s): (binned[s], None) for s in ("psi", "js", "kl") if s in cfg.statistics})
            if "mmd" in cfg.statistics:
                # One deterministic stream per (seed, feature): reproducible, and not shared across features.
                res = mmd_permutation_test(
                    ref, cur, n_permutations=cfg.n_permutations, seed=(self.seed, i),
                    max_samples=cfg.mmd_max_samples,
                )  # fmt: skip
                raw[f, "mmd"] = (res.mmd2, res.p_value)
        for name in self.performance:
            raw[name, "mean"] = (float(cols[name].mean()), None)
        return raw

    def _bh(self, raw: Mapping[tuple[str, str], tuple[float, float | None]]) -> dict[tuple[str, str], float]:
        """BH-adjusted p per statistic, across features: one family per test, as §11 words it."""
        adjusted: dict[tuple[str, str], float] = {}
        for s in dict.fromkeys(s for _, s in raw):  # ordered, so errors and results are reproducible
            keys = [
                (f, s) for f in self.features if (f, s) in raw and self.thresholds[f][s].rule == "p_value"
            ]
            if not keys:
                continue
            # fdr() refuses NaN p-values (§1): none can arise here, but a bug must not pass as "no drift".
            p = [raw[k][1] for k in keys]
            result = fdr([np.nan if v is None else v for v in p], self.config.alpha, "bh")
            adjusted.update(zip(keys, result.p_adjusted, strict=True))
        return adjusted


def chunk_indices(
    n: int, chunk_size: int | None = None, *, periods: np.ndarray | None = None
) -> list[np.ndarray]:
    """Row indices of each chunk: consecutive blocks of `chunk_size`, or one chunk per period label.

    A trailing block shorter than `chunk_size` is dropped: its statistics would be noisier than the
    thresholds, which were learnt on full chunks, and raise false alerts. Periods are taken in sorted
    label order (chronological for dates); their sizes may differ, which the thresholds then absorb.
    """
    if (chunk_size is None) == (periods is None):
        raise ValueError("give exactly one of chunk_size and periods")
    if periods is not None:
        labels = np.asarray(periods)
        if labels.shape != (n,):
            raise ValueError(f"periods must be 1-D with one label per row ({n}), got shape {labels.shape}")
        _, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1) if n else []
    assert chunk_size is not None
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    return [np.arange(lo, lo + chunk_size) for lo in range(0, n - chunk_size + 1, chunk_size)]


# --------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------


def _feature_thresholds(
    x: np.ndarray, edges: np.ndarray, chunks: list[np.ndarray], config: DriftConfig
) -> dict[str, Threshold]:
    """Each statistic of every reference chunk against the rest of the reference, then the rule."""
    stats = config.statistics
    total = _bin_counts(x, edges)
    per_chunk: dict[str, list[float]] = {s: [] for s in stats if s != "mmd"}
    for idx in chunks:
        rest = np.ones(len(x), dtype=bool)
        rest[idx] = False
        if "ks" in stats:
            per_chunk["ks"].append(ks(x[rest], x[idx])[0])
        # Counts of the rest are the total minus the chunk: no re-binning per chunk.
        counts = _bin_counts(x[idx], edges)
        binned = _binned_statistics((total - counts) / (len(x) - len(idx)), counts / len(idx), config.eps)
        for s in ("psi", "js", "kl"):
            if s in stats:
                per_chunk[s].append(binned[s])

    out: dict[str, Threshold] = {}
    for s, vals in per_chunk.items():
        v = np.array(vals)
        learnt = tuple(v.tolist())
        if s == "js":
            out[s] = Threshold("constant", upper=config.js_threshold, reference_values=learnt)
        elif s == "ks" and config.ks_rule == "p_value":
            out[s] = Threshold("p_value", lower=config.alpha, reference_values=learnt)
        else:
            out[s] = Threshold(
                "upper", upper=float(v.mean() + config.sigmas * v.std(ddof=1)), reference_values=learnt
            )
    if "mmd" in stats:  # a p-value rule: nothing to learn, and the permutations would be the slow part
        out["mmd"] = Threshold("p_value", lower=config.alpha)
    return out


def _bin_counts(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # side="left" puts a value equal to an edge in the bin that edge closes: bins are (a, b].
    return np.bincount(np.searchsorted(edges, x, side="left"), minlength=len(edges) + 1)


def _binned_statistics(reference: np.ndarray, current: np.ndarray, eps: float) -> dict[str, float]:
    return {
        "psi": psi(reference, current, eps),
        "js": js_divergence(reference, current),
        "kl": kl_divergence(reference, current, eps),
    }


def _finite_1d(x: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        # Refused, not dropped: a changing NaN rate is itself drift, and dropping would hide it.
        raise ValueError(
            f"{name} has {np.count_nonzero(~np.isfinite(a))} NaN/inf values; clean or impute first"
        )
    return a


def _columns(data: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    if not data:
        raise ValueError(f"{where} has no columns")
    return {name: _finite_1d(x, f"{where}[{name!r}]") for name, x in data.items()}


def _same_length(data: Mapping[str, np.ndarray], where: str) -> None:
    lengths = {name: len(x) for name, x in data.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where} columns differ in length (chunks are rows): {lengths}")


def _distribution(p: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name} must be a non-empty 1-D vector of finite non-negative proportions")
    if not np.isclose(a.sum(), 1.0):
        raise ValueError(f"{name} must sum to 1, got {a.sum()}")
    return a


def _pair(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, c = _distribution(reference, "reference"), _distribution(current, "current")
    if r.shape != c.shape:
        raise ValueError(f"binned distributions differ in length: {r.size} vs {c.size}")
    return r, c


def _as_points(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n,) or (n, d) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has NaN/inf values")
    return a


def _check_mmd_sizes(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"unbiased MMD² needs at least 2 points per sample, got {len(x)} and {len(y)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples differ in dimension: {x.shape[1]} vs {y.shape[1]}")


def _subsample(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= size else x[np.sort(rng.choice(len(x), size, replace=False))]


def _distances(z: np.ndarray) -> np.ndarray:
    sq = np.sum(z * z, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    return np.sqrt(np.maximum(d2, 0.0))  # the expansion can dip below 0 by rounding


def _pooled_kernel(z: np.ndarray, bandwidth: float | None) -> tuple[np.ndarray, float]:
    """RBF kernel of the pooled sample with a zeroed diagonal (the unbiased estimator skips i = j)."""
    sigma = median_bandwidth(z) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise ValueError(f"bandwidth must be > 0, got {sigma}")
    k = np.exp(-(_distances(z) ** 2) / (2 * sigma**2))
    np.fill_diagonal(k, 0.0)
    return k, sigma


def _mmd2_from_labels(kernel: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Unbiased MMD² for each row of 0/1 labels (1 = first sample, m ones per row), vectorised.

    With a the indicator and K₀ the kernel without diagonal: Σ_XX = aᵀK₀a, Σ_XY = aᵀK₀1 − Σ_XX, and
    Σ_YY = 1ᵀK₀1 − Σ_XX − 2Σ_XY; so one (B×N)·(N×N) product gives all B statistics.
    """
    n = len(kernel) - m
    row_sums = kernel.sum(axis=1)
    s_xx = np.einsum("bi,bi->b", labels @ kernel, labels)
    s_xy = labels @ row_sums - s_xx
    s_yy = row_sums.sum() - s_xx - 2 * s_xy
    return s_xx / (m * (m - 1)) + s_yy / (n * (n - 1)) - 2 * s_xy / (m * n)
