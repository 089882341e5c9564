"""Percentile intervals for quantile ratios; the seeds × examples multi-bootstrap and sign consistency."""

import numpy as np
import pytest
import scipy.stats

from stats.bootstrap import NoData, bca
from stats.quantile import percentile_interval, quantile_ratio
from stats.resample import index_blocks, streams
from stats.seeds import multi_bootstrap, sign_consistency


def test_quantile_ratio_is_scipy_percentile_on_the_same_draws() -> None:
    rng = np.random.default_rng(0)
    base = rng.lognormal(3, 0.4, 300)
    var = base * rng.lognormal(0.1, 0.1, 300)
    res = quantile_ratio(base, var, n_resamples=3000, seed=1)
    assert res.method == "percentile"
    assert res.estimate == pytest.approx(np.median(var) / np.median(base))

    def ratio(v, b, axis=-1):
        return np.median(v, axis=axis) / np.median(b, axis=axis)

    ref = scipy.stats.bootstrap(
        (var, base),
        ratio,
        paired=True,
        n_resamples=0,
        bootstrap_result=res,
        method="percentile",
        vectorized=True,
    ).confidence_interval
    assert (res.low, res.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert res.low < np.exp(0.1) < res.high


def test_quantile_ratio_p90_and_errors() -> None:
    base = np.arange(1.0, 201)
    res = quantile_ratio(base, base * 1.2, q=0.9, n_resamples=500, seed=0)
    assert (
        res.estimate == pytest.approx(1.2)
        and res.low == pytest.approx(1.2)
        and res.high == pytest.approx(1.2)
    )
    with pytest.raises(ValueError, match="quantile is 0"):
        quantile_ratio(np.r_[np.zeros(30), np.ones(2)], np.ones(32), n_resamples=200, seed=0)
    with pytest.raises(ValueError, match="q must be"):
        quantile_ratio(base, base, q=50)
    with pytest.raises(NoData):
        percentile_interval((np.array([np.nan, 1.0]),), np.median)


def test_percentile_median_covers_the_truth_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(5)
    hits = sum(
        (r := percentile_interval((rng.exponential(size=80),), np.median, n_resamples=400, seed=s)).low
        <= np.log(2)
        <= r.high
        for s in range(150)
    )
    assert 0.86 * 150 <= hits <= 150  # nominal .95; the percentile interval undercovers a little at n = 80


def _brute_force_multi(d, n_resamples, seed):
    """The same random streams, spelled out one replicate at a time."""
    s, n = d.shape
    out = []
    for stream in streams(seed, n_resamples):
        rng = stream.rng()
        seed_counts = rng.multinomial(s, np.full(s, 1 / s), size=stream.hi - stream.lo)
        for lo, idx in index_blocks(stream, n, rng):
            for b in range(len(idx)):
                drawn_examples = np.bincount(idx[b], minlength=n)
                grid = [
                    d[si, i] * seed_counts[lo - stream.lo + b, si] * drawn_examples[i]
                    for si in range(s)
                    for i in range(n)
                ]
                out.append(sum(grid) / (s * n))
    return np.array(out)


def test_multi_bootstrap_is_the_mean_over_drawn_seeds_and_examples() -> None:
    d = np.random.default_rng(2).normal(0.1, 1, (3, 12))
    res = multi_bootstrap(d, n_resamples=1500, seed=4)  # more than one stream
    assert np.allclose(res.bootstrap_distribution, _brute_force_multi(d, 1500, 4), rtol=1e-12)
    assert res.estimate == pytest.approx(d.mean()) and res.method == "percentile"


def test_seed_variance_widens_the_multi_bootstrap() -> None:
    rng = np.random.default_rng(3)
    examples = rng.normal(0.2, 1, 200)
    same = np.tile(examples, (5, 1))  # seeds that agree exactly: only examples vary
    noisy = same + rng.normal(0, 0.5, (5, 1))  # each seed shifted as a whole
    width = lambda r: r.high - r.low  # noqa: E731
    only_examples = bca((examples,), n_resamples=4000, seed=1)
    assert width(multi_bootstrap(same, n_resamples=4000, seed=1)) == pytest.approx(
        width(only_examples), rel=0.1
    )
    assert width(multi_bootstrap(noisy, n_resamples=4000, seed=1)) > 1.5 * width(only_examples)


def test_sign_consistency() -> None:
    d = np.array([[1.0, 0.0], [-1.0, -0.5], [0.2, 0.2], [0.0, 0.0]])
    res = sign_consistency(d)
    assert res.per_seed == (0.5, -0.75, 0.2, 0.0) and res.positive == 2 and str(res) == "2/4 > 0"
    with pytest.raises(ValueError, match="complete"):
        multi_bootstrap(np.array([[1.0, np.nan], [0.0, 1.0]]))
