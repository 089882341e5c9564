"""The stats service: turn a mission's gates into a `stats.gates.GateSpec` and its scores into decisions.

Runs when every task of a mission has ended; writes one `decisions` row per gate plus one row for the
verdict (`kind = 'verdict'`), and the verdict onto the mission.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from schemas.missions import Gates, SpecError
from stats.gates import Claim, GateSpec, Guard, Verdict


def gate_spec(gates: Gates, file: str = "<spec>") -> GateSpec:
    """Build the stats engine's spec; its own checks (a guard without bounds...) become SpecErrors."""
    try:
        claims = tuple(
            Claim(c.name, c.metric, c.variant, c.baseline, c.min_effect, c.min_positive_seeds)
            for c in gates.claims
        )
    except ValueError as e:
        raise SpecError(file, "gates.claims", str(e)) from None
    guards = []
    for i, g in enumerate(gates.guards):
        try:
            guards.append(Guard(g.name, g.statistic, g.metric, g.variant, g.baseline, g.low, g.high, g.q))
        except ValueError as e:
            raise SpecError(file, f"gates.guards[{i}]", str(e)) from None
    try:
        return GateSpec(
            claims,
            tuple(guards),
            q=gates.q,
            fdr=gates.fdr,
            rule=gates.rule,
            n_resamples=gates.n_resamples,
            level=gates.level,
            seed=gates.seed,
        )
    except ValueError as e:
        raise SpecError(file, "gates", str(e)) from None


def decision_rows(mission_id: str, verdict: Verdict, level: float) -> list[dict[str, Any]]:
    now = time.time()
    rows = [
        {
            "mission_id": mission_id,
            "gate": d.gate,
            "kind": d.kind,
            "metric": d.metric,
            "comparison": d.comparison,
            "outcome": d.outcome,
            "passed": d.outcome == "pass",
            "estimate": d.estimate,
            "ci_low": d.low,
            "ci_high": d.high,
            "level": level,
            "p": d.p_value,
            "p_adj": d.p_adjusted,
            "family": d.family,
            "n": d.n,
            "seeds_positive": d.seeds_positive,
            "reason": d.reason,
            "decided_at": now,
        }
        for d in verdict.decisions
    ]
    rows.append(
        {
            "mission_id": mission_id,
            "gate": "verdict",
            "kind": "verdict",
            "metric": None,
            "comparison": None,
            "outcome": verdict.verdict,
            "passed": verdict.verdict == "promote",
            "estimate": None,
            "ci_low": None,
            "ci_high": None,
            "level": level,
            "p": None,
            "p_adj": None,
            "family": None,
            "n": None,
            "seeds_positive": None,
            "reason": verdict.reason,
            "decided_at": now,
        }
    )
    return rows


def task_values(results: list[dict[str, Any] | None]) -> dict[str, float]:
    """Exact values for `value` guards (adapter_param_ratio, a time-to-fix): each task's
    `result["values"]`, the median over the tasks that report the key (seeds replicate one design;
    a median keeps one censored seed from deciding a time-to-fix gate)."""
    seen: dict[str, list[float]] = {}
    for result in results:
        for key, value in ((result or {}).get("values") or {}).items():
            seen.setdefault(key, []).append(float(value))
    return {key: statistics.median(vs) for key, vs in seen.items()}
