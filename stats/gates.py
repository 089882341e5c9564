"""Gates: a mission's pre-declared preconditions, claims and guards, judged into decisions and a verdict
(STATS_SPEC §5).

- Preconditions (`stats.preconditions`): could the run measure anything at all? Each is judged on
  its point estimate (a sanity check of the measurement, not a test); its BCa interval is reported
  beside it. Any precondition that fails or has no data makes the verdict inconclusive, whatever the
  claims and guards say; those are still judged and their decisions returned, so a report shows
  them. Preconditions are not in the BH family. They can only veto, never promote, so they do not
  count toward the spec's required claim or guard: a spec of preconditions alone is refused.
- Primary claims (`stats.claims`) form the mission's one family: one-sided p-values (BCa on
  seed-averaged per-example deltas, ratios of means or corpus metrics; exact McNemar for rare
  events), BH (or BY) at q, an optional minimum effect and per-seed sign requirement, and
  FCR-adjusted bounds for the selected claims. Claims may be lower-is-better and relative.
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

from stats.bootstrap import BootstrapResult, NoData, bca
from stats.claims import MC_SES, RERUN_FACTOR, Claim, Direction, judge_claims
from stats.decision import Decision, Outcome
from stats.multitest import Method
from stats.preconditions import Precondition, judge_precondition
from stats.quantile import quantile_ratio
from stats.table import arm_scores, check_scores, pair

__all__ = [
    "MC_SES",
    "RERUN_FACTOR",
    "Claim",
    "Decision",
    "Direction",
    "GateSpec",
    "Guard",
    "Outcome",
    "Precondition",
    "Verdict",
    "compare",
    "evaluate",
]

GuardStatistic = Literal["delta", "ratio", "quantile_ratio", "level", "value"]


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
    preconditions: tuple[Precondition, ...] = ()
    q: float = 0.05
    fdr: Method = "bh"
    rule: Literal["all", "any"] = "all"  # how many primary claims must pass
    n_resamples: int = 10_000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        names = [p.name for p in self.preconditions] + [c.name for c in self.claims]
        names += [g.name for g in self.guards]
        if len(set(names)) != len(names):
            raise ValueError(f"gate names must be unique, got {names}")
        if not self.claims and not self.guards:
            raise ValueError(
                "a gate spec needs at least one claim or guard (preconditions alone can only veto)"
            )


@dataclass(frozen=True)
class Verdict:
    verdict: Literal["promote", "reject", "inconclusive"]
    reason: str
    decisions: tuple[Decision, ...]


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


def _gates_verdict(
    spec: GateSpec, claims: list[Decision], guards: list[Decision]
) -> tuple[Literal["promote", "reject", "inconclusive"], str]:
    """The verdict of the claims and guards (preconditions aside)."""
    failed_guards = [d.gate for d in guards if d.outcome == "fail"]
    open_guards = [d.gate for d in guards if d.outcome != "pass" and d.outcome != "fail"]
    holds, why = _primary_holds(spec, claims)
    if failed_guards:
        return "reject", f"guard(s) {failed_guards} failed"
    if holds is False:
        return "reject", why
    if holds is None or open_guards:
        return "inconclusive", why if holds is None else f"guard(s) {open_guards} have no data"
    return "promote", f"{why}; all {len(guards)} guards pass" if guards else why


def evaluate(spec: GateSpec, scores: pd.DataFrame, values: Mapping[str, float] | None = None) -> Verdict:
    """Judge `spec` on a score table (example_id, arm, seed, metric, value) and deterministic `values`.

    Decisions come preconditions first, then claims, then guards, each in the spec's order.
    """
    scores = check_scores(scores)
    values = values or {}
    root = np.random.SeedSequence(spec.seed)
    claim_seed, guard_seed, precondition_seed = root.spawn(3)
    pre = [
        judge_precondition(p, scores, values, n_resamples=spec.n_resamples, level=spec.level, seed=s)
        for p, s in zip(spec.preconditions, precondition_seed.spawn(len(spec.preconditions)), strict=True)
    ]
    claims = (
        judge_claims(
            spec.claims,
            scores,
            q=spec.q,
            method=spec.fdr,
            n_resamples=spec.n_resamples,
            level=spec.level,
            seed=claim_seed,
        )
        if spec.claims
        else []
    )
    guards = [
        _judge_guard(g, scores, values, spec, s)
        for g, s in zip(spec.guards, guard_seed.spawn(len(spec.guards)), strict=True)
    ]
    decisions = tuple(pre + claims + guards)
    verdict, why = _gates_verdict(spec, claims, guards)
    unmet = [d for d in pre if not d.passed]
    if unmet:
        failed = "; ".join(d.reason for d in unmet)
        why = (
            f"precondition(s) {[d.gate for d in unmet]} failed: {failed} (claims and guards alone: {verdict})"
        )
        return Verdict("inconclusive", why, decisions)
    return Verdict(verdict, why, decisions)


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
