"""The stats service: turn a mission's gates into a `stats.gates.GateSpec` and its scores into decisions.

Runs when every task of a mission has ended; writes one `decisions` row per gate plus one row for the
verdict (`kind = 'verdict'`), and the verdict onto the mission.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from schemas.missions import SpecError, spec_error
from stats.gates import GateSpec, Verdict


def gate_spec(raw: dict[str, Any], file: str = "<spec>", arms: Sequence[str] = ()) -> GateSpec:
    """A mission spec's `[gates]` table as the stats engine's spec; refused with a SpecError naming the
    field (`gates.guards[1].high`) and the reason. `arms`: the mission's arms, which the gates name."""
    try:
        spec = msgspec.convert(raw, GateSpec, strict=True)
    except msgspec.ValidationError as e:
        raise spec_error(e, file, "gates") from None

    def fail(field: str, reason: str) -> None:
        raise SpecError(file, field, reason)

    if not 0 < spec.q < 1:
        fail("gates.q", f"must be in (0, 1), got {spec.q}")
    if not 0 < spec.level < 1:
        fail("gates.level", f"must be in (0, 1), got {spec.level}")
    if arms:
        for kind, items in (
            ("claims", spec.claims),
            ("guards", spec.guards),
            ("preconditions", spec.preconditions),
        ):
            for i, gate in enumerate(items):
                for role in ("variant", "baseline", "arm"):
                    arm = getattr(gate, role, "")
                    if arm and arm not in arms:
                        fail(f"gates.{kind}[{i}].{role}", f"unknown arm {arm!r}; arms are {list(arms)}")
    return spec


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
