"""Mission B's kind: an online learner serves a prompt stream (or a clean soak) and obeys the fleet's
promotion service (drift monitor and canary gate), whose promote and rollback commands reach it
through the reporter; the service's thresholds reach it in `params["services"]["promotion"]`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

from bem.core.reporter import CommandSplit, Reporter
from workers.kinds import TaskContext, mission_c
from workers.kinds.demo import dry_run_base, run_args


def stream(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.mission_b.recipe import run_mission_b

    sabotage = params.get("sabotage_at")
    args = run_args(params, ctx)
    # With params.overlay on, Mission C's overlay is on for every served step (C ↔ all); its monitor
    # takes the knob commands, the learner every other one.
    split = CommandSplit(ctx.reporter, ["knob"])
    overseer = mission_c.monitor(params, replace(ctx, reporter=cast(Reporter, split.taken)))
    if overseer is not None:
        args["reporter"] = cast(Reporter, split.rest)
    summary = run_mission_b(
        **args,
        mode=params.get("mode", "stream"),
        learner_overrides=params.get("learner"),
        rules=(params.get("services") or {}).get("promotion"),  # the thresholds fleetd's service applies
        sabotage_at=None if sabotage is None else int(sabotage),
        pace_s=float(params.get("pace_s", 0.0)),
        soak_s=None if params.get("soak_s") is None else float(params["soak_s"]),
        overseer=overseer,
    )
    # `values` feed the mission's value guards (time-to-fix, soak); the rest is for people.
    keep = ("mode", "prompts", "aggregate", "aggregate_gain", "updates", "promotions", "rollbacks")
    more = ("events", "time_to_fix", "timings_s", "values", "overlay")
    return {k: summary[k] for k in (*keep, *more) if k in summary}


def dry_run(params: dict[str, Any], fn: str) -> dict[str, Any]:
    from bem.missions.mission_b.recipe import dry_run as mission_b

    return mission_b(
        dry_run_base(params),
        profile=str(params.get("profile", "smoke")),
        learner_overrides=params.get("learner"),
    )
