"""A sweep's statistics: its trials ranked by one metric with an interval each, and the median rule
that stops poor trials early.

A sweep is never gated. Ranking many trials and taking the best is selection: the best estimate is
biased upwards, and its interval does not cover that. The intervals here say how well each trial is
measured, and the winner earns a verdict only when it runs again, gated, on fresh seeds.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from stats.bootstrap import NoData, bca, paired_bca

Goal = Literal["max", "min"]
COLUMNS = ("example_id", "arm", "seed", "metric", "value", "trial")


@dataclass(frozen=True)
class TrialRank:
    trial: int
    params: dict[str, Any]
    rank: int | None = None  # 1 is the best; None: nothing to rank (no scores)
    n: int = 0  # examples (each one's mean over the seeds)
    estimate: float = float("nan")  # the arm's mean, or the mean of arm − baseline
    low: float = float("nan")
    high: float = float("nan")
    level: float = 0.95
    stopped: str = ""  # why the median rule stopped it
    note: str = ""


def _per_example(frame: pd.DataFrame) -> pd.Series:
    return frame.groupby("example_id")["value"].mean()


def rank_trials(
    scores: pd.DataFrame,
    trials: list[dict[str, Any]],
    *,
    metric: str,
    arm: str | None = None,
    baseline: str | None = None,
    goal: Goal = "max",
    stopped: dict[int, str] | None = None,
    level: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> list[TrialRank]:
    """Each trial's estimate with a BCa interval, best first. The example is the resampling unit:
    its value is the mean over the sweep's seeds (and arms, when `arm` is None); with a baseline,
    the trial's arm and baseline are paired by example. Trials without scores come last."""
    missing = set(COLUMNS) - set(scores.columns)
    if missing:
        raise ValueError(f"a sweep's scores lack columns {sorted(missing)}")
    stopped = stopped or {}
    found = scores[scores.metric == metric]
    out = []
    for t, params in enumerate(trials):
        row = TrialRank(trial=t, params=params, level=level, stopped=stopped.get(t, ""))
        mine = found[found.trial == t]
        variant = _per_example(mine if arm is None else mine[mine.arm == arm])
        base = None
        if baseline is not None:
            paired = _per_example(mine[mine.arm == baseline])
            common = variant.index.intersection(paired.index)
            variant, base = variant.loc[common], paired.loc[common].to_numpy(np.float64)
        if len(variant) < 2:  # a trial stopped before it scored, or a metric it never reported
            out.append(replace(row, n=len(variant), note=f"no {metric} scores to rank"))
            continue
        x = variant.to_numpy(np.float64)
        try:
            if base is None:
                res = bca([x], n_resamples=n_resamples, level=level, seed=seed)
            else:
                res = paired_bca(base, x, n_resamples=n_resamples, level=level, seed=seed)
        except NoData as e:  # every example NaN
            out.append(replace(row, n=len(variant), note=str(e)))
            continue
        note = "; ".join(filter(None, [res.reason, *res.warnings])) if res.degenerate else ""
        out.append(replace(row, n=len(variant), estimate=res.estimate, low=res.low, high=res.high, note=note))
    sign = -1.0 if goal == "max" else 1.0
    ranked = sorted((r for r in out if not np.isnan(r.estimate)), key=lambda r: (sign * r.estimate, r.trial))
    rest = [r for r in out if np.isnan(r.estimate)]
    return [replace(r, rank=i + 1) for i, r in enumerate(ranked)] + rest


def best(ranks: list[TrialRank]) -> TrialRank | None:
    """The winner: the best-ranked trial that ran to its end."""
    return next((r for r in ranks if r.rank is not None and not r.stopped), None)


class _Curve:
    """One task's points by step, with running sums and best-so-far values kept for lookups by step."""

    def __init__(self, goal: Goal) -> None:
        self.better = max if goal == "max" else min
        self.points: dict[int, float] = {}
        self.steps: list[int] = []
        self.sums: list[float] = []  # sums[i]: the values of steps[: i + 1]
        self.best: list[float] = []  # best[i]: the best of them

    def add(self, step: int, value: float) -> None:
        fresh = step not in self.points
        self.points[step] = value
        if fresh and (not self.steps or step > self.steps[-1]):  # in order, as curves arrive: O(1)
            self._append(step, value)
            return
        self.steps, self.sums, self.best = [], [], []  # out of order or again: rebuild
        for st in sorted(self.points):
            self._append(st, self.points[st])

    def _append(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.sums.append((self.sums[-1] if self.sums else 0.0) + value)
        self.best.append(self.better(self.best[-1], value) if self.best else value)

    def upto(self, step: int) -> int:
        return bisect.bisect_right(self.steps, step)

    def mean_to(self, step: int) -> float:
        i = self.upto(step)
        return self.sums[i - 1] / i

    def best_to(self, step: int) -> float:
        return self.best[self.upto(step) - 1]


class MedianStop:
    """The median stopping rule (Golovin et al., Google Vizier, 2017), per group of comparable tasks
    (the same stage, arm and seed in each trial).

    At step s >= `after_steps`, a trial is stopped when its best value so far is worse than the
    median of the other trials' running means up to s, counting only trials that have reached s,
    and only once `min_trials` of them have. Points may arrive in any order and more than once (the
    last value of a step counts). Each point costs O(trials · log steps).
    """

    def __init__(self, goal: Goal = "min", after_steps: int = 1, min_trials: int = 2) -> None:
        if min_trials < 1:
            raise ValueError(f"min_trials must be at least 1, got {min_trials}")
        self.goal, self.after_steps, self.min_trials = goal, after_steps, min_trials
        self.curves: dict[str, dict[int, _Curve]] = {}  # group -> trial -> its curve
        self.stopped: dict[int, str] = {}

    def reset(self, group: str, trial: int) -> None:
        """Forget a task's curve: its new attempt starts again."""
        self.curves.get(group, {}).pop(trial, None)

    def observe(self, group: str, trial: int, step: int, value: float) -> str | None:
        """Record one point; the reason to stop `trial` now, or None."""
        curves = self.curves.setdefault(group, {})
        curves.setdefault(trial, _Curve(self.goal)).add(step, value)
        if trial in self.stopped or step < self.after_steps:
            return None
        best_so_far = curves[trial].best_to(step)
        others = [
            c.mean_to(step) for t, c in curves.items() if t != trial and c.steps and c.steps[-1] >= step
        ]
        if len(others) < self.min_trials:
            return None
        median = statistics.median(others)
        worse = best_so_far < median if self.goal == "max" else best_so_far > median
        if not worse:
            return None
        reason = (
            f"stopped at step {step} of {group}: best so far {best_so_far:.4g} is worse than the median "
            f"{median:.4g} of {len(others)} other trials' running means"
        )
        self.stopped[trial] = reason
        return reason
