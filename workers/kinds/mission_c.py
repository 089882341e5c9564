"""Mission C's kind: one seed trains the utility skill, the constitution probe, the safety overlay with
its ablations and the steering baselines on the same checkpoint, then scores every arm per example
(BEM_SPEC section 8)."""

from __future__ import annotations

from typing import Any

from workers.kinds import TaskContext
from workers.kinds.demo import run_args


def run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.mission_c.recipe import run_mission_c

    summary = run_mission_c(**run_args(params, ctx))
    # `values` feed the mission's value guards (OP, the knob); the rest is for people.
    return {
        k: summary[k]
        for k in ("arms", "orthogonality", "interference", "alphas", "knob", "timings_s", "values")
    }
