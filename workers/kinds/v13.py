"""The v1.3 suite's kind: one arm, one seed (BEM_SPEC section 11, issue 20)."""

from __future__ import annotations

from typing import Any

from workers.kinds import TaskContext
from workers.kinds.demo import run_args


def run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.v13.recipe import run_v13

    summary = run_v13(**run_args(params, ctx), arm=str(params["arm"]), variants=params.get("variants"))
    # `values` feed the parity, memory and latency guards; the rest is for people.
    keep = ("knobs", "train", "means", "detail", "timings_s", "values")
    return {key: summary[key] for key in keep}
