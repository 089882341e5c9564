"""BH and BY against statsmodels and scipy; the BH 1995 worked example; FCR intervals from the same draws."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from stats.bootstrap import bca_family, lower_bound
from stats.multitest import fdr


def test_benjamini_hochberg_1995_worked_example() -> None:
    """BH 1995 §4: 15 p-values; BH at .05 rejects the 4 smallest (Bonferroni only 3)."""
    p = [
        0.0001,
        0.0004,
        0.0019,
        0.0095,
        0.0201,
        0.0278,
        0.0298,
        0.0344,
        0.0459,
        0.3240,
        0.4262,
        0.5719,
        0.6528,
        0.7590,
        1.000,
    ]
    res = fdr(p, q=0.05)
    assert res.rejected == (True,) * 4 + (False,) * 11
    assert res.fcr_level == pytest.approx(1 - 4 * 0.05 / 15)
    # BY is BH at q / c(m), c(15) = Σ 1/i: it rejects 3 here, and its intervals use that smaller q.
    by = fdr(p, q=0.05, method="by")
    c15 = sum(1 / i for i in range(1, 16))
    assert by.rejected == (True,) * 3 + (False,) * 12
    assert by.fcr_level == pytest.approx(1 - 3 * 0.05 / c15 / 15)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 40), q=st.sampled_from([0.01, 0.05, 0.1, 0.2]))
def test_bh_and_by_equal_statsmodels_and_scipy_with_ties(seed, m, q) -> None:
    rng = np.random.default_rng(seed)
    p = np.round(rng.beta(0.4, 1.0, m), 2)  # rounding makes ties, and some exact zeros and ones
    for method, sm, sp in (("bh", "fdr_bh", "bh"), ("by", "fdr_by", "by")):
        res = fdr(p, q=q, method=method)
        rej, adj, _, _ = multipletests(p, alpha=q, method=sm)
        assert np.array_equal(res.rejected, rej)
        assert np.allclose(res.p_adjusted, adj, rtol=0, atol=1e-15)
        assert np.allclose(res.p_adjusted, scipy.stats.false_discovery_control(p, method=sp), atol=1e-12)


def test_bh_formula_by_hand() -> None:
    p = np.array([0.04, 0.01, 0.03, 0.02, 0.9])
    m = len(p)
    srt = np.sort(p)
    by_hand = np.minimum.accumulate((m * srt / np.arange(1, m + 1))[::-1])[::-1]
    assert np.allclose(sorted(fdr(p).p_adjusted), np.minimum(by_hand, 1))


def test_nan_and_bad_p_values_are_refused() -> None:
    with pytest.raises(ValueError, match=r"NaN p-values at positions \[1\]"):
        fdr([0.01, float("nan"), 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fdr([0.01, 1.2])
    with pytest.raises(ValueError, match="unknown FDR method"):
        fdr([0.01], method="holm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        fdr([])


@pytest.mark.parametrize("method", ["bh", "by"])
def test_rejected_iff_the_fcr_adjusted_lower_bound_is_above_zero(method) -> None:
    """STATS_SPEC §5: with BCa p-values from the same draws, rejected ⇔ the (1 − R·q/m) bound > 0."""
    checked = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        effects = rng.choice([0.0, 0.0, 0.1, 0.2, 0.3], 8)
        deltas = rng.normal(effects, 1.0, (300, 8))
        results = bca_family(deltas, n_resamples=4000, seed=seed)
        fam = fdr([r.p_value for r in results], q=0.1, method=method)
        if not fam.n_rejected:
            continue
        for r, rejected, p_adj in zip(results, fam.rejected, fam.p_adjusted, strict=True):
            if abs(p_adj - fam.q) < 3 * r.p_value_se * 8:  # the identity holds up to MC error
                continue
            assert (lower_bound(r, fam.fcr_level) > 0) == rejected
            checked += 1
    assert checked > 40
