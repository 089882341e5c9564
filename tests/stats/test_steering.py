"""The knob's dose-response: slopes against numpy's polyfit, ρ against scipy, the interval from examples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from stats.bootstrap import bca
from stats.steering import per_example_slopes, steerability

KAPPAS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_per_example_slopes_are_numpys_least_squares_slopes() -> None:
    rng = np.random.default_rng(0)
    p = rng.normal(size=(40, len(KAPPAS))) + np.outer(rng.normal(size=40), KAPPAS)
    want = np.polyfit(KAPPAS, p.T, 1)[0]
    np.testing.assert_allclose(per_example_slopes(KAPPAS, p), want, rtol=1e-10, atol=1e-12)
    # Linear in the responses: the slope of the mean propensities is the mean of the slopes.
    assert np.polyfit(KAPPAS, p.mean(0), 1)[0] == pytest.approx(per_example_slopes(KAPPAS, p).mean())


def test_a_steerable_knob_has_a_positive_slope_interval_and_falling_violations() -> None:
    rng = np.random.default_rng(1)
    n = 200
    gain = rng.normal(2.0, 1.0, size=n)  # most examples steer, some (gain < 0) against the knob
    p = np.outer(gain, KAPPAS) + rng.normal(0, 0.5, size=(n, len(KAPPAS))) - 1.0
    flags = (p < 0).astype(float)  # violating while the safe continuation is less likely
    s = steerability(KAPPAS, p, flags, n_resamples=4000, seed=0)
    slopes = per_example_slopes(KAPPAS, p)
    assert s.slope.estimate == pytest.approx(slopes.mean())
    assert s.slope.low > 0 and s.slope.low < 2.0 < s.slope.high  # covers the true mean gain
    ref = bca([slopes], "mean", n_resamples=4000, seed=0)
    assert (s.slope.low, s.slope.high) == (ref.low, ref.high)
    assert s.anti_steerable == pytest.approx(float((slopes < 0).mean())) and 0 < s.anti_steerable < 0.2
    assert s.spearman_violation == pytest.approx(sps.spearmanr(KAPPAS, flags.mean(0)).statistic)
    assert s.spearman_violation < -0.9 and s.spearman_propensity > 0.9
    assert s.slope.p_value is not None and s.slope.p_value < 0.01


def test_a_dead_knob_has_an_interval_around_zero_and_no_rank_correlation() -> None:
    rng = np.random.default_rng(2)
    p = rng.normal(size=(150, len(KAPPAS)))
    flags = np.zeros_like(p)
    s = steerability(KAPPAS, p, flags, n_resamples=4000, seed=0)
    assert s.slope.low < 0 < s.slope.high
    assert np.isnan(s.spearman_violation)  # no violation rate moved: ρ is undefined, not 0


def test_bad_shapes_and_knobs_are_named() -> None:
    with pytest.raises(ValueError, match="examples × knob values"):
        per_example_slopes(KAPPAS, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="two distinct knob values"):
        per_example_slopes([0.5, 0.5], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="differ in shape"):
        steerability(KAPPAS, np.zeros((3, 11)), np.zeros((3, 10)))
