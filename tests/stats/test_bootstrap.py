"""BCa against scipy.stats.bootstrap: same draws in, same interval out; independent draws within MC spread."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import ndtri
from scipy.stats import _resampling

from stats import corpus, resample
from stats.bootstrap import NoData, bca, bca_family, lower_bound, paired_bca, with_interval

B = 4000


def corr(a, b, axis=-1):
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    return (a * b).sum(axis) / np.sqrt((a * a).sum(axis) * (b * b).sum(axis))


def scipy_on_our_draws(result, data, statistic, paired=False, level=0.95, method="BCa"):
    """scipy's interval computed from our θ* (n_resamples=0 reuses bootstrap_result's distribution)."""
    return scipy.stats.bootstrap(
        data,
        statistic,
        n_resamples=0,
        bootstrap_result=result,
        method=method,
        paired=paired,
        confidence_level=level,
        vectorized=True,
    ).confidence_interval


def scipy_alphas_and_a(result, data, statistic, level=0.95):
    """scipy's own (α1, α2, â) for our θ*; paired data go through an index array, as scipy does."""
    if len(data) > 1:
        arrays, f = data, statistic
        data, statistic = (
            (np.arange(len(arrays[0])),),
            (lambda i, axis=-1: f(*(a[i] for a in arrays), axis=axis)),
        )
    a1, a2, a = _resampling._bca_interval(
        data, statistic, -1, (1 - level) / 2, result.bootstrap_distribution, 100, np
    )
    return float(a1), float(a2), float(a)


LAW_LSAT = np.array([576, 635, 558, 578, 666, 580, 555, 661, 651, 605, 653, 575, 545, 572, 594.0])
LAW_GPA = np.array([3.39, 3.30, 2.81, 3.03, 3.44, 3.07, 3.00, 3.43, 3.36, 3.13, 3.12, 2.74, 2.76, 2.88, 2.96])


def _ratio_case(rng):
    """Per-example [matches, totals] for two arms, the shape of a corpus precision."""
    tot_b, tot_v = rng.integers(5, 40, 120), rng.integers(5, 40, 120)
    return rng.binomial(tot_v, 0.55), tot_v, rng.binomial(tot_b, 0.5), tot_b


def ratio_diff(mv, tv, mb, tb, axis=-1):
    return mv.sum(axis) / tv.sum(axis) - mb.sum(axis) / tb.sum(axis)


# name -> (data, our statistic args, scipy statistic, paired)
CASES = {
    "skewed": lambda rng: ((rng.lognormal(0, 1, 200),), "mean", np.mean, False),
    "n10": lambda rng: ((rng.normal(0.3, 1, 10),), "mean", np.mean, False),
    "paired": lambda rng: (
        (rng.normal(0.2, 1, 150) + (x := rng.normal(0, 1, 150)), x),
        "mean",
        lambda v, b, axis=-1: np.mean(v - b, axis=axis),
        True,
    ),
    "binary_ties": lambda rng: ((rng.integers(0, 2, 150).astype(float),), "mean", np.mean, False),
    "deltas_-1_0_1": lambda rng: ((rng.integers(-1, 2, 300).astype(float),), "mean", np.mean, False),
    "law_school_correlation": lambda rng: ((LAW_LSAT, LAW_GPA), corr, corr, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_interval_equals_scipy_on_the_same_draws(name, level) -> None:
    data, ours_stat, scipy_stat, paired = CASES[name](np.random.default_rng(len(name)))
    ours = bca(data, ours_stat, paired=paired, n_resamples=B, level=level, seed=1)
    ref = scipy_on_our_draws(ours, data, scipy_stat, paired=paired, level=level)
    assert ours.low == pytest.approx(ref.low, abs=1e-12)
    assert ours.high == pytest.approx(ref.high, abs=1e-12)
    a1, a2, a = scipy_alphas_and_a(ours, data, scipy_stat, level)
    assert ours.acceleration == pytest.approx(a, abs=1e-12)
    # z0 from scipy's α1: α1 = Φ(z0 + (z0 + z)/(1 − a(z0 + z))) is increasing in z0; invert it numerically.
    z = ndtri((1 - level) / 2)
    z0_from_scipy = scipy.optimize.brentq(
        lambda z0: scipy.special.ndtr(z0 + (z0 + z) / (1 - a * (z0 + z))) - a1, -3, 3, xtol=1e-14
    )
    assert ours.z0 == pytest.approx(z0_from_scipy, abs=1e-9)
    assert np.quantile(ours.bootstrap_distribution, a2, method="linear") == pytest.approx(
        ours.high, abs=1e-12
    )


def test_ratio_of_sums_equals_scipy_with_the_same_statistic_as_a_callable() -> None:
    """The O(n·k) ratio jackknife (total − row_i) gives scipy's acceleration from its delete-one loop."""
    mv, tv, mb, tb = (a.astype(float) for a in _ratio_case(np.random.default_rng(3)))
    ours = paired_bca(
        np.column_stack([mb, tb]), np.column_stack([mv, tv]), statistic="ratio", n_resamples=B, seed=2
    )
    data = (mv, tv, mb, tb)
    ref = scipy_on_our_draws(ours, data, ratio_diff, paired=True)
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert ours.acceleration == pytest.approx(scipy_alphas_and_a(ours, data, ratio_diff)[2], abs=1e-12)
    assert ours.estimate == pytest.approx(ratio_diff(mv, tv, mb, tb))


def _scipy_spread(data, stat, paired, runs=8):
    """SD of scipy's endpoints over repeated B = 10⁴ runs: the Monte-Carlo yardstick of STATS_SPEC §9."""
    ends = np.array(
        [
            scipy.stats.bootstrap(
                data,
                stat,
                paired=paired,
                method="BCa",
                n_resamples=10_000,
                rng=r,
                vectorized=True,
                batch=2000,
            ).confidence_interval
            for r in range(runs)
        ]
    )
    return ends.mean(axis=0), ends.std(axis=0, ddof=1)


@pytest.mark.parametrize(
    "name", ["skewed", "n10", "paired", "binary_ties", "deltas_-1_0_1", "law_school_correlation"]
)
def test_independent_draws_agree_with_scipy_within_monte_carlo_spread(name) -> None:
    data, ours_stat, scipy_stat, paired = CASES[name](np.random.default_rng(len(name)))
    ours = bca(data, ours_stat, paired=paired, n_resamples=10_000, seed=99)
    centre, sd = _scipy_spread(data, scipy_stat, paired)
    lattice = 1 / len(data[0]) if resample.lattice_scale(data[0]) is not None else 0.0
    # One of our endpoints against the mean of 8 scipy runs: 4·SD of a single run covers both spreads.
    tol = np.maximum(4 * sd, lattice)
    assert abs(ours.low - centre[0]) <= tol[0] and abs(ours.high - centre[1]) <= tol[1]


def test_ratio_independent_draws_agree_with_scipy() -> None:
    mv, tv, mb, tb = (a.astype(float) for a in _ratio_case(np.random.default_rng(3)))
    ours = paired_bca(np.column_stack([mb, tb]), np.column_stack([mv, tv]), statistic="ratio", seed=5)
    centre, sd = _scipy_spread((mv, tv, mb, tb), ratio_diff, True)
    assert abs(ours.low - centre[0]) <= 4 * sd[0] and abs(ours.high - centre[1]) <= 4 * sd[1]


def test_public_anchor_r_boot_bca() -> None:
    """R's boot.ci BCa with 10⁶ resamples, as cited in scipy's own test suite: (32.31, 91.43)."""
    x = np.array([10, 12, 12.5, 12.5, 13.9, 15, 21, 22, 23, 34, 50, 81, 89, 121, 134, 213])
    res = bca((x,), n_resamples=1_000_000, seed=0)
    assert res.low == pytest.approx(32.31, rel=0.005) and res.high == pytest.approx(91.43, rel=0.005)


def test_law_school_correlation_is_the_textbook_value() -> None:
    res = bca((LAW_LSAT, LAW_GPA), corr, paired=True, n_resamples=2000, seed=0)
    assert res.estimate == pytest.approx(0.776, abs=5e-4) and res.low_n  # Efron & Tibshirani, Table 3.1


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
    assert 0 < res.p_value < 0.5
    assert res.p_value_se == pytest.approx(np.sqrt(res.p_value * (1 - res.p_value) / B))
    again = with_interval(res, 1 - 2 * res.p_value)
    assert abs(again.low) < 0.05 * d.std() / np.sqrt(len(d))
    assert lower_bound(res, 1 - res.p_value) == pytest.approx(again.low)
    # A fresh bootstrap at that level lands there too, up to Monte-Carlo error.
    fresh = bca((d,), n_resamples=B, seed=12, level=1 - 2 * res.p_value)
    assert abs(fresh.low) < 0.2 * d.std() / np.sqrt(len(d))


def test_p_value_falls_as_the_effect_grows() -> None:
    noise = np.random.default_rng(1).normal(size=200)
    ps = [paired_bca(np.zeros(200), noise + s, n_resamples=B, seed=3).p_value for s in (0.0, 0.1, 0.2, 0.3)]
    assert ps == sorted(ps, reverse=True) and ps[0] > 0.2 and ps[-1] < 0.01


def test_degenerate_data_gives_a_point_interval_never_nan() -> None:
    res = paired_bca(np.full(30, 0.5), np.full(30, 0.5), n_resamples=500, seed=0)
    assert res.degenerate and res.reason == "all paired deltas equal"
    assert (res.estimate, res.low, res.high) == (0.0, 0.0, 0.0)
    fam = bca_family(np.column_stack([np.zeros(30), np.arange(30.0)]), n_resamples=500, seed=0)
    assert fam[0].degenerate and not fam[1].degenerate


def test_degenerate_data_where_scipy_gives_nan() -> None:
    """scipy answers all-equal deltas with NaN and a DegenerateDataWarning; we special-case it (§3)."""
    d = np.full(40, 0.25)
    with pytest.warns(scipy.stats.DegenerateDataWarning), np.errstate(invalid="ignore"):
        ref = scipy.stats.bootstrap((d,), np.mean, method="BCa", n_resamples=1000, rng=0).confidence_interval
    assert np.isnan(ref.low) and np.isnan(ref.high)
    res = bca((d,), n_resamples=1000, seed=0, null=0.0)
    assert res.degenerate and (res.low, res.high) == (0.25, 0.25) and res.p_value is None


def test_nan_examples_are_dropped_and_counted() -> None:
    d = np.random.default_rng(2).normal(size=50)
    with_nan = d.copy()
    with_nan[[3, 7]] = np.nan
    res = bca((with_nan,), n_resamples=500, seed=1)
    clean = bca((np.delete(d, [3, 7]),), n_resamples=500, seed=1)
    assert res.n_dropped == 2 and res.n == 48 and (res.low, res.high) == (clean.low, clean.high)
    with pytest.raises(NoData, match="2 examples"):
        bca((np.full(10, np.nan),))


def test_small_n_is_flagged_and_n_below_two_is_nodata() -> None:
    assert bca((np.arange(10.0),), n_resamples=300, seed=0).low_n
    assert not bca((np.arange(30.0),), n_resamples=300, seed=0).low_n
    with pytest.raises(NoData, match="NODATA"):
        bca((np.array([1.0]),))


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="paired"):
        bca((np.ones(5), np.ones(5)))
    with pytest.raises(ValueError, match="differ in length"):
        bca((np.ones(5), np.ones(6)), paired=True)
    with pytest.raises(ValueError, match="inconsistent for quantiles"):
        bca((np.ones(5),), "median")
    with pytest.raises(ValueError, match="unknown statistic 'mode'"):
        bca((np.ones(5),), "mode")
    with pytest.raises(ValueError, match="n×k"):
        bca((np.ones(5),), "ratio")
    with pytest.raises(ValueError, match="not finite on"):  # Σ denominator = 0 on some resamples
        bca((np.column_stack([np.ones(40), np.r_[1.0, np.zeros(39)]]),), "ratio", n_resamples=500, seed=0)


def test_deterministic_for_a_seed_and_independent_of_the_block_size(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    cont, lattice = rng.random(301), rng.integers(0, 5, 301) / 5
    fam = np.column_stack([cont, rng.random(301)])
    before = [bca((cont,), seed=4, n_resamples=999), bca((lattice,), seed=4, n_resamples=999)]
    before_fam = bca_family(fam, seed=4, n_resamples=999)
    monkeypatch.setattr(resample, "BLOCK_ELEMENTS", 301 * 7)  # 7 rows per block instead of thousands
    after = [bca((cont,), seed=4, n_resamples=999), bca((lattice,), seed=4, n_resamples=999)]
    after_fam = bca_family(fam, seed=4, n_resamples=999)
    for a, b in zip(before + before_fam, after + after_fam, strict=True):
        assert np.array_equal(a.bootstrap_distribution, b.bootstrap_distribution)
        assert (a.low, a.high, a.z0) == (b.low, b.high, b.z0)


def test_results_do_not_depend_on_the_thread_count(monkeypatch) -> None:
    """Streams of resamples have their own child seeds, so one worker or many draw the same θ*."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    d, fam = rng.random(500), rng.random((500, 3))
    n_resamples = 3 * resample.STREAM_ROWS + 17  # several streams and a ragged last one
    before = [bca((d,), seed=2, n_resamples=n_resamples), *bca_family(fam, seed=2, n_resamples=n_resamples)]
    one_worker = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(resample, "_pool", lambda: one_worker)
    after = [bca((d,), seed=2, n_resamples=n_resamples), *bca_family(fam, seed=2, n_resamples=n_resamples)]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.bootstrap_distribution, b.bootstrap_distribution)
    # A SeedSequence given as the seed is read, never consumed: the same object draws the same twice.
    seq = np.random.SeedSequence(7)
    assert bca((d,), seed=seq, n_resamples=2000).low == bca((d,), seed=seq, n_resamples=2000).low


def test_a_forked_child_can_bootstrap_after_the_parent_did() -> None:
    """Worker task processes are forked; an inherited pool without its threads would hang forever."""
    import multiprocessing

    d = np.random.default_rng(0).random(300)
    parent = bca((d,), seed=1, n_resamples=3000)  # starts the parent's thread pool
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(bca, ((d,),), {"seed": 1, "n_resamples": 3000}).get(timeout=60)
    assert (child.low, child.high) == (parent.low, parent.high)


def test_lattice_ties_are_counted_exactly() -> None:
    """3-seed averages of EM deltas sit on a 1/(3n) lattice; float sums of thirds miscount ties with θ̂."""
    n = 200
    d = np.random.default_rng(0).integers(-3, 4, n) / 3
    assert resample.lattice_scale(d) == 3
    res = bca((d,), n_resamples=B, seed=3)
    num = np.rint(res.bootstrap_distribution * n * 3)  # exact integer numerators
    hat = np.rint(d * 3).sum()
    assert np.count_nonzero(num == hat) > 0  # the case the convention is about
    exact = ndtri((np.count_nonzero(num < hat) + np.count_nonzero(num <= hat)) / (2 * B))
    assert res.z0 == pytest.approx(exact, abs=1e-15)
    # The naive float comparison (θ* = Σd/n against np.mean(d)) on the same draws gets another z0.
    floats = resample.totals(d[:, None], B, 3)[:, 0] / n
    naive = ndtri((np.count_nonzero(floats < d.mean()) + np.count_nonzero(floats <= d.mean())) / (2 * B))
    assert naive != pytest.approx(exact, abs=1e-6)


def test_discrete_data_use_exact_multinomial_draws() -> None:
    """0/1 data: θ* has the bootstrap's mean and variance (p, p(1−p)/n) and scipy's interval."""
    x = (np.random.default_rng(4).random(400) < 0.3).astype(float)
    res = bca((x,), n_resamples=20_000, seed=8)
    p, n = x.mean(), len(x)
    dist = res.bootstrap_distribution
    assert dist.mean() == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / n / 20_000))
    assert dist.var() == pytest.approx(p * (1 - p) / n, rel=0.05)
    assert np.allclose(dist * n, np.rint(dist * n))  # integer numerators


def test_family_shares_one_count_matrix() -> None:
    """Θ* = C @ D: a column scaled by 2 gets exactly twice the draws; each column matches scipy."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.1, 1, 500), rng.gamma(2, 1, 500)
    fam = bca_family(np.column_stack([a, 2 * a, b]), n_resamples=B, seed=3)
    assert np.allclose(fam[1].bootstrap_distribution, 2 * fam[0].bootstrap_distribution, rtol=1e-13, atol=0)
    for col, res in zip((a, 2 * a, b), fam, strict=True):
        ref = scipy_on_our_draws(res, (col,), np.mean)
        assert (res.low, res.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    single = bca((b,), n_resamples=10_000, seed=3)
    fam_b = bca_family(np.column_stack([a, b]), n_resamples=10_000, seed=9)[1]
    assert abs(single.low - fam_b.low) < 0.1 * b.std() / np.sqrt(500)


def test_percentile_intervals_are_refused_by_a_bca_bound() -> None:
    from stats.quantile import quantile_ratio

    res = quantile_ratio(np.arange(1.0, 51), np.arange(1.0, 51) * 1.1, n_resamples=200, seed=0)
    with pytest.raises(ValueError, match="BCa"):
        lower_bound(res, 0.95)


def test_chrf_ratio_statistic_runs_on_sacrebleu_segment_statistics() -> None:
    import sacrebleu

    metric = sacrebleu.CHRF()
    refs = [f"the value of field {i} is {i * 7}" for i in range(40)]
    good = [f"the value of field {i} is {i * 7}" if i % 3 else f"field {i} = {i}" for i in range(40)]
    bad = [f"value {i}" for i in range(40)]
    s_good = np.array(metric._extract_corpus_statistics(good, [refs]), dtype=float)
    s_bad = np.array(metric._extract_corpus_statistics(bad, [refs]), dtype=float)
    res = paired_bca(s_bad, s_good, statistic="ratio", metric=corpus.chrf, n_resamples=2000, seed=0)
    ref_good = metric.corpus_score(good, [refs]).score
    ref_bad = metric.corpus_score(bad, [refs]).score
    assert res.estimate == pytest.approx(ref_good - ref_bad, abs=1e-9)
    assert res.low > 0 and res.p_value < 0.01


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-5, 5), seed=st.integers(0, 1000))
def test_shift_equivariance_and_order_invariance(shift, seed) -> None:
    d = np.random.default_rng(seed).normal(size=40)
    base = bca((d,), n_resamples=300, seed=seed)
    moved = bca((d + shift,), n_resamples=300, seed=seed)
    assert moved.low == pytest.approx(base.low + shift, abs=1e-9)
    assert moved.high == pytest.approx(base.high + shift, abs=1e-9)
    # Reordering examples permutes which index means which example; the interval moves only by MC noise.
    # 20,000 resamples: at 2,000, z0's noise alone moved a lower bound by 0.55 SE of the mean (seed 924).
    shuffled = bca((np.random.default_rng(seed + 1).permutation(d),), n_resamples=20_000, seed=seed)
    ref = bca((d,), n_resamples=20_000, seed=seed)
    assert abs(shuffled.low - ref.low) < 0.5 * d.std() / np.sqrt(len(d))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 5))
def test_discrete_results_do_not_depend_on_example_order_at_all(seed, k) -> None:
    """The multinomial path counts sorted distinct values, so a permutation changes nothing, exactly."""
    d = np.random.default_rng(seed).integers(-1, k, 200).astype(float)
    perm = np.random.default_rng(seed + 1).permutation(d)
    a, b = bca((d,), n_resamples=500, seed=seed, null=0.0), bca((perm,), n_resamples=500, seed=seed, null=0.0)
    assert (a.low, a.high, a.z0, a.acceleration, a.p_value) == pytest.approx(
        (b.low, b.high, b.z0, b.acceleration, b.p_value), abs=1e-15
    )
