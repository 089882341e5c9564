"""Canary judge (STATS_SPEC §10): the shift estimate against brute force and scipy, then the judge's rules."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from stats.canary import CanaryConfig, MetricSpec, hodges_lehmann, judge

PASS_DATA = np.arange(20.0)  # the same series in both arms: the "identical data" shortcut, a sure Pass
HIGH_DATA = (np.arange(20.0), np.arange(20.0) + 100)  # (baseline, canary): a sure High


def brute_force_lower_rank(m: int, n: int, alpha: float) -> int:
    """Largest k with P(U ≤ k − 1) ≤ α/2, by enumerating every rank assignment of the pooled sample."""
    counts = np.zeros(m * n + 1)
    for ranks in itertools.combinations(range(m + n), m):
        taken = set(ranks)
        counts[sum(sum(1 for q in range(r) if q not in taken) for r in ranks)] += 1
    cdf = np.cumsum(counts) / counts.sum()
    return int(np.sum(cdf <= alpha / 2))


def config(*metrics: MetricSpec, **kwargs) -> CanaryConfig:
    return CanaryConfig(metrics=metrics, **kwargs)


def test_hl_is_the_median_of_all_pairwise_differences_and_the_ci_their_order_statistics() -> None:
    rng = np.random.default_rng(0)
    canary, baseline = rng.normal(1, 1, 6), rng.normal(0, 1, 7)
    diffs = sorted(c - b for c in canary for b in baseline)
    k = brute_force_lower_rank(6, 7, 0.02)

    shift = hodges_lehmann(canary, baseline, confidence=0.98)

    assert shift.estimate == pytest.approx(float(np.median(diffs)), abs=1e-15)
    assert shift.exact and shift.k == k
    assert (shift.low, shift.high) == (diffs[k - 1], diffs[len(diffs) - k])


def test_ci_is_the_set_of_shifts_the_exact_mann_whitney_test_does_not_reject() -> None:
    """Just outside the CI the exact two-sided test rejects at 2%; just inside it does not."""
    rng = np.random.default_rng(1)
    canary, baseline = rng.normal(1, 1, 12), rng.normal(0, 1, 9)
    shift = hodges_lehmann(canary, baseline)

    def p(delta: float) -> float:
        return scipy.stats.mannwhitneyu(canary - delta, baseline, method="exact").pvalue

    eps = 1e-9
    assert p(shift.low - eps) <= 0.02 < p(shift.low + eps)
    assert p(shift.high + eps) <= 0.02 < p(shift.high - eps)


def test_large_samples_use_the_normal_approximation_rank() -> None:
    rng = np.random.default_rng(2)
    m, n = 120, 100
    canary, baseline = rng.normal(0, 1, m), rng.normal(0, 1, n)
    shift = hodges_lehmann(canary, baseline)
    mn = m * n
    k = math.floor(mn / 2 - scipy.stats.norm.ppf(0.99) * math.sqrt(mn * (m + n + 1) / 12))
    diffs = np.sort((canary[:, None] - baseline[None, :]).ravel())
    assert not shift.exact and shift.k == k
    assert (shift.low, shift.high) == (diffs[k - 1], diffs[mn - k])


@pytest.mark.parametrize(("m", "n", "sims"), [(20, 15, 4000), (110, 100, 5000)], ids=["exact", "normal"])
def test_ci_covers_a_known_shift_at_the_nominal_rate(m: int, n: int, sims: int) -> None:
    rng = np.random.default_rng(m)
    true_shift = 1.5
    misses = 0
    for _ in range(sims):
        baseline = rng.gamma(
            2.0, 1.0, n
        )  # skewed: the interval is distribution-free, so this must not matter
        canary = rng.gamma(2.0, 1.0, m) + true_shift
        shift = hodges_lehmann(canary, baseline, confidence=0.98)
        misses += not shift.low <= true_shift <= shift.high
    lo, hi = scipy.stats.binom.interval(0.999, sims, 0.02)
    assert lo <= misses <= hi, f"{misses}/{sims} misses; 98% CI expects {lo:g}..{hi:g}"


def test_p_value_is_scipy_mann_whitney_on_the_cleaned_data() -> None:
    rng = np.random.default_rng(3)
    baseline = np.append(rng.normal(10, 1, 40), [np.nan, 1e4])
    canary = np.append(rng.normal(10.8, 1, 35), [np.nan, np.inf, -1e4])

    result = judge(config(MetricSpec("lat")), {"lat": baseline}, {"lat": canary}).metrics[0]

    def clean(x):
        x = x[np.isfinite(x)]
        q1, q3 = np.percentile(x, [25, 75])
        return x[(x >= q1 - 3 * (q3 - q1)) & (x <= q3 + 3 * (q3 - q1))]

    b, c = clean(baseline), clean(canary)
    assert (len(b), len(c)) == (40, 35)
    assert (result.n_baseline, result.n_canary, result.n_nonfinite, result.n_outliers) == (40, 35, 3, 2)
    assert result.p_value == scipy.stats.mannwhitneyu(c, b, alternative="two-sided").pvalue
    assert result.hl == hodges_lehmann(c, b).estimate


@pytest.mark.parametrize(
    ("direction", "shift", "expected", "decision"),
    [
        ("increase", +5.0, "High", "Fail"),
        ("decrease", +5.0, "Pass", "Pass"),
        ("either", -5.0, "Low", "Fail"),
        ("increase", -5.0, "Pass", "Pass"),
        ("decrease", -5.0, "Low", "Fail"),
        ("either", 0.0, "Pass", "Pass"),
    ],
)
def test_constructed_shifts_are_classified_per_direction(direction, shift, expected, decision) -> None:
    rng = np.random.default_rng(4)
    baseline, canary = rng.normal(100, 1, 50), rng.normal(100, 1, 50) + shift
    cfg = config(MetricSpec("m", direction=direction, critical=True))
    report = judge(cfg, {"m": baseline}, {"m": canary})
    assert report.metrics[0].classification == expected
    assert report.decision == decision
    if expected == "Pass" and shift != 0:
        assert "allowed by direction" in report.metrics[0].reason


def test_a_huge_outlier_beyond_3_iqr_is_removed_and_that_changes_the_verdict() -> None:
    baseline = np.linspace(0, 1, 20)
    canary = np.append(np.linspace(0.32, 1.32, 20), 1e6)  # a modest shift plus one wild sample
    spec = MetricSpec("m", direction="increase", critical=True)

    cleaned = judge(config(spec), {"m": baseline}, {"m": canary})
    raw = judge(config(spec, iqr_factor=math.inf), {"m": baseline}, {"m": canary})

    assert cleaned.metrics[0].n_outliers == 1 and cleaned.metrics[0].n_canary == 20
    assert cleaned.metrics[0].classification == "Pass" and cleaned.decision == "Pass"
    assert raw.metrics[0].n_outliers == 0
    assert raw.metrics[0].classification == "High" and raw.decision == "Fail"


def test_zero_iqr_removes_nothing() -> None:
    """Mostly-zero error counts have IQR 0: the rare errors are the signal, not outliers."""
    errors = np.zeros(40)
    errors[[3, 17]] = [5.0, 9.0]
    result = judge(config(MetricSpec("err")), {"err": np.zeros(40)}, {"err": errors}).metrics[0]
    assert result.n_outliers == 0 and result.n_canary == 40


@pytest.mark.parametrize(
    ("baseline", "canary", "reason"),
    [
        (np.arange(10.0), np.arange(10.0)[::-1], "identical data"),
        (np.full(3, 7.0), np.full(5, 7.0), "a single distinct value overall"),
    ],
)
def test_shortcuts_pass(baseline, canary, reason) -> None:
    result = judge(config(MetricSpec("m", critical=True)), {"m": baseline}, {"m": canary}).metrics[0]
    assert (result.classification, result.reason, result.hl) == ("Pass", reason, 0.0)


def test_nodata_on_a_normal_metric_is_not_counted() -> None:
    cfg = config(MetricSpec("ok"), MetricSpec("empty"), MetricSpec("nan"), MetricSpec("missing"))
    data = {"ok": PASS_DATA, "empty": [], "nan": [np.nan, np.nan]}
    report = judge(cfg, data, {"ok": PASS_DATA, "empty": [1.0], "nan": [1.0, 2.0], "missing": [1.0]})
    assert [r.classification for r in report.metrics] == ["Pass", "NODATA", "NODATA", "NODATA"]
    assert report.groups[0].n_pass == 1 and report.groups[0].n_nodata == 3
    assert (report.score, report.decision) == (100.0, "Pass")


def test_too_few_samples_for_the_interval_is_nodata() -> None:
    # 2/C(4 + 4, 4) = 2/70 > 2%: no order statistic of 16 differences reaches 98% coverage.
    report = judge(config(MetricSpec("m"), MetricSpec("ok")), {"m": [1, 2, 3, 4], "ok": PASS_DATA},
                   {"m": [11, 12, 13, 14], "ok": PASS_DATA})  # fmt: skip
    assert report.metrics[0].classification == "NODATA"
    assert "too few samples" in report.metrics[0].reason


@pytest.mark.parametrize("flag", ["critical", "must_have_data"])
def test_nodata_on_a_critical_or_must_have_data_metric_fails_the_run(flag) -> None:
    cfg = config(MetricSpec("ok"), MetricSpec("needed", **{flag: True}))
    report = judge(cfg, {"ok": PASS_DATA, "needed": []}, {"ok": PASS_DATA, "needed": [1.0, 2.0]})
    assert (report.score, report.decision) == (0.0, "Fail")
    assert "'needed'" in report.reason and flag in report.reason


def test_group_weights_remainder_and_report_only() -> None:
    b_high, c_high = HIGH_DATA
    cfg = config(
        MetricSpec("a1", group="a"), MetricSpec("a2", group="a"),  # 1 pass, 1 high: 50
        MetricSpec("b1", group="b"), MetricSpec("b2", group="b"),  # 2 pass: 100
        MetricSpec("b3", group="b", report_only=True),  # High, but excluded
        MetricSpec("c1", group="c"),  # 1 high: 0
        group_weights={"a": 50},  # b and c share the remaining 50
    )  # fmt: skip
    baseline = {"a1": PASS_DATA, "a2": b_high, "b1": PASS_DATA, "b2": PASS_DATA, "b3": b_high, "c1": b_high}
    canary = {"a1": PASS_DATA, "a2": c_high, "b1": PASS_DATA, "b2": PASS_DATA, "b3": c_high, "c1": c_high}

    report = judge(cfg, baseline, canary)

    assert report.metrics[4].classification == "High"
    assert [(g.name, g.score, g.weight) for g in report.groups] == [
        ("a", 50, 50),
        ("b", 100, 25),
        ("c", 0, 25),
    ]
    assert report.score == pytest.approx(0.5 * 50 + 0.25 * 100)
    assert report.decision == "Fail"
    assert judge(CanaryConfig(cfg.metrics, {"a": 50}, 95, 37.5), baseline, canary).decision == "Marginal"
    assert judge(CanaryConfig(cfg.metrics, {"a": 50}, 37.5, 20), baseline, canary).decision == "Pass"


def test_a_group_with_no_judged_metric_drops_out_and_the_rest_are_renormalised() -> None:
    b_high, c_high = HIGH_DATA
    cfg = config(MetricSpec("a1", group="a"), MetricSpec("a2", group="a"), MetricSpec("b1", group="b"),
                 MetricSpec("c1", group="c"), group_weights={"a": 50})  # fmt: skip
    report = judge(cfg, {"a1": PASS_DATA, "a2": b_high, "b1": PASS_DATA}, {"a1": PASS_DATA, "a2": c_high})
    assert [(g.name, g.score) for g in report.groups] == [("a", 50), ("b", None), ("c", None)]
    assert [g.weight for g in report.groups] == [100, 0, 0]
    assert report.score == 50


def test_nothing_judged_fails() -> None:
    report = judge(config(MetricSpec("a"), MetricSpec("b", report_only=True)), {}, {"b": [1.0]})
    assert (report.score, report.decision) == (0.0, "Fail")
    assert "no metric could be judged" in report.reason


def test_a_critical_failure_forces_score_zero() -> None:
    b_high, c_high = HIGH_DATA
    metrics = [MetricSpec(f"ok{i}") for i in range(30)] + [MetricSpec("crit", critical=True)]
    baseline = {m.name: PASS_DATA for m in metrics} | {"crit": b_high}
    canary = {m.name: PASS_DATA for m in metrics} | {"crit": c_high}
    report = judge(config(*metrics, pass_threshold=90), baseline, canary)
    assert report.groups[0].score == pytest.approx(3000 / 31)  # would pass on its own
    assert (report.score, report.decision) == (0.0, "Fail")
    assert "critical metric 'crit' is High" in report.reason


def test_shared_weights_reach_exactly_100() -> None:
    """Eleven groups sharing 100 sum to 99.99999999999999 in floats: that must not miss a threshold of 100."""
    names = [f"g{i}" for i in range(11)]
    cfg = config(*(MetricSpec(g, group=g) for g in names), pass_threshold=100)
    report = judge(cfg, dict.fromkeys(names, PASS_DATA), dict.fromkeys(names, PASS_DATA))
    assert (report.score, report.decision) == (100.0, "Pass")


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: MetricSpec("m", direction="up"), "direction"),
        (lambda: MetricSpec(""), "name"),
        (lambda: MetricSpec("m", report_only=True, critical=True), "report_only"),
        (lambda: config(), "metrics"),
        (lambda: config(MetricSpec("m"), MetricSpec("m")), "duplicate"),
        (lambda: config(MetricSpec("m"), pass_threshold=70), "threshold"),
        (lambda: config(MetricSpec("m"), marginal_threshold=-1), "threshold"),
        (lambda: config(MetricSpec("m"), confidence=1.0), "confidence"),
        (lambda: config(MetricSpec("m"), tolerance=-0.1), "tolerance"),
        (lambda: config(MetricSpec("m"), iqr_factor=0), "iqr_factor"),
        (lambda: config(MetricSpec("m"), group_weights={"nope": 10}), "group_weights"),
        (lambda: config(MetricSpec("m", group="a"), MetricSpec("n", group="b"), group_weights={"a": 120}),
         "group_weights"),
        (lambda: config(MetricSpec("m", group="a"), MetricSpec("n", group="b"), group_weights={"a": 100}),
         "group_weights"),
        (lambda: config(MetricSpec("m", group="a"), group_weights={"a": 80}), "group_weights"),
        (lambda: config(MetricSpec("m", group="a"), MetricSpec("n", group="b"), group_weights={"a": 0}),
         "group_weights"),
        (lambda: judge(config(MetricSpec("m")), {"m": [1.0], "typo": [1.0]}, {}), "typo"),
    ],
)  # fmt: skip
def test_bad_config_raises_naming_the_field(build, field) -> None:
    with pytest.raises(ValueError, match=field):
        build()


def test_sample_order_changes_nothing_and_results_are_deterministic() -> None:
    rng = np.random.default_rng(5)
    metrics = [MetricSpec("up", direction="increase"), MetricSpec("flat"), MetricSpec("down")]
    baseline = {m.name: rng.lognormal(0, 1, 60) for m in metrics}
    canary = {
        "up": rng.lognormal(1, 1, 50),
        "flat": rng.lognormal(0, 1, 50),
        "down": rng.lognormal(-1, 1, 50),
    }
    cfg = config(*metrics)
    first = judge(cfg, baseline, canary)
    shuffled = judge(
        cfg,
        {k: rng.permutation(v) for k, v in baseline.items()},
        {k: rng.permutation(v) for k, v in canary.items()},
    )
    assert [r.classification for r in first.metrics] == ["High", "Pass", "Low"]
    assert shuffled == first
    assert judge(cfg, baseline, canary) == first
