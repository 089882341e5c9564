"""Kayenta-style canary judge (STATS_SPEC §10).

Per metric: clean both arms, run a two-sided Mann–Whitney U test, estimate the Hodges–Lehmann shift
(canary − baseline) with a distribution-free interval, and classify it High, Low or Pass against a
tolerance of a quarter of the shift. Group scores are the share of Pass among judged metrics; the
summary is their weighted sum, and thresholds turn it into Pass, Marginal or Fail.

Reference: Netflix's NetflixACAJudge / MannWhitneyClassifier / WeightedSumScorer (Kayenta), which
this follows except where a docstring below says otherwise and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import msgspec
import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtri
from scipy.stats import mannwhitneyu

Direction = Literal["increase", "decrease", "either"]
Classification = Literal["Pass", "High", "Low", "NODATA"]
Decision = Literal["Pass", "Marginal", "Fail"]

DIRECTIONS: tuple[str, ...] = ("increase", "decrease", "either")
EXACT_MAX_PAIRS = 10_000  # exact null for U up to m·n = 10,000: O((m·n)²) flops, 50 ms at 100 × 100
MAX_PAIRS = 10_000_000  # all pairwise differences are materialised: 80 MB at this bound
_WEIGHT_SLACK = 1e-9  # weights are user floats: 33.3 + 33.3 + 33.4 must count as 100


class MetricSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One judged metric. `direction` says which way is bad: "increase" only fails when the canary goes up.

    A msgspec Struct, so a mission's TOML converts straight into it (`msgspec.convert`), unknown keys
    refused."""

    name: str
    direction: Direction = "either"
    group: str = "default"
    critical: bool = False
    must_have_data: bool = False
    report_only: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("MetricSpec.name must be a non-empty string")
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"MetricSpec.direction of {self.name!r} is {self.direction!r}; use one of {DIRECTIONS}"
            )
        if not self.group:
            raise ValueError(f"MetricSpec.group of {self.name!r} must be a non-empty string")
        if self.report_only and (self.critical or self.must_have_data):
            # A report_only metric never touches the score, so these flags would silently do nothing.
            raise ValueError(f"MetricSpec {self.name!r}: report_only excludes critical and must_have_data")


class CanaryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Metrics, group weights (percent) and decision thresholds for one canary.

    Groups named in `group_weights` get that weight; the other scored groups share 100 − Σweights
    equally. Weights must be positive (use report_only to keep a metric out of the score).
    """

    metrics: tuple[MetricSpec, ...]
    group_weights: dict[str, float] = {}
    pass_threshold: float = 95.0
    marginal_threshold: float = 75.0
    confidence: float = 0.98
    tolerance: float = 0.25
    iqr_factor: float = 3.0

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError("CanaryConfig.metrics is empty: nothing to judge")
        names = [m.name for m in self.metrics]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"CanaryConfig.metrics: duplicate metric names {dup}")
        if not 0 <= self.marginal_threshold <= self.pass_threshold <= 100:
            raise ValueError(
                "CanaryConfig thresholds must satisfy 0 ≤ marginal_threshold ≤ pass_threshold ≤ 100, got "
                f"marginal_threshold={self.marginal_threshold}, pass_threshold={self.pass_threshold}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"CanaryConfig.confidence must be in (0, 1), got {self.confidence}")
        if not self.tolerance >= 0:
            raise ValueError(f"CanaryConfig.tolerance must be ≥ 0, got {self.tolerance}")
        if not self.iqr_factor > 0:
            raise ValueError(
                f"CanaryConfig.iqr_factor must be > 0 (math.inf disables it), got {self.iqr_factor}"
            )
        self._check_weights()

    def _check_weights(self) -> None:
        scored = self.scored_groups
        for group, weight in self.group_weights.items():
            if group not in scored:
                raise ValueError(f"CanaryConfig.group_weights names {group!r}, which has no scored metric")
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"CanaryConfig.group_weights[{group!r}] must be finite and > 0, got {weight}"
                )
        total = math.fsum(self.group_weights.values())
        if total > 100 + _WEIGHT_SLACK:
            raise ValueError(f"CanaryConfig.group_weights sum to {total}, more than 100")
        unweighted = [g for g in scored if g not in self.group_weights]
        if unweighted and total >= 100 - _WEIGHT_SLACK:
            raise ValueError(f"CanaryConfig.group_weights leave no weight for unweighted groups {unweighted}")
        if not unweighted and scored and abs(total - 100) > _WEIGHT_SLACK:
            raise ValueError(f"CanaryConfig.group_weights weight every group but sum to {total}, not 100")

    @property
    def scored_groups(self) -> tuple[str, ...]:
        """Groups with at least one metric that counts toward the score, in config order."""
        return tuple(dict.fromkeys(m.group for m in self.metrics if not m.report_only))

    def weights(self) -> dict[str, float]:
        """Static weight (percent) of every scored group: explicit, or an equal share of the remainder."""
        scored = self.scored_groups
        unweighted = [g for g in scored if g not in self.group_weights]
        share = (100 - math.fsum(self.group_weights.values())) / len(unweighted) if unweighted else 0.0
        return {g: self.group_weights.get(g, share) for g in scored}


@dataclass(frozen=True)
class ShiftEstimate:
    """Hodges–Lehmann shift of canary over baseline with its order-statistic interval [D_(k), D_(mn+1−k)]."""

    estimate: float
    low: float
    high: float
    k: int  # 1-indexed rank of the lower endpoint among the sorted m·n differences
    exact: bool  # k from the exact null distribution of U (else the normal approximation)


@dataclass(frozen=True)
class MetricResult:
    name: str
    group: str
    classification: Classification
    hl: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n_baseline: int  # after cleaning
    n_canary: int
    n_nonfinite: int  # dropped NaN/±inf values, both arms
    n_outliers: int  # dropped beyond iqr_factor·IQR, both arms
    reason: str
    critical: bool = False
    report_only: bool = False


@dataclass(frozen=True)
class GroupScore:
    name: str
    score: float | None  # None: no judged metric in the group, so it is left out of the summary
    weight: float  # effective percent in the summary, after renormalising over judged groups
    n_pass: int
    n_high: int
    n_low: int
    n_nodata: int


@dataclass(frozen=True)
class CanaryReport:
    metrics: tuple[MetricResult, ...]
    groups: tuple[GroupScore, ...]
    score: float
    decision: Decision
    reason: str


def remove_outliers(values: np.ndarray, factor: float = 3.0) -> np.ndarray:
    """Drop values beyond `factor`·IQR outside the quartiles (type-7 quartiles, fences inclusive).

    With IQR = 0 nothing is removed: the fences would collapse onto the quartile and strip every
    value that differs from the mode, e.g. all the rare errors of a mostly-zero error count.
    """
    if len(values) == 0:
        return values
    q1, q3 = np.quantile(values, [0.25, 0.75], method="linear")
    iqr = q3 - q1
    if iqr == 0:
        return values
    return values[(values >= q1 - factor * iqr) & (values <= q3 + factor * iqr)]


@lru_cache(maxsize=64)
def _exact_u_cdf(m: int, n: int) -> np.ndarray:
    """P(U ≤ u), u = 0..m·n, for the Mann–Whitney U of samples of sizes m and n without ties.

    Counting recursion on which sample holds the largest value: c(u; i, j) = c(u − j; i − 1, j) +
    c(u; i, j − 1). Counts reach C(m + n, m) ≤ 1e59 at m·n ≤ 10,000: exact enough in float64, and
    only additions of non-negative numbers, so no cancellation in the tails we read.
    """
    size = m * n + 1
    rows = [np.zeros(size) for _ in range(m + 1)]
    for r in rows:
        r[0] = 1.0  # j = 0: U = 0 with certainty
    for j in range(1, n + 1):
        for i in range(1, m + 1):  # rows[i - 1] already holds column j, rows[i] still holds j − 1
            rows[i][j:] += rows[i - 1][: size - j]
    cdf = np.cumsum(rows[m]) / rows[m].sum()
    cdf.flags.writeable = False
    return cdf


def _lower_rank(m: int, n: int, alpha: float) -> tuple[int, bool]:
    """k such that P(U ≤ k − 1) ≤ α/2 under H0, as large as possible; clamped to ≥ 1."""
    mn = m * n
    if mn <= EXACT_MAX_PAIRS:
        k = int(np.searchsorted(_exact_u_cdf(m, n), alpha / 2, side="right"))
        return max(k, 1), True
    sigma = math.sqrt(mn * (m + n + 1) / 12)
    return max(math.floor(mn / 2 - float(ndtri(1 - alpha / 2)) * sigma), 1), False


def hodges_lehmann(canary: ArrayLike, baseline: ArrayLike, confidence: float = 0.98) -> ShiftEstimate:
    """HL = median of all m·n differences canary_i − baseline_j, and its distribution-free interval.

    The interval is [D_(k), D_(mn+1−k)] (Hollander & Wolfe; R's wilcox.test(conf.int=TRUE) with
    exact=TRUE): k is the largest rank with P(U ≤ k − 1) ≤ α/2, read from the exact null of U for
    m·n ≤ EXACT_MAX_PAIRS, else k = floor(mn/2 − z_{1−α/2}·sqrt(mn(m+n+1)/12)). Ties are not
    corrected for, which only makes the interval slightly conservative. When even k = 1 cannot reach
    the level (2/C(m+n, m) > α) k is clamped to 1 and the interval undercovers; judge() reports such
    metrics as NODATA instead of calling this.
    """
    c = np.asarray(canary, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if c.ndim != 1 or b.ndim != 1 or len(c) == 0 or len(b) == 0:
        raise ValueError(f"hodges_lehmann needs two non-empty 1-D samples, got shapes {c.shape}, {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m, n = len(c), len(b)
    if m * n > MAX_PAIRS:
        raise ValueError(
            f"{m}×{n} pairwise differences exceed MAX_PAIRS={MAX_PAIRS}; aggregate the series first"
        )
    mn = m * n
    k, exact = _lower_rank(m, n, 1 - confidence)
    k = min(k, (mn + 1) // 2)  # defensive: 2k ≤ mn + 1 is what keeps low ≤ high
    mid = [(mn - 1) // 2, mn // 2]
    d = np.partition((c[:, None] - b[None, :]).ravel(), [k - 1, mn - k, *mid])
    estimate = float((d[mid[0]] + d[mid[1]]) / 2)
    return ShiftEstimate(estimate, float(d[k - 1]), float(d[mn - k]), k, exact)


def _clean(name: str, values: ArrayLike | None, iqr_factor: float) -> tuple[np.ndarray, int, int]:
    """Finite values with outliers removed, and the counts dropped at each step.

    ±inf goes with NaN: ranks could cope, but inf − inf in the pairwise differences would be NaN.
    """
    x = np.asarray([] if values is None else values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"series of metric {name!r} must be 1-D, got shape {x.shape}")
    finite = x[np.isfinite(x)]
    kept = remove_outliers(finite, iqr_factor)
    return kept, len(x) - len(finite), len(finite) - len(kept)


def _judge_metric(
    spec: MetricSpec, baseline: ArrayLike | None, canary: ArrayLike | None, config: CanaryConfig
) -> MetricResult:
    b, b_nonfinite, b_out = _clean(spec.name, baseline, config.iqr_factor)
    c, c_nonfinite, c_out = _clean(spec.name, canary, config.iqr_factor)
    nb, nc = len(b), len(c)

    def result(cls: Classification, reason: str, *stats: float) -> MetricResult:
        """`stats` is (hl,) for the shortcuts, (hl, low, high, p) after the test, () for NODATA."""
        hl, low, high, p = (*stats, None, None, None, None)[:4]
        return MetricResult(
            name=spec.name, group=spec.group, classification=cls, hl=hl, ci_low=low, ci_high=high,
            p_value=p, n_baseline=nb, n_canary=nc, n_nonfinite=b_nonfinite + c_nonfinite,
            n_outliers=b_out + c_out, reason=reason, critical=spec.critical, report_only=spec.report_only,
        )  # fmt: skip

    if nb == 0 or nc == 0:
        empty = " and ".join(arm for arm, size in (("baseline", nb), ("canary", nc)) if size == 0)
        return result("NODATA", f"no finite data for {empty}")
    if np.array_equal(np.sort(b), np.sort(c)):
        return result("Pass", "identical data", 0.0)
    if np.unique(np.concatenate([b, c])).size == 1:
        return result("Pass", "a single distinct value overall", 0.0)
    if math.comb(nb + nc, nc) * (1 - config.confidence) < 2:
        # Even [min D, max D] covers with probability 1 − 2/C(m+n, m) < confidence: no evidence either way.
        return result(
            "NODATA", f"too few samples ({nb} baseline, {nc} canary) for a {config.confidence:.0%} CI"
        )
    if nb * nc > MAX_PAIRS:
        raise ValueError(
            f"metric {spec.name!r}: {nc}×{nb} differences exceed MAX_PAIRS; aggregate the series"
        )

    p = float(mannwhitneyu(c, b, alternative="two-sided").pvalue)
    shift = hodges_lehmann(c, b, config.confidence)
    tol = config.tolerance * abs(shift.estimate)
    went_up, went_down = shift.low > tol, shift.high < -tol
    ci = f"HL {shift.estimate:.4g}, {config.confidence:.0%} CI [{shift.low:.4g}, {shift.high:.4g}]"
    stats = (shift.estimate, shift.low, shift.high, p)
    if went_up and spec.direction != "decrease":
        return result("High", f"{ci} above tolerance {tol:.4g}", *stats)
    if went_down and spec.direction != "increase":
        return result("Low", f"{ci} below tolerance −{tol:.4g}", *stats)
    if went_up or went_down:
        moved = "increase" if went_up else "decrease"
        return result("Pass", f"{ci}: {moved} allowed by direction={spec.direction!r}", *stats)
    return result("Pass", f"{ci} within tolerance ±{tol:.4g}", *stats)


def _group_scores(config: CanaryConfig, results: Sequence[MetricResult]) -> tuple[GroupScore, ...]:
    """Score = 100·pass/(pass + high + low) per scored group; NODATA and report_only are not counted.

    A group with no judged metric gets score None and weight 0, and the other groups' weights are
    renormalised to sum to 100: missing data is not a failure unless a metric says must_have_data.
    """
    counts = {g: dict.fromkeys(("Pass", "High", "Low", "NODATA"), 0) for g in config.scored_groups}
    for r in results:
        if not r.report_only:
            counts[r.group][r.classification] += 1
    static = config.weights()
    judged = {g: c["Pass"] + c["High"] + c["Low"] for g, c in counts.items()}
    live = math.fsum(static[g] for g in counts if judged[g])
    scores = []
    for g, c in counts.items():
        score = 100 * c["Pass"] / judged[g] if judged[g] else None
        weight = 100 * static[g] / live if judged[g] else 0.0
        scores.append(GroupScore(g, score, weight, c["Pass"], c["High"], c["Low"], c["NODATA"]))
    return tuple(scores)


def judge(
    config: CanaryConfig, baseline: Mapping[str, ArrayLike], canary: Mapping[str, ArrayLike]
) -> CanaryReport:
    """Judge every configured metric, score the groups and decide Pass, Marginal or Fail.

    A metric missing from either mapping is an empty series (NODATA); a series with no configured
    metric is a ValueError, because a typo in the config must not silently drop a metric. The score
    is forced to 0 (Fail) by a critical metric classified High or Low, by NODATA on a critical or
    must_have_data metric, and when no metric could be judged at all.
    """
    known = {m.name for m in config.metrics}
    if unknown := sorted((set(baseline) | set(canary)) - known):
        raise ValueError(f"data has metrics with no MetricSpec in the config: {unknown}")
    results = tuple(
        _judge_metric(s, baseline.get(s.name), canary.get(s.name), config) for s in config.metrics
    )
    groups = _group_scores(config, results)

    forced = [
        f"critical metric {r.name!r} is {r.classification}"
        for r in results
        if r.critical and r.classification in ("High", "Low")
    ]
    forced += [
        f"NODATA on {'critical' if s.critical else 'must_have_data'} metric {r.name!r}"
        for s, r in zip(config.metrics, results, strict=True)
        if r.classification == "NODATA" and (s.critical or s.must_have_data)
    ]
    if all(g.score is None for g in groups):
        forced.append("no metric could be judged (all NODATA or report_only)")
    if forced:
        return CanaryReport(results, groups, 0.0, "Fail", "score forced to 0: " + "; ".join(forced))

    # Rounded so that float noise in shared weights (3 × 33.33…) cannot flip a threshold comparison.
    score = round(math.fsum(g.weight * g.score / 100 for g in groups if g.score is not None), 9)
    decision: Decision
    if score >= config.pass_threshold:
        decision, reason = "Pass", f"score {score:.2f} ≥ pass {config.pass_threshold:g}"
    elif score >= config.marginal_threshold:
        decision, reason = "Marginal", f"score {score:.2f} ≥ marginal {config.marginal_threshold:g}"
        reason += f", < pass {config.pass_threshold:g}"
    else:
        decision, reason = "Fail", f"score {score:.2f} < marginal {config.marginal_threshold:g}"
    return CanaryReport(results, groups, score, decision, reason)
