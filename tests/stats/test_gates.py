"""Gate specs into decisions and verdicts: BH family, guards as an IUT, the Monte-Carlo re-run rule."""

import re

import msgspec
import numpy as np
import pandas as pd
import pytest

from stats.bootstrap import bca_family, lower_bound
from stats.gates import Claim, GateSpec, Guard, evaluate
from stats.multitest import fdr
from stats.table import pair

COLS = ["example_id", "arm", "seed", "metric", "value"]


def scores(effects: dict[str, float], n=200, seeds=(1, 2, 3), latency_ratio=1.05, seed=0) -> pd.DataFrame:
    """Two arms; each metric's variant is the baseline plus its effect plus per-example noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for ex in range(n):
        lat = rng.lognormal(3, 0.3)
        for s in seeds:
            rows += [(ex, "base", s, "latency", lat), (ex, "bem", s, "latency", lat * latency_ratio)]
            for metric, effect in effects.items():
                b = rng.normal(0.5, 0.3)
                rows += [(ex, "base", s, metric, b), (ex, "bem", s, metric, b + effect + rng.normal(0, 0.3))]
    return pd.DataFrame(rows, columns=COLS)


def claims(*metrics, **kw):
    return tuple(Claim(m, m, "bem", "base", **kw) for m in metrics)


def by_gate(verdict):
    return {d.gate: d for d in verdict.decisions}


def test_clear_gains_and_passing_guards_promote() -> None:
    spec = GateSpec(
        claims=claims("em", "f1"),
        guards=(
            Guard("latency_p50", "quantile_ratio", "latency", "bem", "base", high=1.15),
            Guard("params", "value", "adapter_param_ratio", low=0.95, high=1.05),
        ),
        n_resamples=2000,
    )
    v = evaluate(spec, scores({"em": 0.1, "f1": 0.08}), {"adapter_param_ratio": 1.02})
    assert v.verdict == "promote", v.reason
    d = by_gate(v)
    assert all(x.passed for x in v.decisions)
    # Selected claims carry the FCR-adjusted one-sided bound at 1 − R·q/m = 1 − 2·.05/2.
    assert d["em"].interval.startswith("FCR-adjusted") and "0.9500" in d["em"].interval
    assert d["em"].low > 0 and d["em"].high is None and d["em"].seeds_positive == "3/3 > 0"
    assert d["latency_p50"].high <= 1.15 and d["params"].estimate == 1.02


def test_a_failing_guard_rejects_whatever_the_claims_say() -> None:
    spec = GateSpec(
        claims=claims("em"),
        guards=(Guard("latency_p50", "quantile_ratio", "latency", "bem", "base", high=1.15),),
        n_resamples=2000,
    )
    v = evaluate(spec, scores({"em": 0.1}, latency_ratio=1.25))
    assert v.verdict == "reject" and "latency_p50" in v.reason
    assert by_gate(v)["latency_p50"].outcome == "fail" and "upper bound" in by_gate(v)["latency_p50"].reason


def test_parameter_parity_is_compared_directly() -> None:
    spec = GateSpec(claims=(), guards=(Guard("params", "value", "adapter_param_ratio", low=0.95, high=1.05),))
    assert evaluate(spec, scores({}), {"adapter_param_ratio": 1.051}).verdict == "reject"
    assert evaluate(spec, scores({}), {"adapter_param_ratio": 0.95}).verdict == "promote"
    assert evaluate(spec, scores({}), {}).verdict == "inconclusive"


def test_no_effect_rejects_and_a_small_effect_fails_the_minimum() -> None:
    v = evaluate(GateSpec(claims=claims("em"), n_resamples=2000), scores({"em": -0.05}))
    assert v.verdict == "reject" and "not significant" in by_gate(v)["em"].reason
    small = evaluate(GateSpec(claims=claims("em", min_effect=0.2), n_resamples=2000), scores({"em": 0.1}))
    assert small.verdict == "reject" and "minimum effect" in by_gate(small)["em"].reason
    assert by_gate(small)["em"].p_adjusted < 0.05


def test_missing_arm_or_degenerate_data_is_inconclusive_never_promote() -> None:
    v = evaluate(
        GateSpec(claims=(*claims("em"), Claim("ghost", "em", "nope", "base")), n_resamples=500),
        scores({"em": 0.2}),
    )
    assert v.verdict == "inconclusive" and by_gate(v)["ghost"].outcome == "nodata"
    flat = scores({"em": 0.0})
    flat.loc[flat.arm == "bem", "value"] = flat.loc[flat.arm == "base", "value"].to_numpy()
    d = evaluate(GateSpec(claims=claims("em"), n_resamples=500), flat)
    assert d.verdict == "inconclusive" and by_gate(d)["em"].outcome == "no_evidence"
    assert "all paired deltas equal" in by_gate(d)["em"].reason


def test_rule_any_needs_one_claim_and_rule_all_needs_every_claim() -> None:
    df = scores({"em": 0.1, "f1": -0.05})
    assert evaluate(GateSpec(claims=claims("em", "f1"), n_resamples=2000), df).verdict == "reject"
    assert (
        evaluate(GateSpec(claims=claims("em", "f1"), rule="any", n_resamples=2000), df).verdict == "promote"
    )


def test_seed_requirement() -> None:
    df = scores({"em": 0.1}, n=600, seeds=(1, 2, 3, 4, 5))
    df.loc[(df.arm == "bem") & (df.seed == 5) & (df.metric == "em"), "value"] -= 0.15  # one seed regresses
    v = evaluate(GateSpec(claims=claims("em", min_positive_seeds=5), n_resamples=2000), df)
    d = by_gate(v)["em"]
    assert d.seeds_positive == "4/5 > 0" and d.outcome == "fail" and "short of 5" in d.reason


def test_family_decisions_match_bh_on_bca_from_the_same_seed() -> None:
    """The gate's p_adj are BH over the claims' BCa p-values; FCR bound as documented."""
    df = scores({"a": 0.0, "b": 0.04, "c": 0.1}, n=300)
    spec = GateSpec(claims=claims("a", "b", "c"), n_resamples=3000, q=0.1, seed=5)
    d = by_gate(evaluate(spec, df))
    p = [d[m].p_value for m in "abc"]
    fam = fdr(p, q=0.1)
    assert [d[m].p_adjusted for m in "abc"] == pytest.approx(list(fam.p_adjusted), abs=1e-15)
    assert d["c"].outcome == "pass" and d["a"].outcome == "fail"


def _near_threshold_scores(q: float, n_resamples: int) -> pd.DataFrame:
    """Bisect the effect size until the one claim's BCa p lands on q: a decision MC noise could flip."""
    rng = np.random.default_rng(11)
    noise = rng.normal(0, 1, 100)
    noise -= noise.mean()
    base = rng.normal(0, 1, 100)
    lo, hi = 0.0, 0.5
    for _ in range(25):
        mid = (lo + hi) / 2
        p = bca_family((noise + mid)[:, None], n_resamples=n_resamples, seed=1)[0].p_value
        lo, hi = (mid, hi) if p > q else (lo, mid)
    rows = [(i, "base", 1, "em", base[i]) for i in range(100)]
    rows += [(i, "bem", 1, "em", base[i] + noise[i] + lo) for i in range(100)]
    return pd.DataFrame(rows, columns=COLS)


def test_a_p_value_at_the_threshold_is_rerun_then_inconclusive() -> None:
    df = _near_threshold_scores(0.05, 100_000)
    v = evaluate(GateSpec(claims=claims("em"), n_resamples=5000), df)
    d = by_gate(v)["em"]
    assert d.outcome == "inconclusive" and "re-run with B = 50000" in d.reason, d.reason
    assert v.verdict == "inconclusive"
    assert abs(d.p_value - 0.05) < 3 * d.p_value_se  # the re-run's p and its smaller SE


def test_selected_claim_reports_the_fcr_adjusted_bound() -> None:
    """R = 1 of m = 3 selected: its bound is the one-sided 1 − .05/3 BCa bound, about 0.17 SE below
    the two-sided 95% one. Large B makes that gap many times the Monte-Carlo error."""
    df = scores({"em": 0.1, "f1": 0.0, "acc": 0.0}, n=300)
    spec = GateSpec(claims=claims("em", "f1", "acc"), n_resamples=40_000)
    d = by_gate(evaluate(spec, df))
    assert d["em"].outcome == "pass" and "0.9833" in d["em"].interval and d["em"].high is None
    assert d["f1"].interval.endswith("unadjusted")
    deltas = pair(df, "em", "base", "bem").deltas
    independent = bca_family(deltas[:, None], n_resamples=40_000, seed=123)[0]
    se = deltas.std() / np.sqrt(len(deltas))
    assert abs(d["em"].low - lower_bound(independent, 1 - 0.05 / 3)) < 0.06 * se
    assert independent.low - d["em"].low > 0.1 * se  # not the unadjusted two-sided bound


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        GateSpec(claims=claims("em", "em"))
    with pytest.raises(ValueError, match="low, high or both"):
        Guard("g", "delta", "em", "bem", "base")
    with pytest.raises(ValueError, match="needs a baseline"):
        Guard("g", "delta", "em", "bem", high=1.0)
    with pytest.raises(ValueError, match="low 2 > high 1"):
        Guard("g", "value", "x", low=2, high=1)
    with pytest.raises(ValueError, match="lacks column"):
        evaluate(GateSpec(claims=claims("em")), pd.DataFrame({"x": [1]}))


def test_a_spec_is_also_converted_from_a_table_with_the_same_checks() -> None:
    """The Structs are the one definition of a mission's [gates] table: msgspec converts it strictly,
    and a check failing in `__post_init__` comes back with the path of the entry that failed."""
    raw = {
        "q": 0.1,
        "n_resamples": 2000,
        "claims": [{"name": "em", "metric": "em", "variant": "bem", "baseline": "base", "min_effect": 0}],
        "guards": [{"name": "p", "statistic": "value", "metric": "ratio", "high": 1}],
    }
    spec = msgspec.convert(raw, GateSpec, strict=True)
    assert spec == GateSpec(claims("em"), (Guard("p", "value", "ratio", high=1.0),), q=0.1, n_resamples=2000)
    assert spec.guards[0] == Guard(name="p", statistic="value", metric="ratio", high=1.0)  # by keyword too
    assert msgspec.convert({"guards": raw["guards"]}, GateSpec).claims == ()  # guards only
    with pytest.raises(AttributeError):
        spec.q = 0.5  # type: ignore[misc]  # frozen
    bad = [
        ({**raw, "guards": [*raw["guards"], {"name": "g", "statistic": "delta", "metric": "em", "low": 0}]},
         "needs a variant arm - at `$.guards[1]`"),
        ({**raw, "claims": [{**raw["claims"][0], "typo": 1}]}, "unknown field `typo` - at `$.claims[0]`"),
        ({**raw, "claims": raw["claims"] * 2}, "gate names must be unique"),
        ({**raw, "fdr": "holm"}, "at `$.fdr`"),
        ({**raw, "q": "0.1"}, "Expected `float`, got `str` - at `$.q`"),
    ]  # fmt: skip
    for table, message in bad:
        with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
            msgspec.convert(table, GateSpec, strict=True)


def test_guard_kinds_on_known_data() -> None:
    df = scores({"kv_hit": 0.0, "plan_len": 0.0}, latency_ratio=1.0)
    guards = (
        Guard("kv", "delta", "kv_hit", "bem", "base", low=-0.2),
        Guard("plan", "level", "plan_len", "bem", high=3.0),
        Guard("lat_mean", "ratio", "latency", "bem", "base", low=0.99, high=1.01),
    )
    v = evaluate(GateSpec(claims=(), guards=guards, n_resamples=2000), df)
    d = by_gate(v)
    assert v.verdict == "promote", v.reason
    assert d["lat_mean"].estimate == pytest.approx(1.0) and d["lat_mean"].interval.startswith("BCa")
    tight = evaluate(GateSpec(claims=(), guards=(Guard("plan", "level", "plan_len", "bem", low=0.6),)), df)
    assert tight.verdict == "reject" and "lower bound" in tight.decisions[0].reason
