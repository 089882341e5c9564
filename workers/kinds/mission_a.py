"""Mission A's kind: one seed trains the skill experts, the fused adapter and the router (AR0, AR1),
then decodes and scores every arm (BEM_SPEC section 6)."""

from __future__ import annotations

from typing import Any

from workers.kinds import TaskContext
from workers.kinds.demo import run_args


def run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.mission_a.recipe import run_mission_a

    summary = run_mission_a(**run_args(params, ctx))
    # `values` feed the mission's exact-value guards (adapter parity); the rest is for people.
    return {
        k: summary[k]
        for k in ("arms", "index_swap_pass", "kv_hit_ratio", "fused_rank", "parity", "timings_s", "values")
    }
