"""Mission D's kind: one seed trains every arm (the five main arms through Phase 0 and the thaw, and
SEP's Phase 0 under each clamp) from the same base and scores each per example (BEM_SPEC section 9)."""

from __future__ import annotations

from typing import Any

from workers.kinds import TaskContext
from workers.kinds.demo import dry_run_base, run_args


def run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.mission_d.recipe import run_mission_d

    summary = run_mission_d(**run_args(params, ctx))
    # `values` feed the mission's value guards (the Phase-0 FLOPs ratio); the rest is for people.
    return {
        "arms": {
            arm: {"stages": r["stages"], "flops": r["flops"], "means": r["means"]}
            for arm, r in summary["arms"].items()
        },
        "timings_s": summary["timings_s"],
        "values": summary["values"],
    }


def dry_run(params: dict[str, Any], fn: str) -> dict[str, Any]:
    """One seed's arm model and its phases' memory (`bem.missions.mission_d.recipe.dry_run`)."""
    from bem.missions.mission_d.recipe import dry_run as mission_d

    return mission_d(dry_run_base(params), profile=str(params.get("profile", "smoke")))
