"""Mission E's kind: one seed scores every arm at equal state bytes on the same samples, the memory arms
trained first (BEM_SPEC section 10)."""

from __future__ import annotations

from typing import Any

from workers.kinds import TaskContext
from workers.kinds.demo import dry_run_base, run_args


def run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.mission_e.recipe import run_mission_e

    summary = run_mission_e(**run_args(params, ctx))
    # `values` feed the mission's value guards; the rest is for people.
    keep = ("budget_bytes", "best_kv", "arms", "spike_ratio", "p50_s_per_token", "timings_s", "values")
    return {k: summary[k] for k in keep}


def dry_run(params: dict[str, Any], fn: str) -> dict[str, Any]:
    """Each arm's state at the profile's budget (`bem.missions.mission_e.recipe.dry_run`)."""
    from bem.missions.mission_e.recipe import dry_run as mission_e

    return mission_e(dry_run_base(params), profile=str(params.get("profile", "smoke")))
