"""Gate kinds beyond "variant's mean beats baseline's": preconditions, lower-is-better and relative
claims, corpus metrics over per-example statistics, the exact rare-event path, and the mixed family."""

import re
import tomllib

import msgspec
import numpy as np
import pandas as pd
import pytest
import sacrebleu
from msgspec.structs import replace as restruct
from scipy.optimize import minimize_scalar
from scipy.special import ndtri
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar

from stats import claims as claims_module
from stats import rare
from stats.bootstrap import bca
from stats.corpus import chrf
from stats.gates import Claim, GateSpec, Guard, Precondition, evaluate
from stats.multitest import fdr

COLS = ["example_id", "arm", "seed", "metric", "value"]


def rows(metric: str, arm: str, values, seed: int = 1) -> list[tuple]:
    return [(i, arm, seed, metric, float(v)) for i, v in enumerate(values)]


def frame(*parts: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([r for part in parts for r in part], columns=COLS)


def by_gate(verdict):
    return {d.gate: d for d in verdict.decisions}


def continuous(n=200, seeds=(1, 2, 3), effects=None, seed=0) -> pd.DataFrame:
    """Per-example baseline plus the metric's effect and noise in the variant, per seed."""
    rng = np.random.default_rng(seed)
    parts = []
    for metric, effect in (effects or {"em": 0.1}).items():
        base = rng.normal(0.5, 0.3, n)
        for s in seeds:
            parts += [rows(metric, "base", base + rng.normal(0, 0.05, n), s)]
            parts += [rows(metric, "bem", base + effect + rng.normal(0, 0.3, n), s)]
    return frame(*parts)


def flags(n: int, ones: list[int]) -> np.ndarray:
    out = np.zeros(n)
    out[ones] = 1
    return out


# -- direction "lower" ---------------------------------------------------------------------------


def test_lower_on_the_data_is_higher_on_the_negated_data() -> None:
    """ "lower" tests baseline − variant: the same numbers as "higher" on −values, bit for bit."""
    df = continuous(effects={"spike": -0.06})
    lower = by_gate(evaluate(GateSpec(claims=(Claim("c", "spike", "bem", "base", direction="lower"),)), df))
    negated = df.assign(value=-df["value"])
    higher = by_gate(evaluate(GateSpec(claims=(Claim("c", "spike", "bem", "base"),)), negated))
    fields = (
        "outcome",
        "estimate",
        "low",
        "high",
        "p_value",
        "p_adjusted",
        "p_value_se",
        "n",
        "seeds_positive",
    )
    assert [getattr(lower["c"], f) for f in fields] == [getattr(higher["c"], f) for f in fields]
    assert lower["c"].outcome == "pass" and lower["c"].estimate > 0  # > 0: the variant is better
    assert lower["c"].comparison == "bem vs base, lower is better"
    assert re.search(r"baseline − variant = \+0\.0\d+ \(lower is better\)", lower["c"].reason), lower[
        "c"
    ].reason
    # The seeds × examples check runs on the improvement too.
    seeds_part = re.search(r"seeds × examples \S+", lower["c"].reason)
    assert seeds_part is not None and seeds_part.group() in higher["c"].reason


def test_lower_min_effect_applies_to_the_improvement() -> None:
    df = continuous(effects={"viol": -0.1}, n=300)
    ok = evaluate(GateSpec(claims=(Claim("c", "viol", "bem", "base", 0.05, direction="lower"),)), df)
    short = evaluate(GateSpec(claims=(Claim("c", "viol", "bem", "base", 0.2, direction="lower"),)), df)
    assert ok.verdict == "promote", ok.reason
    assert short.verdict == "reject" and "< minimum effect +0.2" in short.decisions[0].reason
    worse = evaluate(
        GateSpec(claims=(Claim("c", "viol", "bem", "base", direction="lower"),)),
        continuous(effects={"viol": 0.1}),
    )
    assert worse.verdict == "reject" and worse.decisions[0].estimate < 0


# -- relative claims ---------------------------------------------------------------------------


def ratio_data(factor: float, n=300, seed=1) -> pd.DataFrame:
    """Positive per-example rates; the variant is `factor` times the baseline, with noise."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.5, n)
    bem = base * factor * rng.lognormal(0, 0.3, n)
    return frame(rows("rate", "base", base), rows("rate", "bem", bem))


def relative(r: float, direction="lower", metric="rate", name="rel") -> Claim:
    return Claim(name, metric, "bem", "base", direction=direction, relative=r)


def test_relative_claim_reports_the_ratio_of_means_and_its_bound() -> None:
    df = ratio_data(0.6)
    v = evaluate(GateSpec(claims=(relative(0.3),), n_resamples=4000), df)
    d = v.decisions[0]
    sums = df.groupby("arm")["value"].sum()
    assert d.estimate == pytest.approx(sums["bem"] / sums["base"], rel=1e-12)
    assert d.outcome == "pass" and v.verdict == "promote", d.reason
    assert re.search(r"ratio v/b = 0\.\d+ \[0\.\d+, 0\.\d+\], needs ≤ 0\.7", d.reason), d.reason
    # Selected: the FCR-adjusted one-sided bound is an upper bound on the ratio, below 1 − .3.
    assert d.low is None and d.high < 0.7 and d.interval.startswith("FCR-adjusted one-sided 0.9500 BCa")
    assert evaluate(GateSpec(claims=(relative(0.5),), n_resamples=4000), df).verdict == "reject"
    more = evaluate(GateSpec(claims=(relative(0.3, "higher"),), n_resamples=4000), ratio_data(1.6))
    assert more.verdict == "promote" and more.decisions[0].low > 1.3 and more.decisions[0].high is None
    assert "needs ≥ 1.3" in more.decisions[0].reason


def test_a_negative_relative_is_a_non_inferiority_margin() -> None:
    """r = −.05 ("higher") tests R > .95: a variant near the baseline passes, one at .85× of it fails; the
    decision's bound is a lower bound on the ratio."""
    near = evaluate(GateSpec(claims=(relative(-0.05, "higher"),), n_resamples=4000), ratio_data(0.98, n=2000))
    d = near.decisions[0]
    assert d.outcome == "pass" and d.low is not None and 0.95 < d.low < d.estimate, d.reason
    assert "needs ≥ 0.95" in d.reason
    far = evaluate(GateSpec(claims=(relative(-0.05, "higher"),), n_resamples=4000), ratio_data(0.85, n=2000))
    assert far.decisions[0].outcome == "fail", far.decisions[0].reason
    with pytest.raises(ValueError, match="above -1"):
        relative(-1.0, "higher")


def _tested(claim: Claim, df: pd.DataFrame, b: int = 20_000, seed: int = 4):
    data = claims_module._prepare(claim, df, 0.95)
    return claims_module._ratio_test(data, b, 0.95, np.random.SeedSequence(seed))


@pytest.mark.parametrize(("direction", "factor", "r"), [("lower", 0.66, 0.3), ("higher", 1.3, 0.3)])
def test_relative_p_inverts_the_bound_on_the_ratio_scale(direction, factor, r) -> None:
    """p ↔ bound: the favourable one-sided bound at level 1 − p sits on the null ratio (up to MC error),
    and for "lower" the bootstrap of −R is exactly the negated bootstrap of R (BCa respects it)."""
    df = ratio_data(factor)
    t = _tested(relative(r, direction), df)
    null = 1 - r if direction == "lower" else 1 + r
    assert 0.001 < t.p_value < 0.5, t.p_value
    assert t.bound(1 - t.p_value) == pytest.approx(null, abs=0.004)
    assert t.upper == (direction == "lower")
    stats = np.column_stack([df[df.arm == "bem"].value, df[df.arm == "base"].value])
    direct = bca((stats,), "ratio", n_resamples=20_000, seed=np.random.SeedSequence(4), null=null)
    assert (t.low, t.high, t.estimate) == pytest.approx((direct.low, direct.high, direct.estimate), abs=1e-12)
    expected_p = 1 - direct.p_value if direction == "lower" else direct.p_value
    assert t.p_value == pytest.approx(expected_p, abs=1e-12)


def test_relative_claims_selected_by_bh_are_those_whose_fcr_bound_clears_the_null() -> None:
    """BH-rejected ⇔ the one-sided (1 − R·q/m) bound on the ratio lies beyond the null (BY 2005),
    for every claim of the family, selected or not; and the gate reports exactly those bounds."""
    df = pd.concat(
        [ratio_data(f, seed=i).replace("rate", f"rate{i}") for i, f in enumerate((0.5, 0.58, 0.72, 0.9))]
    )
    spec = GateSpec(claims=tuple(relative(0.3, metric=f"rate{i}", name=f"c{i}") for i in range(4)), q=0.1)
    decisions = evaluate(spec, df).decisions
    family = fdr([d.p_value for d in decisions], q=0.1)
    assert [d.p_adjusted for d in decisions] == pytest.approx(list(family.p_adjusted), abs=1e-15)
    assert 0 < family.n_rejected < 4
    data = {i: claims_module._prepare(c, df, 0.95) for i, c in enumerate(spec.claims)}
    tested = claims_module._test_all(data, 4, 10_000, 0.95, np.random.SeedSequence(3))
    fcr = fdr([t.p_value for t in tested.values()], q=0.1).fcr_level
    assert fcr is not None
    for i, d in enumerate(decisions):
        assert family.rejected[i] == (tested[i].bound(fcr) < 0.7)
        if family.rejected[i]:
            assert d.outcome == "pass" and d.low is None and d.high < 0.7
        else:
            assert d.outcome == "fail" and d.low is not None and d.high is not None  # unadjusted two-sided


# -- corpus metrics ------------------------------------------------------------------------------


def _sentences(rng, n, quality):
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "field", "value", "is", "7", "12", "json"]
    refs = [" ".join(rng.choice(words, rng.integers(4, 12))) for _ in range(n)]

    def hyps():
        return [
            r if rng.random() < quality else " ".join(rng.choice(words, rng.integers(2, 12))) for r in refs
        ]

    return refs, hyps


def chrf_rows(arm: str, hyps, refs, seed: int = 1) -> list[tuple]:
    stats = sacrebleu.CHRF()._extract_corpus_statistics(hyps, [refs])
    return [(i, arm, seed, f"chrf#{j}", float(v)) for i, row in enumerate(stats) for j, v in enumerate(row)]


def corpus_score(hyps, refs) -> float:
    return sacrebleu.CHRF().corpus_score(hyps, [refs]).score


def test_corpus_claim_is_the_sacrebleu_corpus_chrf_difference() -> None:
    rng = np.random.default_rng(0)
    refs, hyps = _sentences(rng, 80, 0.3)
    base, bem = hyps(), [r if i % 2 else h for i, (r, h) in enumerate(zip(refs, hyps(), strict=True))]
    df = frame(chrf_rows("base", base, refs), chrf_rows("bem", bem, refs))
    claim = Claim("chrf_up", "chrf", "bem", "base", corpus="chrf")
    d = evaluate(GateSpec(claims=(claim,), n_resamples=3000), df).decisions[0]
    assert d.estimate == pytest.approx(corpus_score(bem, refs) - corpus_score(base, refs), abs=1e-9)
    assert d.outcome == "pass" and "chrf(Σ variant) − chrf(Σ baseline)" in d.reason and d.n == 80
    lower = evaluate(GateSpec(claims=(restruct(claim, direction="lower"),), n_resamples=3000), df).decisions[
        0
    ]
    assert lower.estimate == pytest.approx(-d.estimate, abs=1e-12) and lower.outcome == "fail"
    rel = evaluate(GateSpec(claims=(restruct(claim, relative=0.1),), n_resamples=3000), df).decisions[0]
    assert rel.estimate == pytest.approx(corpus_score(bem, refs) / corpus_score(base, refs), rel=1e-12)
    assert "needs ≥ 1.1" in rel.reason


def test_corpus_claim_averages_seeds_per_example_and_column() -> None:
    """Seeds are averaged per example and statistic; chrF is scale-free in its totals, so the claim's θ
    is sacrebleu's chrF of both seeds' outputs pooled."""
    rng = np.random.default_rng(1)
    refs, hyps = _sentences(rng, 40, 0.4)
    outputs = {(arm, s): hyps() for arm in ("base", "bem") for s in (1, 2)}
    df = frame(*(chrf_rows(arm, h, refs, s) for (arm, s), h in outputs.items()))
    d = evaluate(GateSpec(claims=(Claim("c", "chrf", "bem", "base", corpus="chrf"),), n_resamples=1000), df)
    pooled = {arm: outputs[arm, 1] + outputs[arm, 2] for arm in ("base", "bem")}
    expected = corpus_score(pooled["bem"], refs + refs) - corpus_score(pooled["base"], refs + refs)
    assert d.decisions[0].estimate == pytest.approx(expected, abs=1e-9)


def test_corpus_claim_interval_is_the_paired_bca_of_the_statistics() -> None:
    """Resampling whole examples' statistics (the O(n·k) jackknife, nothing refitted): the claim's
    interval is bca's paired "ratio" statistic with the chrf metric on the same draws."""
    rng = np.random.default_rng(2)
    refs, hyps = _sentences(rng, 60, 0.3)
    base, bem = hyps(), hyps()
    df = frame(chrf_rows("base", base, refs), chrf_rows("bem", bem, refs))
    t = _tested(Claim("c", "chrf", "bem", "base", corpus="chrf"), df, b=5000)
    v = np.array(sacrebleu.CHRF()._extract_corpus_statistics(bem, [refs]), dtype=float)
    b = np.array(sacrebleu.CHRF()._extract_corpus_statistics(base, [refs]), dtype=float)
    direct = bca((np.hstack([v, b]),), "ratio", n_resamples=5000, seed=np.random.SeedSequence(4), null=0.0,
                 metric=lambda s: chrf(s[..., :18]) - chrf(s[..., 18:]))  # fmt: skip
    assert (t.estimate, t.low, t.high, t.p_value) == pytest.approx(
        (direct.estimate, direct.low, direct.high, direct.p_value), abs=1e-12
    )
    assert direct.estimate == pytest.approx(corpus_score(bem, refs) - corpus_score(base, refs), abs=1e-9)


# -- rare events -------------------------------------------------------------------------------


def rare_data(n=300) -> pd.DataFrame:
    """Baseline violates on 12 examples, the variant on 1 of them: 11 discordant pairs, all for it."""
    base, bem = flags(n, list(range(12))), flags(n, [0])
    return frame(rows("viol", "base", base), rows("viol", "bem", bem))


def test_rare_events_take_the_exact_mcnemar_path() -> None:
    df = rare_data()
    d = evaluate(GateSpec(claims=(Claim("c", "viol", "bem", "base", direction="lower"),)), df).decisions[0]
    assert d.p_value == pytest.approx(binomtest(11, 11, 0.5, alternative="greater").pvalue, rel=1e-12)
    table = [[288, 0], [11, 1]]  # rows: baseline 0/1; columns: variant 0/1
    assert d.p_value == pytest.approx(mcnemar(table, exact=True).pvalue / 2, rel=1e-12)
    assert d.p_value_se == 0.0 and d.outcome == "pass" and d.estimate == pytest.approx(11 / 300)
    assert "exact McNemar, 11 discordant pairs favour the variant, 0 the baseline" in d.reason
    assert d.interval.startswith("FCR-adjusted one-sided 0.9500 Tango score")
    assert d.low == pytest.approx(rare.tango_lower(11, 0, 300, 0.95)) and 0 < d.low < 11 / 300
    # Unselected, the two-sided Tango interval: never a degenerate point.
    two = evaluate(GateSpec(claims=(Claim("c", "viol", "bem", "base", direction="lower"),), q=1e-4), df)
    lo, hi = rare.tango_interval(11, 0, 300, 0.95)
    assert (two.decisions[0].low, two.decisions[0].high) == (lo, hi) and lo < 11 / 300 < hi


def test_exact_mcnemar_matches_statsmodels_both_ways() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        f, u = (int(x) for x in rng.integers(0, 15, 2))
        if f + u == 0:
            continue
        two_sided = mcnemar([[100, u], [f, 3]], exact=True).pvalue
        assert min(1.0, 2 * min(rare.mcnemar_p(f, u), rare.mcnemar_p(u, f))) == pytest.approx(two_sided)


def test_tango_interval_public_anchor_and_restricted_mle() -> None:
    """Cavo et al. 2012 (Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables):
    n12 = 6, n21 = 16, N = 161 gives −0.0621 (95% CI −0.1240 to −0.0054); McNemar exact P = 0.052479."""
    low, high = rare.tango_interval(6, 16, 161, 0.95)
    assert (round(low, 4), round(high, 4)) == (-0.1240, -0.0054)
    assert round(2 * rare.mcnemar_p(16, 6), 6) == 0.052479
    # No discordant pair: closed form ±z²/(n + z²).
    z2 = ndtri(0.975) ** 2
    assert rare.tango_interval(0, 0, 50, 0.95) == pytest.approx((-z2 / (50 + z2), z2 / (50 + z2)), abs=1e-10)
    # The closed-form restricted MLE is the numerical maximiser of the multinomial likelihood.
    for b, c, n, delta in [(6, 16, 161, -0.1), (11, 0, 300, 0.01), (3, 2, 40, 0.2), (0, 4, 90, -0.08)]:

        def nll(p, b=b, c=c, n=n, delta=delta):
            return -(b * np.log(p + delta) + c * np.log(p) + (n - b - c) * np.log(1 - 2 * p - delta))

        lo_p, hi_p = max(0.0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12
        numeric = minimize_scalar(nll, bounds=(lo_p, hi_p), method="bounded", options={"xatol": 1e-12}).x
        assert rare.restricted_mle(b, c, n, delta) == pytest.approx(numeric, abs=1e-6)
    # The endpoints are where the score statistic crosses ±z.
    assert rare.tango_z(6, 16, 161, low) == pytest.approx(ndtri(0.975), abs=1e-6)
    assert rare.tango_z(6, 16, 161, high) == pytest.approx(-ndtri(0.975), abs=1e-6)


def test_no_events_in_either_arm_is_no_evidence_and_stays_in_the_family() -> None:
    df = frame(rows("viol", "base", np.zeros(100)), rows("viol", "bem", np.zeros(100)))
    df = pd.concat([df, continuous(n=100)])
    spec = GateSpec(
        claims=(Claim("c", "viol", "bem", "base", direction="lower"), Claim("em", "em", "bem", "base"))
    )
    v = evaluate(spec, df)
    d = by_gate(v)
    assert d["c"].outcome == "no_evidence" and "no discordant pairs" in d["c"].reason
    assert d["c"].low < 0 < d["c"].high  # Tango's interval around 0, not a point
    assert d["em"].p_adjusted == pytest.approx(min(1.0, 2 * d["em"].p_value))  # m = 2: the empty claim counts
    assert v.verdict == "inconclusive"
    rel = evaluate(GateSpec(claims=(relative(0.3, metric="viol"),)), df).decisions[0]
    assert rel.outcome == "no_evidence" and "no event in either arm" in rel.reason and rel.estimate is None


def test_three_events_in_each_arm_use_the_bootstrap() -> None:
    df = frame(
        rows("viol", "base", flags(200, [0, 1, 2, 3, 4, 5, 6, 7])), rows("viol", "bem", flags(200, [0, 1, 2]))
    )
    d = evaluate(
        GateSpec(claims=(Claim("c", "viol", "bem", "base", direction="lower"),), n_resamples=2000), df
    )
    assert "BCa" in d.decisions[0].interval and "McNemar" not in d.decisions[0].reason


def test_rare_relative_test_inverts_its_clopper_pearson_bound() -> None:
    d = evaluate(GateSpec(claims=(relative(0.3, metric="viol"),)), rare_data()).decisions[0]
    pi0 = 0.7 / 1.7
    assert d.p_value == pytest.approx(binomtest(1, 12, pi0, alternative="less").pvalue, rel=1e-12)
    assert d.outcome == "pass" and d.estimate == pytest.approx(1 / 12) and d.high < 0.7
    assert "1 of the 12 examples with an event have it in the variant" in d.reason
    p = d.p_value
    assert rare.ratio_upper(1, 12, 1 - p) == pytest.approx(0.7, abs=1e-9)  # p ↔ bound, exactly
    swapped = rare_data().assign(arm=lambda t: t["arm"].map({"bem": "base", "base": "bem"}))
    more = evaluate(GateSpec(claims=(relative(0.5, "higher", "viol"),)), swapped)
    assert more.decisions[0].outcome == "pass" and more.decisions[0].low > 1.5


def test_rare_relative_test_keeps_its_level_where_discordant_pairs_alone_would_not() -> None:
    """At the H0 boundary p_v = .7·p_b with concordant events, the any-event binomial rejects at most
    α of the time; a test on the discordant pairs alone (π0 = ρ/(1 + ρ)) would reject far more."""
    rng = np.random.default_rng(9)
    p11, p_b = 0.02, 0.05
    cells = np.array([p11, 0.7 * p_b - p11, p_b - p11])  # both, variant only, baseline only
    sims = rng.multinomial(400, [*cells, 1 - cells.sum()], size=3000)
    ours = [rare.fewer_events_p(s[0] + s[1], s[0] + s[1] + s[2], 0.7) <= 0.05 for s in sims]
    naive = [rare.fewer_events_p(s[1], s[1] + s[2], 0.7) <= 0.05 for s in sims if s[1] + s[2]]
    assert np.mean(ours) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 3000)
    assert np.mean(naive) > 0.1


# -- preconditions ------------------------------------------------------------------------------


def precondition_data(valid_share: float, n=200) -> pd.DataFrame:
    ones = list(range(round(valid_share * n)))
    return pd.concat([continuous(n=n), frame(rows("json_valid", "fixed_json", flags(n, ones)))])


SPEC = GateSpec(
    claims=(Claim("em", "em", "bem", "base"),),
    guards=(Guard("params", "value", "adapter_param_ratio", low=0.95, high=1.05),),
    n_resamples=2000,
)
PARSES = Precondition("json_parses", "level", "json_valid", "fixed_json", low=0.9)


def test_a_failing_precondition_is_inconclusive_even_when_every_gate_passes() -> None:
    v = evaluate(
        restruct(SPEC, preconditions=(PARSES,)), precondition_data(0.12), {"adapter_param_ratio": 1.0}
    )
    assert v.verdict == "inconclusive"
    assert v.reason.startswith("precondition(s) ['json_parses'] failed: json_valid = 0.12 < 0.9"), v.reason
    assert "(claims and guards alone: promote)" in v.reason
    d = by_gate(v)
    assert [x.kind for x in v.decisions] == ["precondition", "primary", "guard"]
    assert d["em"].passed and d["params"].passed and d["json_parses"].outcome == "fail"
    assert d["json_parses"].family is None and d["json_parses"].p_adjusted is None  # not in the BH family


def test_a_passing_precondition_leaves_the_verdict_and_every_decision_as_before() -> None:
    df, values = precondition_data(0.95), {"adapter_param_ratio": 1.2}
    without = evaluate(SPEC, df, values)
    with_ = evaluate(restruct(SPEC, preconditions=(PARSES,)), df, values)
    assert (
        (with_.verdict, with_.reason)
        == (without.verdict, without.reason)
        == ("reject", "guard(s) ['params'] failed")
    )
    assert with_.decisions[1:] == without.decisions  # same draws, same p_adj: not a family member
    assert with_.decisions[0].passed and with_.decisions[0].reason == "json_valid = 0.95 in [0.9, +inf]"


def test_a_precondition_is_judged_on_its_point_estimate_with_the_interval_beside_it() -> None:
    d = evaluate(
        restruct(SPEC, preconditions=(PARSES,)), precondition_data(0.92), {"adapter_param_ratio": 1.0}
    )
    pre = d.decisions[0]
    assert pre.passed and pre.estimate == pytest.approx(0.92) and d.verdict == "promote"
    assert (
        pre.low < 0.9 < pre.high
        and pre.interval == "BCa 95% two-sided, beside the point estimate (not judged)"
    )
    perfect = evaluate(
        restruct(SPEC, preconditions=(PARSES,)), precondition_data(1.0), {"adapter_param_ratio": 1.0}
    )
    assert perfect.decisions[0].passed and "degenerate" in perfect.decisions[0].interval


def test_preconditions_without_data_or_value_are_inconclusive() -> None:
    spec = restruct(
        SPEC,
        preconditions=(
            Precondition("expert", "level", "em", "expert", low=0.8),
            Precondition("pre_injection", "value", "pre_injection_aggregate", low=0.8),
        ),
    )
    v = evaluate(spec, precondition_data(0.95), {"adapter_param_ratio": 1.0})
    assert v.verdict == "inconclusive" and v.reason.startswith(
        "precondition(s) ['expert', 'pre_injection'] failed"
    )
    assert [d.outcome for d in v.decisions[:2]] == ["nodata", "nodata"]
    ok = evaluate(
        spec,
        precondition_data(0.95).replace("base", "expert"),
        {"adapter_param_ratio": 1.0, "pre_injection_aggregate": 0.85},
    )
    assert [d.outcome for d in ok.decisions[:2]] == ["fail", "pass"]  # expert's em mean 0.5 < 0.8
    assert ok.decisions[1].estimate == 0.85 and ok.decisions[1].interval == "exact value"


def test_corpus_precondition_is_sacrebleu_corpus_chrf_of_the_arm() -> None:
    rng = np.random.default_rng(3)
    refs, hyps = _sentences(rng, 50, 0.5)
    out = hyps()
    df = pd.concat([continuous(n=50), frame(chrf_rows("fixed_sum", out, refs))])
    score = corpus_score(out, refs)
    for low, outcome in ((score - 1, "pass"), (score + 1, "fail")):
        pre = Precondition("sum_chrf", "corpus", "chrf", "fixed_sum", corpus="chrf", low=low)
        d = evaluate(restruct(SPEC, preconditions=(pre,)), df, {"adapter_param_ratio": 1.0}).decisions[0]
        assert d.outcome == outcome and d.estimate == pytest.approx(score, abs=1e-9)
        assert d.low < score < d.high and d.reason.startswith("chrf(chrf) = ")


def test_preconditions_alone_are_refused() -> None:
    with pytest.raises(ValueError, match="preconditions alone can only veto"):
        GateSpec(preconditions=(PARSES,))


# -- the mixed family --------------------------------------------------------------------------


def mixed_data() -> pd.DataFrame:
    rng = np.random.default_rng(4)
    refs, hyps = _sentences(rng, 300, 0.3)
    base = hyps()
    bem = [r if i % 3 == 0 else h for i, (r, h) in enumerate(zip(refs, hyps(), strict=True))]
    return pd.concat(
        [
            continuous(n=300, seeds=(1,), effects={"em": 0.08, "f1": 0.06}),
            rare_data(300),
            ratio_data(0.5, n=300).replace("rate", "spike"),
            frame(chrf_rows("base", base, refs), chrf_rows("bem", bem, refs)),
        ]
    )


MIXED = (
    Claim("em", "em", "bem", "base"),
    Claim("f1", "f1", "bem", "base"),
    Claim("viol", "viol", "bem", "base", direction="lower"),
    Claim("spike", "spike", "bem", "base", direction="lower", relative=0.3),
    Claim("chrf", "chrf", "bem", "base", corpus="chrf"),
)


def test_mixed_family_is_one_bh_family_deterministic_and_mean_claims_keep_their_draws() -> None:
    df = mixed_data()
    spec = GateSpec(claims=MIXED, n_resamples=3000, seed=7)
    first, again = evaluate(spec, df), evaluate(spec, df)
    assert first == again
    d = by_gate(first)
    family = fdr([d[c.name].p_value for c in MIXED])
    assert [d[c.name].p_adjusted for c in MIXED] == pytest.approx(list(family.p_adjusted), abs=1e-15)
    assert first.verdict == "promote", first.reason
    assert d["viol"].interval.endswith("Tango score") and d["spike"].interval.endswith("BCa")
    # The plain mean claims share one count matrix, from the child of the first of them: the other
    # kinds, drawing on their own children, do not move them.
    alone = by_gate(evaluate(GateSpec(claims=MIXED[:2], n_resamples=3000, seed=7), df))
    assert (d["em"].p_value, d["f1"].p_value) == (alone["em"].p_value, alone["f1"].p_value)
    assert d["em"].estimate == alone["em"].estimate


def test_a_relative_p_at_the_threshold_is_rerun_then_inconclusive() -> None:
    """Choose the null ratio where the p-value lands on q: MC noise could flip that decision."""
    df = ratio_data(0.66)
    probe = _tested(relative(0.3), df, b=200_000, seed=99)
    r = 1 - probe.bound(0.95)  # p = .05 at this null, up to MC error
    d = evaluate(GateSpec(claims=(relative(r),), n_resamples=5000), df).decisions[0]
    assert d.outcome == "inconclusive" and "re-run with B = 50000" in d.reason, d.reason
    assert abs(d.p_value - 0.05) < 3 * d.p_value_se


def test_an_exact_p_near_q_is_never_rerun() -> None:
    """Five discordant pairs, all for the variant: p = 1/32 exactly; no MC error, no re-run."""
    df = frame(rows("viol", "base", flags(50, [0, 1, 2, 3, 4])), rows("viol", "bem", np.zeros(50)))
    d = evaluate(GateSpec(claims=(Claim("c", "viol", "bem", "base", direction="lower"),), q=0.0313), df)
    assert d.decisions[0].p_value == pytest.approx(1 / 32, rel=1e-12) and d.decisions[0].outcome == "pass"
    assert "re-run" not in d.decisions[0].reason and d.decisions[0].p_value_se == 0.0


# -- the [gates] table ---------------------------------------------------------------------------

TOML = """
[gates]
q = 0.1
n_resamples = 2000

[[gates.preconditions]]
name = "json_parses"
statistic = "level"
metric = "json_valid"
arm = "fixed_json"
low = 0.9

[[gates.preconditions]]
name = "sum_chrf"
statistic = "corpus"
corpus = "chrf"
metric = "chrf"
arm = "fixed_sum"
low = 40.0

[[gates.preconditions]]
name = "pre_injection"
statistic = "value"
metric = "pre_injection_aggregate"
low = 0.8
high = 1.0

[[gates.claims]]
name = "fewer_violations"
metric = "violation"
variant = "bem"
baseline = "base"
direction = "lower"
relative = 0.3

[[gates.claims]]
name = "chrf_up"
metric = "chrf"
variant = "bem"
baseline = "base"
corpus = "chrf"
min_effect = 1.0

[[gates.guards]]
name = "params"
statistic = "value"
metric = "adapter_param_ratio"
high = 1.05
"""


def test_every_new_field_converts_from_a_toml_gates_table() -> None:
    spec = msgspec.convert(tomllib.loads(TOML)["gates"], GateSpec, strict=True)
    assert spec == GateSpec(
        claims=(
            Claim("fewer_violations", "violation", "bem", "base", direction="lower", relative=0.3),
            Claim("chrf_up", "chrf", "bem", "base", min_effect=1.0, corpus="chrf"),
        ),
        guards=(Guard("params", "value", "adapter_param_ratio", high=1.05),),
        preconditions=(
            Precondition("json_parses", "level", "json_valid", "fixed_json", low=0.9),
            Precondition("sum_chrf", "corpus", "chrf", "fixed_sum", corpus="chrf", low=40.0),
            Precondition("pre_injection", "value", "pre_injection_aggregate", low=0.8, high=1.0),
        ),
        q=0.1,
        n_resamples=2000,
    )
    assert msgspec.convert(msgspec.to_builtins(spec), GateSpec, strict=True) == spec  # and back


CLAIM_0, CLAIM_1 = "claim 'fewer_violations': ", "claim 'chrf_up': "
PRE = "precondition '{}': "


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("claims", 0, "relative", 1.5),
         CLAIM_0 + "relative must be below 1 and not 0 for direction 'lower', got 1.5 - at `$.claims[0]`"),
        (("claims", 0, "direction", "sideways"),
         "Invalid enum value 'sideways' - at `$.claims[0].direction`"),
        (("claims", 0, "min_effect", 0.1), CLAIM_0 + "min_effect does not combine with relative"),
        (("claims", 1, "corpus", "rouge"), CLAIM_1 + "corpus 'rouge' is not a stats.corpus metric"),
        (("claims", 1, "min_positive_seeds", 4), CLAIM_1 + "min_positive_seeds needs a per-example mean"),
        (("claims", 1, "baseline", "bem"), CLAIM_1 + "variant and baseline are the same arm 'bem'"),
        (("preconditions", 0, "arm", ""),
         PRE.format("json_parses") + "arm missing: statistic 'level' needs an arm - at `$.preconditions[0]`"),
        (("preconditions", 1, "corpus", ""),
         PRE.format("sum_chrf") + "corpus '' is not a stats.corpus metric"),
        (("preconditions", 2, "arm", "bem"), PRE.format("pre_injection") + "arm 'bem' given, but statistic"),
        (("preconditions", 2, "low", 2.0),
         PRE.format("pre_injection") + "low 2.0 > high 1.0 - at `$.preconditions[2]`"),
        (("preconditions", 2, "statistic", "mean"),
         "Invalid enum value 'mean' - at `$.preconditions[2].statistic`"),
        (("preconditions", 0, "typo", 1), "Object contains unknown field `typo` - at `$.preconditions[0]`"),
    ],
)  # fmt: skip
def test_a_bad_new_field_is_refused_naming_the_gate_and_field(edit, message) -> None:
    raw = tomllib.loads(TOML)["gates"]
    kind, i, field, value = edit
    raw[kind][i][field] = value
    with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
        msgspec.convert(raw, GateSpec, strict=True)


def test_a_precondition_needs_a_bound_and_unique_names_span_every_kind() -> None:
    raw = tomllib.loads(TOML)["gates"]
    del raw["preconditions"][0]["low"]
    with pytest.raises(msgspec.ValidationError, match=re.escape("low/high missing: give low, high or both")):
        msgspec.convert(raw, GateSpec, strict=True)
    raw = tomllib.loads(TOML)["gates"]
    raw["preconditions"][0]["name"] = "params"
    with pytest.raises(msgspec.ValidationError, match="gate names must be unique"):
        msgspec.convert(raw, GateSpec, strict=True)


# -- non-inferiority margins -------------------------------------------------------------------


def test_a_negative_min_effect_moves_the_null_to_the_margin() -> None:
    """A variant as good as the baseline (no shift) is not significantly better, but it is significantly
    better than 1 point worse: the margin claim passes where the superiority claim fails. One 3 points
    worse fails the margin claim. The p of the margin claim is BCa's against the margin."""
    rng = np.random.default_rng(3)
    base = rng.normal(50, 5, 800)

    def data(shift: float) -> pd.DataFrame:
        return frame(rows("score", "base", base), rows("score", "bem", base + shift + rng.normal(0, 2, 800)))

    tied = data(0.0)
    margin = Claim("ni", "score", "bem", "base", min_effect=-1.0)
    superior = Claim("sup", "score", "bem", "base")
    d = evaluate(GateSpec(claims=(margin,), n_resamples=4000), tied).decisions[0]
    assert d.outcome == "pass" and "needs > -1 (non-inferiority)" in d.reason, d.reason
    assert evaluate(GateSpec(claims=(superior,), n_resamples=4000), tied).decisions[0].outcome == "fail"
    direct = bca((tied[tied.arm == "bem"].value.to_numpy() - base,), n_resamples=4000, null=-1.0,
                 seed=np.random.SeedSequence(0))  # fmt: skip
    assert direct.p_value is not None and direct.p_value < 0.01
    assert evaluate(GateSpec(claims=(margin,), n_resamples=4000), data(-3.0)).decisions[0].outcome == "fail"


def test_a_margin_on_rare_events_is_tangos_score_test() -> None:
    """Few events: no discordant pairs in 3,000 examples is evidence that the variant is no more than
    .01 worse (Tango's bound near −.0013), though none that it is better."""
    n = 3000
    same = flags(n, [0, 1])
    df = frame(rows("err", "base", same), rows("err", "bem", same))
    claim = Claim("ni", "err", "bem", "base", direction="lower", min_effect=-0.01)
    d = evaluate(GateSpec(claims=(claim,)), df).decisions[0]
    assert d.outcome == "pass" and "Tango score test against -0.01" in d.reason, d.reason
    assert d.p_value is not None and d.p_value < 1e-6
    # p inverts Tango's bound: at level 1 − p, the lower bound sits on the margin.
    assert rare.tango_lower(0, 0, n, 1 - d.p_value) == pytest.approx(-0.01, abs=1e-6)
    plain = evaluate(GateSpec(claims=(restruct(claim, min_effect=0.0),)), df).decisions[0]
    assert plain.outcome == "no_evidence"
