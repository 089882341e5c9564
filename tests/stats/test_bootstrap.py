"""BCa against scipy.stats.bootstrap: same bootstrap distribution in, same interval out."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from stats.bootstrap import bca, paired_bca

B = 4000


def scipy_on_our_draws(result, data, statistic, paired=False, level=0.95):
    """scipy's BCa computed from our θ* (n_resamples=0 reuses bootstrap_result's distribution)."""
    return scipy.stats.bootstrap(
        data, statistic, n_resamples=0, bootstrap_result=result, method="BCa",
        paired=paired, confidence_level=level, vectorized=True,
    ).confidence_interval  # fmt: skip


DATASETS = {
    "skewed": lambda rng: rng.lognormal(0, 1, 200),
    "n10": lambda rng: rng.normal(0.3, 1, 10),
    "binary_ties": lambda rng: rng.integers(0, 2, 150).astype(float),
    "deltas_-1_0_1": lambda rng: rng.integers(-1, 2, 300).astype(float),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_mean_interval_equals_scipy_on_the_same_draws(name, level) -> None:
    d = DATASETS[name](np.random.default_rng(len(name)))
    ours = bca((d,), "mean", n_resamples=B, level=level, seed=1)
    ref = scipy_on_our_draws(ours, (d,), np.mean, level=level)
    assert ours.low == pytest.approx(ref.low, abs=1e-12)
    assert ours.high == pytest.approx(ref.high, abs=1e-12)
    assert ours.estimate == pytest.approx(d.mean())


def test_callable_statistic_paired_correlation_equals_scipy() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)

    def corr(a, b, axis=-1):
        a = a - a.mean(axis=axis, keepdims=True)
        b = b - b.mean(axis=axis, keepdims=True)
        return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))

    ours = bca((x, y), corr, paired=True, n_resamples=B, seed=2)
    ref = scipy_on_our_draws(ours, (x, y), corr, paired=True)
    assert ours.low == pytest.approx(ref.low, abs=1e-12)
    assert ours.high == pytest.approx(ref.high, abs=1e-12)


def test_independent_draws_agree_with_scipy_within_monte_carlo_spread() -> None:
    d = np.random.default_rng(9).gamma(2.0, 1.0, 400)
    ours = bca((d,), n_resamples=10_000, seed=3)
    ref = scipy.stats.bootstrap(
        (d,), np.mean, method="BCa", n_resamples=10_000, random_state=5
    ).confidence_interval
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert abs(ours.low - ref.low) < 0.1 * se and abs(ours.high - ref.high) < 0.1 * se


def test_paired_equals_one_sample_on_the_differences() -> None:
    rng = np.random.default_rng(5)
    base, var = rng.random(120), rng.random(120) + 0.05
    paired = paired_bca(base, var, n_resamples=B, seed=7)
    one = bca((var - base,), n_resamples=B, seed=7, null=0.0)
    assert (paired.low, paired.high, paired.p_value) == pytest.approx(
        (one.low, one.high, one.p_value), abs=1e-12
    )


def test_mean_acceleration_closed_form_equals_the_jackknife() -> None:
    d = np.random.default_rng(6).exponential(size=80)
    fast = bca((d,), "mean", n_resamples=200, seed=0).acceleration
    slow = bca((d,), lambda a, axis=-1: np.mean(a, axis=axis), n_resamples=200, seed=0).acceleration
    assert fast == pytest.approx(slow, abs=1e-12)


def test_p_value_inverts_the_lower_endpoint() -> None:
    """The lower bound of the two-sided level-(1 − 2p) interval sits at θ0 = 0, up to MC error."""
    d = np.random.default_rng(8).normal(0.15, 1, 250)
    res = paired_bca(np.zeros_like(d), d, n_resamples=B, seed=11)
    assert 0 < res.p_value < 0.5 and res.p_value_se == pytest.approx(
        np.sqrt(res.p_value * (1 - res.p_value) / B)
    )
    again = bca((d,), n_resamples=B, seed=11, level=1 - 2 * res.p_value)
    assert abs(again.low) < 0.2 * d.std() / np.sqrt(len(d))


def test_degenerate_data_gives_a_point_interval_never_nan() -> None:
    res = paired_bca(np.full(30, 0.5), np.full(30, 0.5), n_resamples=500, seed=0)
    assert res.degenerate and res.reason == "all paired deltas equal"
    assert (res.estimate, res.low, res.high) == (0.0, 0.0, 0.0)


def test_small_n_is_flagged_and_n_below_two_is_nodata() -> None:
    assert bca((np.arange(10.0),), n_resamples=300, seed=0).low_n
    assert not bca((np.arange(30.0),), n_resamples=300, seed=0).low_n
    with pytest.raises(ValueError, match="NODATA"):
        bca((np.array([1.0]),))


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="paired"):
        bca((np.ones(5), np.ones(5)))
    with pytest.raises(ValueError, match="differ in length"):
        bca((np.ones(5), np.ones(6)), paired=True)
    with pytest.raises(ValueError, match="unknown statistic 'median'"):
        bca((np.ones(5),), "median")


def test_deterministic_for_a_seed() -> None:
    d = np.random.default_rng(1).random(50)
    a, b = bca((d,), seed=4, n_resamples=500), bca((d,), seed=4, n_resamples=500)
    assert (a.low, a.high) == (b.low, b.high)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-5, 5), seed=st.integers(0, 1000))
def test_shift_equivariance_and_order_invariance(shift, seed) -> None:
    d = np.random.default_rng(seed).normal(size=40)
    base = bca((d,), n_resamples=300, seed=seed)
    moved = bca((d + shift,), n_resamples=300, seed=seed)
    assert moved.low == pytest.approx(base.low + shift, abs=1e-9)
    assert moved.high == pytest.approx(base.high + shift, abs=1e-9)
    # Reordering examples permutes which index means which example; the interval moves only by MC noise.
    shuffled = bca((np.random.default_rng(seed + 1).permutation(d),), n_resamples=2000, seed=seed)
    ref = bca((d,), n_resamples=2000, seed=seed)
    assert abs(shuffled.low - ref.low) < 0.5 * d.std() / np.sqrt(len(d))
