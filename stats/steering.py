"""Dose-response of a steering knob (missions_cde.md C.3; Tan et al. 2024, "steerability").

At each knob value κ_j every example i has a propensity P_ij = log p(positive) − log p(negative)
continuation (for Mission C: safe minus violating) and a 0/1 violation flag. Reported:

- steerability: the least-squares slope of propensity on κ. The slope of a least-squares line is
  linear in the responses, so the slope of the mean propensities equals the mean of the per-example
  slopes; its BCa interval therefore comes from resampling examples, with the per-example slope as
  the per-example value (`stats.bootstrap.bca`, "mean");
- the anti-steerable share: examples whose own slope is negative;
- Spearman ρ between κ and the violation rate, and between κ and the mean propensity, over the sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from stats.bootstrap import BootstrapResult, bca
from stats.resample import Seed


@dataclass(frozen=True)
class Steerability:
    kappas: tuple[float, ...]
    mean_propensity: tuple[float, ...]
    violation_rate: tuple[float, ...]
    slope: BootstrapResult  # mean per-example slope of propensity on κ, with its BCa interval
    anti_steerable: float  # share of examples with a negative slope
    spearman_violation: float  # ρ(κ, violation rate)
    spearman_propensity: float  # ρ(κ, mean propensity)


def per_example_slopes(kappas: Sequence[float], propensity: np.ndarray) -> np.ndarray:
    """[n]: each example's least-squares slope of propensity (n × k) on the k knob values."""
    x = np.asarray(kappas, dtype=np.float64)
    y = np.asarray(propensity, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != len(x):
        raise ValueError(f"propensity must be n × {len(x)} (examples × knob values); got shape {y.shape}")
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"a slope needs at least two distinct knob values; got {list(x)}")
    xc = x - x.mean()
    return (y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)


def steerability(
    kappas: Sequence[float],
    propensity: np.ndarray,
    violations: np.ndarray,
    *,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: Seed = None,
) -> Steerability:
    """The sweep's dose-response; `violations` is n × k of 0/1 flags on the same examples."""
    flags = np.asarray(violations, dtype=np.float64)
    if flags.shape != np.shape(propensity):
        raise ValueError(f"violations {flags.shape} and propensity {np.shape(propensity)} differ in shape")
    slopes = per_example_slopes(kappas, propensity)
    rates = flags.mean(axis=0)
    means = np.asarray(propensity, dtype=np.float64).mean(axis=0)
    return Steerability(
        kappas=tuple(float(k) for k in kappas),
        mean_propensity=tuple(float(m) for m in means),
        violation_rate=tuple(float(r) for r in rates),
        slope=bca([slopes], "mean", n_resamples=n_resamples, level=level, seed=seed, null=0.0),
        anti_steerable=float((slopes < 0).mean()),
        spearman_violation=_spearman(kappas, rates),
        spearman_propensity=_spearman(kappas, means),
    )


def _spearman(x: Sequence[float], y: np.ndarray) -> float:
    """ρ, or NaN where it is undefined (a constant series: no rate moved over the sweep)."""
    if np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)
