"""Gates: a mission's pre-declared claims and guards, judged into decisions and a verdict (STATS_SPEC §5).

- Primary claims ("variant beats baseline on metric") form the mission's one family: one-sided
  BCa p-values on seed-averaged per-example deltas, BH (or BY) at q, an optional minimum effect
  and per-seed sign requirement, and FCR-adjusted lower bounds for the selected claims.
- Guards form an intersection–union test: each must hold at its own level, with no multiplicity
  adjustment. Interval guards pass iff the whole interval lies in the allowed region; value guards
  (parameter counts) compare the number directly.
- Monte-Carlo honesty: a claim whose adjusted p sits within 3 MC standard errors of q is re-run
  with 10× the resamples from a fresh child seed; still that close, it is inconclusive.

Every decision carries its reason; the verdict is promote, reject or inconclusive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import msgspec
import numpy as np
import pandas as pd

from stats.bootstrap import BootstrapResult, NoData, bca, bca_family, lower_bound
from stats.multitest import FamilyResult, Method, fdr
from stats.quantile import quantile_ratio
from stats.seeds import SignConsistency, multi_bootstrap, sign_consistency
from stats.table import Paired, arm_scores, check_scores, pair

Outcome = Literal["pass", "fail", "no_evidence", "nodata", "inconclusive"]
GuardStatistic = Literal["delta", "ratio", "quantile_ratio", "level", "value"]
RERUN_FACTOR = 10
MC_SES = 3.0


class Claim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Primary claim: `variant` beats `baseline` on `metric` (higher is better), by at least `min_effect`."""

    name: str
    metric: str
    variant: str
    baseline: str
    min_effect: float = 0.0
    min_positive_seeds: int | None = None  # e.g. 4 for "at least 4 of 5 seeds improve"


class Guard(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A guard gate: the statistic's whole interval (or the value) must lie in [low, high].

    statistic: "delta" mean(variant − baseline); "ratio" mean(variant) / mean(baseline);
    "quantile_ratio" quantile_q(variant) / quantile_q(baseline), percentile interval;
    "level" mean(variant); "value" a deterministic number (say adapter_param_ratio) looked up by
    `metric` in the values handed to `evaluate`.
    """

    name: str
    statistic: GuardStatistic
    metric: str
    variant: str = ""
    baseline: str = ""
    low: float | None = None
    high: float | None = None
    q: float = 0.5

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            raise ValueError(f"guard {self.name!r}: give low, high or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"guard {self.name!r}: low {self.low} > high {self.high}")
        if self.statistic != "value" and not self.variant:
            raise ValueError(f"guard {self.name!r}: statistic {self.statistic!r} needs a variant arm")
        if self.statistic in ("delta", "ratio", "quantile_ratio") and not self.baseline:
            raise ValueError(f"guard {self.name!r}: statistic {self.statistic!r} needs a baseline arm")


class GateSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A mission's gates; also the one definition of a mission spec's `[gates]` table (fleetd converts
    the table with `msgspec.convert(raw, GateSpec, strict=True)`; `__post_init__` errors name the path)."""

    claims: tuple[Claim, ...] = ()
    guards: tuple[Guard, ...] = ()
    q: float = 0.05
    fdr: Method = "bh"
    rule: Literal["all", "any"] = "all"  # how many primary claims must pass
    n_resamples: int = 10_000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        names = [c.name for c in self.claims] + [g.name for g in self.guards]
        if len(set(names)) != len(names):
            raise ValueError(f"gate names must be unique, got {names}")
        if not self.claims and not self.guards:
            raise ValueError("a gate spec needs at least one claim or guard")


@dataclass(frozen=True)
class Decision:
    gate: str
    kind: Literal["primary", "guard"]
    metric: str
    comparison: str
    outcome: Outcome
    reason: str
    estimate: float | None = None
    low: float | None = None  # the interval the outcome was judged on (see `interval`)
    high: float | None = None
    interval: str = ""
    p_value: float | None = None
    p_adjusted: float | None = None
    p_value_se: float | None = None
    n: int = 0
    family: str | None = None
    seeds_positive: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"


@dataclass(frozen=True)
class Verdict:
    verdict: Literal["promote", "reject", "inconclusive"]
    reason: str
    decisions: tuple[Decision, ...]


# -- primary claims ----------------------------------------------------------------------------


def _family_draws(
    paired: list[Paired], n_resamples: int, level: float, seed: np.random.SeedSequence
) -> list[BootstrapResult]:
    """Claims on the same examples share one count matrix (one GEMM); others get their own child seed."""
    groups: dict[bytes, list[int]] = {}
    for i, p in enumerate(paired):
        key = np.asarray(p.example_ids).tobytes() + str(p.example_ids.dtype).encode()
        groups.setdefault(key, []).append(i)
    out: list[BootstrapResult | None] = [None] * len(paired)
    for members, child in zip(groups.values(), seed.spawn(len(groups)), strict=True):
        deltas = np.column_stack([paired[i].deltas for i in members])
        family = bca_family(deltas, n_resamples=n_resamples, level=level, seed=child)
        for i, res in zip(members, family, strict=True):
            out[i] = res
    return [r for r in out if r is not None]


def _adjusted_se(family: FamilyResult, ses: list[float]) -> list[float]:
    """MC standard error of each BH-adjusted p: (m/j)·SE(p_(j)) at the j that attains the step-up minimum."""
    p, se = np.array(family.p_values), np.array(ses)
    m = len(p)
    order = np.argsort(p, kind="stable")
    factor = m / np.arange(1, m + 1) * (np.sum(1 / np.arange(1, m + 1)) if family.method == "by" else 1.0)
    scaled = factor * p[order]
    out = np.empty(m)
    for rank in range(m):
        j = rank + int(np.argmin(scaled[rank:]))
        out[order[rank]] = factor[j] * se[order[j]]
    return out.tolist()


def _close(results: list[BootstrapResult], family: FamilyResult) -> list[bool]:
    """Which adjusted p-values sit within 3 MC standard errors of q (degenerate claims have no MC error)."""
    ses = _adjusted_se(family, [0.0 if r.degenerate else float(r.p_value_se or 0.0) for r in results])
    return [abs(pa - family.q) < MC_SES * se for pa, se in zip(family.p_adjusted, ses, strict=True)]


def _judge_claims(spec: GateSpec, scores: pd.DataFrame, seed: np.random.SeedSequence) -> list[Decision]:
    first, rerun, seeds_seq = seed.spawn(3)
    decisions: dict[int, Decision] = {}
    paired: list[Paired] = []
    live: list[int] = []  # indices of claims that have data
    for i, claim in enumerate(spec.claims):
        try:
            paired.append(pair(scores, claim.metric, claim.baseline, claim.variant))
            live.append(i)
        except NoData as exc:
            decisions[i] = _claim_decision(claim, "nodata", str(exc))
    if not live:
        return [decisions[i] for i in range(len(spec.claims))]

    def run(n_resamples: int, child: np.random.SeedSequence) -> tuple[list[BootstrapResult], FamilyResult]:
        results = _family_draws(paired, n_resamples, spec.level, child)
        # A degenerate claim gives no evidence, but it was declared: it stays in m with p = 1.
        return results, fdr([1.0 if r.p_value is None else r.p_value for r in results], spec.q, spec.fdr)

    results, family = run(spec.n_resamples, first)
    close = _close(results, family)
    rerun_note = ""
    if any(close):
        results, family = run(RERUN_FACTOR * spec.n_resamples, rerun)
        close = _close(results, family)
        rerun_note = f" (re-run with B = {RERUN_FACTOR * spec.n_resamples})"
    fcr = family.fcr_level
    for k, (i, p, res, seq) in enumerate(zip(live, paired, results, seeds_seq.spawn(len(live)), strict=True)):
        claim, p_adj, rejected = spec.claims[i], family.p_adjusted[k], family.rejected[k]
        signs = sign_consistency(p.seed_deltas) if p.seed_deltas.size else None
        outcome, why = _claim_outcome(claim, res, p_adj, rejected, close[k], signs, family.q)
        if rejected and fcr is not None:  # selected: the FCR-adjusted one-sided bound (BY 2005)
            low, high, interval = lower_bound(res, fcr), None, f"FCR-adjusted one-sided {fcr:.4f} BCa"
        else:
            low, high, interval = res.low, res.high, f"BCa {res.level:.0%} two-sided, unadjusted"
        decisions[i] = _claim_decision(
            claim,
            outcome,
            why + (rerun_note if close[k] else "") + _data_notes(p, res, seq, spec),
            estimate=res.estimate,
            low=low,
            high=high,
            interval=interval,
            p_value=res.p_value,
            p_adjusted=p_adj,
            p_value_se=res.p_value_se,
            n=res.n,
            seeds_positive=str(signs) if signs else "",
        )
    return [decisions[i] for i in range(len(spec.claims))]


def _claim_decision(claim: Claim, outcome: Outcome, reason: str, **fields) -> Decision:
    comparison = f"{claim.variant} vs {claim.baseline}"
    return Decision(
        claim.name, "primary", claim.metric, comparison, outcome, reason, family="primary", **fields
    )


def _claim_outcome(
    claim: Claim,
    res: BootstrapResult,
    p_adj: float,
    rejected: bool,
    close: bool,
    signs: SignConsistency | None,
    q: float,
) -> tuple[Outcome, str]:
    """A primary claim passes iff BH-rejected, at least the minimum effect, and seed-consistent if asked."""
    if res.degenerate:
        return "no_evidence", f"{res.reason}: no evidence"
    if close:
        return "inconclusive", f"p_adj {p_adj:.4g} within {MC_SES:g} MC SE of q = {q}"
    if not rejected:
        return "fail", f"not significant: p_adj {p_adj:.4g} > q = {q}"
    if res.estimate < claim.min_effect:
        return "fail", f"significant but {res.estimate:+.4g} < minimum effect {claim.min_effect:+g}"
    if claim.min_positive_seeds is not None and (signs is None or signs.positive < claim.min_positive_seeds):
        return "fail", f"seeds {signs or 'none complete'} short of {claim.min_positive_seeds} positive"
    return "pass", f"p_adj {p_adj:.4g} ≤ q = {q}, {res.estimate:+.4g}"


def _data_notes(p: Paired, res: BootstrapResult, seed: np.random.SeedSequence, spec: GateSpec) -> str:
    """Dropped rows, small n, and the seed-sensitivity check against the multi-bootstrap."""
    notes = []
    if p.n_unpaired or p.n_nan:
        notes.append(f"dropped {p.n_unpaired} unpaired and {p.n_nan} NaN rows")
    if res.low_n:
        notes.append(f"small n = {res.n}: BCa undercovers")
    if len(p.seeds) > 1 and p.seed_deltas.shape[1] >= 2:
        multi = multi_bootstrap(p.seed_deltas, n_resamples=spec.n_resamples, level=spec.level, seed=seed)
        notes.append(f"seeds × examples {multi.low:+.4g}..{multi.high:+.4g}")
        if (res.low > 0 or res.high < 0) and multi.low <= 0 <= multi.high:
            notes.append("seed-sensitive")
    return "; " + "; ".join(notes) if notes else ""


# -- guards ------------------------------------------------------------------------------------


def _guard_interval(
    guard: Guard, scores: pd.DataFrame, spec: GateSpec, seed: np.random.SeedSequence
) -> BootstrapResult:
    b, level = spec.n_resamples, spec.level
    if guard.statistic == "level":
        values, _ = arm_scores(scores, guard.metric, guard.variant)
        return bca((values,), "mean", n_resamples=b, level=level, seed=seed)
    p = pair(scores, guard.metric, guard.baseline, guard.variant)
    if guard.statistic == "delta":
        return bca((p.variant_scores, p.baseline_scores), paired=True, n_resamples=b, level=level, seed=seed)
    if guard.statistic == "ratio":  # Σv/Σb = mean(v)/mean(b), with the O(n) ratio-of-sums jackknife
        sums = np.column_stack([p.variant_scores, p.baseline_scores])
        return bca((sums,), "ratio", n_resamples=b, level=level, seed=seed)
    return quantile_ratio(
        p.baseline_scores, p.variant_scores, q=guard.q, n_resamples=b, level=level, seed=seed
    )


def _region(guard: Guard) -> str:
    lo = "-inf" if guard.low is None else f"{guard.low:g}"
    hi = "+inf" if guard.high is None else f"{guard.high:g}"
    return f"[{lo}, {hi}]"


def _judge_guard(
    guard: Guard,
    scores: pd.DataFrame,
    values: Mapping[str, float],
    spec: GateSpec,
    seed: np.random.SeedSequence,
) -> Decision:
    comparison = f"{guard.variant} vs {guard.baseline}" if guard.baseline else guard.variant
    base = Decision(guard.name, "guard", guard.metric, comparison, "nodata", "", family=None)

    def below(v: float) -> bool:
        return guard.low is not None and v < guard.low

    def above(v: float) -> bool:
        return guard.high is not None and v > guard.high

    if guard.statistic == "value":
        if guard.metric not in values or values[guard.metric] is None or np.isnan(values[guard.metric]):
            return replace(base, reason=f"NODATA: no value for {guard.metric!r}")
        v = float(values[guard.metric])
        ok = not (below(v) or above(v))
        return replace(
            base,
            outcome="pass" if ok else "fail",
            estimate=v,
            low=v,
            high=v,
            interval="exact value",
            reason=f"{guard.metric} = {v:.6g} {'in' if ok else 'outside'} {_region(guard)}",
        )
    try:
        res = _guard_interval(guard, scores, spec, seed)
    except NoData as exc:
        return replace(base, reason=str(exc))
    label = f"{res.method} {res.level:.0%} two-sided" + (" (degenerate: one point)" if res.degenerate else "")
    judged = replace(base, estimate=res.estimate, low=res.low, high=res.high, interval=label, n=res.n)
    failures = [f"lower bound {res.low:.4g} < {guard.low:g}"] if below(res.low) else []
    failures += [f"upper bound {res.high:.4g} > {guard.high:g}"] if above(res.high) else []
    if failures:
        return replace(judged, outcome="fail", reason="; ".join(failures))
    where = f"[{res.low:.4g}, {res.high:.4g}] inside {_region(guard)}"
    return replace(judged, outcome="pass", reason=where)


# -- verdict -----------------------------------------------------------------------------------


def _primary_holds(spec: GateSpec, claims: list[Decision]) -> tuple[bool | None, str]:
    """True, False (fails decisively) or None (undecided), with why."""
    if not claims:
        return True, "no primary claims"
    passed = [d.gate for d in claims if d.outcome == "pass"]
    failed = [d.gate for d in claims if d.outcome == "fail"]
    open_ = [d.gate for d in claims if d.outcome not in ("pass", "fail")]
    if spec.rule == "all":
        if failed:
            return False, f"primary claim(s) {failed} failed"
        if open_:
            return None, f"primary claim(s) {open_} undecided"
        return True, f"all {len(claims)} primary claims pass"
    if passed:
        return True, f"primary claim(s) {passed} pass"
    if open_:
        return None, f"no primary claim passes yet; {open_} undecided"
    return False, f"every primary claim failed: {failed}"


def evaluate(spec: GateSpec, scores: pd.DataFrame, values: Mapping[str, float] | None = None) -> Verdict:
    """Judge `spec` on a score table (example_id, arm, seed, metric, value) and deterministic `values`."""
    scores = check_scores(scores)
    root = np.random.SeedSequence(spec.seed)
    claim_seed, guard_seed = root.spawn(2)
    claims = _judge_claims(spec, scores, claim_seed) if spec.claims else []
    guards = [
        _judge_guard(g, scores, values or {}, spec, s)
        for g, s in zip(spec.guards, guard_seed.spawn(len(spec.guards)), strict=True)
    ]
    decisions = tuple(claims + guards)
    failed_guards = [d.gate for d in guards if d.outcome == "fail"]
    open_guards = [d.gate for d in guards if d.outcome != "pass" and d.outcome != "fail"]
    holds, why = _primary_holds(spec, claims)
    if failed_guards:
        return Verdict("reject", f"guard(s) {failed_guards} failed", decisions)
    if holds is False:
        return Verdict("reject", why, decisions)
    if holds is None or open_guards:
        return Verdict(
            "inconclusive", why if holds is None else f"guard(s) {open_guards} have no data", decisions
        )
    return Verdict("promote", f"{why}; all {len(guards)} guards pass" if guards else why, decisions)


# -- one comparison ----------------------------------------------------------------------------


def compare(
    scores: pd.DataFrame,
    baseline: str,
    variant: str,
    metrics: list[str] | None = None,
    *,
    q: float = 0.05,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    source: str = "the score table",
) -> Verdict:
    """`variant` against `baseline`: one primary claim per metric (default: every metric both arms
    have), named after the metric, the claims one BH family.

    The one path behind `python -m stats compare` and whoever else reports a comparison (`python -m
    bem validate`), so the same table always gets the same interval; the defaults are the command's.
    `source` names the table in errors.
    """
    scores = check_scores(scores, source)
    arms = set(scores["arm"].unique())
    for arm in (baseline, variant):
        if arm not in arms:
            raise ValueError(f"arm {arm!r} is not in {source}; arms there: {sorted(arms)}")
    if not metrics:
        metrics = sorted(
            set(scores.loc[scores["arm"] == baseline, "metric"])
            & set(scores.loc[scores["arm"] == variant, "metric"])
        )
    if not metrics:
        raise ValueError(f"arms {variant!r} and {baseline!r} share no metric")
    spec = GateSpec(
        claims=tuple(Claim(name=m, metric=m, variant=variant, baseline=baseline) for m in metrics),
        q=q,
        n_resamples=n_resamples,
        level=level,
        seed=seed,
    )
    return evaluate(spec, scores)
