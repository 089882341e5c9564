"""Mission A's kind: one seed trains the skill experts, the fused adapter and the router (AR0, AR1),
then decodes and scores every arm (BEM_SPEC section 6)."""

from __future__ import annotations

from typing import Any

from workers.kinds import TaskContext, mission_c
from workers.kinds.demo import dry_run_base, run_args


def run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.mission_a.recipe import run_mission_a

    # With params.overlay on, Mission C's overlay serves every evaluation answer (C ↔ all).
    summary = run_mission_a(**run_args(params, ctx), overseer=mission_c.monitor(params, ctx))
    # `values` feed the mission's exact-value guards (adapter parity); the rest is for people.
    keep = (
        "arms",
        "index_swap_pass",
        "kv_hit_ratio",
        "fused_rank",
        "parity",
        "timings_s",
        "values",
        "overlay",
    )
    return {k: summary[k] for k in keep if k in summary}


def dry_run(params: dict[str, Any], fn: str) -> dict[str, Any]:
    from bem.missions.mission_a.recipe import dry_run as mission_a

    return mission_a(dry_run_base(params), profile=str(params.get("profile", "smoke")))
