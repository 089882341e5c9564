"""Preconditions: could the run measure anything at all?

A precondition is a sanity check of the measurement ("arm fixed_json's json_valid ≥ 0.9", "the
expert's EM ≥ 0.8", Mission B's "pre_injection_aggregate ≥ 0.8"), not a hypothesis about the
variant. It is judged on its point estimate against [low, high]; where the statistic has one, the
BCa interval is reported beside it (in `low`/`high`, labelled) but does not decide. Statistics:

- "level": the mean over examples of `metric`'s seed-averaged per-example values in `arm`;
- "value": a deterministic number looked up by `metric` in the values handed to `evaluate`;
- "corpus": the corpus metric `corpus` (`stats.corpus`) of `arm`'s summed per-example statistics
  `metric#0` … `metric#{k-1}` (`stats.table`).

A precondition that fails or has no data makes the verdict inconclusive (`stats.gates.evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Literal

import msgspec
import numpy as np
import pandas as pd

from stats import corpus
from stats.bootstrap import BootstrapResult, NoData, bca
from stats.decision import Decision
from stats.table import arm_scores, arm_stats

PreconditionStatistic = Literal["level", "value", "corpus"]


class Precondition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`statistic` of `metric` (in `arm`) must lie in [low, high], judged on the point estimate."""

    name: str
    statistic: PreconditionStatistic
    metric: str
    arm: str = ""  # none for "value"
    corpus: str = ""  # the stats.corpus metric, for "corpus" only
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"precondition {self.name!r}: {field} {why}")

        if self.statistic not in ("level", "value", "corpus"):
            fail("statistic", f"must be 'level', 'value' or 'corpus', got {self.statistic!r}")
        if self.low is None and self.high is None:
            fail("low/high", "missing: give low, high or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            fail("low", f"{self.low} > high {self.high}")
        if self.statistic == "value" and self.arm:
            fail("arm", f"{self.arm!r} given, but statistic 'value' is a number with no arm")
        if self.statistic != "value" and not self.arm:
            fail("arm", f"missing: statistic {self.statistic!r} needs an arm")
        if self.statistic == "corpus" and self.corpus not in corpus.METRICS:
            fail(
                "corpus", f"{self.corpus!r} is not a stats.corpus metric; use one of {sorted(corpus.METRICS)}"
            )
        if self.statistic != "corpus" and self.corpus:
            fail("corpus", f"{self.corpus!r} given, but statistic is {self.statistic!r}, not 'corpus'")

    @property
    def label(self) -> str:
        return f"{self.corpus}({self.metric})" if self.statistic == "corpus" else self.metric


def _region(low: float | None, high: float | None) -> str:
    return f"[{'-inf' if low is None else f'{low:g}'}, {'+inf' if high is None else f'{high:g}'}]"


def _point_and_interval(
    pre: Precondition, scores: pd.DataFrame, n_resamples: int, level: float, seed: np.random.SeedSequence
) -> tuple[float, int, BootstrapResult | None, str]:
    """(the point estimate, n, its BCa result or None, why there is none)."""
    metric: corpus.Metric
    if pre.statistic == "level":
        values, _ = arm_scores(scores, pre.metric, pre.arm)
        rows, statistic, metric = (values,), "mean", corpus.ratio_of_sums
        point = float(np.mean(values)) if len(values) else np.nan
    else:
        stats, _ = arm_stats(scores, pre.metric, pre.arm)
        metric = corpus.METRICS[pre.corpus]
        rows, statistic = (stats,), "ratio"
        point = float(metric(stats.sum(axis=0))) if len(stats) else np.nan
    n = len(rows[0])
    if n == 0:
        raise NoData(f"NODATA: arm {pre.arm!r} has no usable {pre.metric!r} values")
    try:
        res = bca(rows, statistic, n_resamples=n_resamples, level=level, seed=seed, metric=metric)
    except ValueError as exc:  # n < 2, or the corpus metric undefined on some resample
        return point, n, None, str(exc)
    return point, n, res, ""


def judge_precondition(
    pre: Precondition,
    scores: pd.DataFrame,
    values: Mapping[str, float],
    *,
    n_resamples: int,
    level: float,
    seed: np.random.SeedSequence,
) -> Decision:
    base = Decision(pre.name, "precondition", pre.metric, pre.arm, "nodata", "", family=None)
    if pre.statistic == "value":
        v = values.get(pre.metric)
        if v is None or np.isnan(v):
            return replace(base, reason=f"NODATA: no value for {pre.metric!r}")
        return _judged(pre, replace(base, low=float(v), high=float(v), interval="exact value"), float(v))
    try:
        point, n, res, why = _point_and_interval(pre, scores, n_resamples, level, seed)
    except NoData as exc:
        return replace(base, reason=str(exc))
    if res is None:
        shown = replace(base, n=n, interval=f"no interval ({why}); judged on the point estimate")
    else:
        label = f"{res.method} {res.level:.0%} two-sided" + (
            " (degenerate: one point)" if res.degenerate else ""
        )
        shown = replace(
            base, n=n, low=res.low, high=res.high, interval=f"{label}, beside the point estimate (not judged)"
        )
    return _judged(pre, shown, point)


def _judged(pre: Precondition, shown: Decision, point: float) -> Decision:
    """Judge the point estimate against [low, high]: "json_valid = 0.12 < 0.9"."""
    if not np.isfinite(point):
        return replace(shown, reason=f"NODATA: {pre.label} = {point} is not a number")
    where = f"{pre.label} = {point:.4g}"
    if pre.low is not None and point < pre.low:
        return replace(shown, outcome="fail", estimate=point, reason=f"{where} < {pre.low:g}")
    if pre.high is not None and point > pre.high:
        return replace(shown, outcome="fail", estimate=point, reason=f"{where} > {pre.high:g}")
    return replace(shown, outcome="pass", estimate=point, reason=f"{where} in {_region(pre.low, pre.high)}")
