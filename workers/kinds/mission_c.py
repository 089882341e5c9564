"""Mission C's kinds: one seed trains the utility skill, the constitution probe, the safety overlay with
its ablations and the steering baselines on the same checkpoint, then scores every arm per example
(BEM_SPEC section 8); and, for a mission run with the overlay on (C ↔ all), the overlay package trained
on that mission's base and the monitor its tasks serve under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.kinds import TaskContext
from workers.kinds.demo import dry_run_base, find_base, run_args

PACKAGE_SEED = 1  # the overlay stage runs once per mission; its tasks find the package by this seed


def run(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.mission_c.recipe import run_mission_c

    summary = run_mission_c(**run_args(params, ctx))
    # `values` feed the mission's value guards (OP, the knob); the rest is for people.
    return {
        k: summary[k]
        for k in ("arms", "orthogonality", "interference", "alphas", "knob", "timings_s", "values")
    }


def overlay(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """The overlay stage of another mission: with `params.overlay` on, find or train the package on the
    mission's base (Mission C's recipe at the same profile name); off, nothing to do."""
    if not params.get("overlay"):
        return {"overlay": "off"}
    package, folder = _package(params, ctx)
    return {
        "package": str(folder),
        "op": package.meta["op"],
        "kappa_start": _rules(params).knob,
        "outputs": {"overlay": str(folder)},  # for the run tasks, on whichever host they land
    }


def _package(params: dict[str, Any], ctx: TaskContext) -> tuple[Any, Path]:
    from bem.missions.mission_c.overlay import OverlayPackage, package_dir, train_package

    base, profile = find_base(params, ctx), str(params.get("profile", "smoke"))
    if "overlay" in ctx.inputs:  # the overlay stage's package, fetched onto this host
        return OverlayPackage.load(ctx.inputs["overlay"], ctx.device), ctx.inputs["overlay"]
    folder = package_dir(ctx.cache_dir, base, profile, PACKAGE_SEED)
    if (folder / "overlay.json").is_file():
        return OverlayPackage.load(folder, ctx.device), folder
    # Not on this host yet (the stage ran elsewhere): the same seed trains the same package here.
    package = train_package(
        base, profile=profile, seed=PACKAGE_SEED, out=folder, reporter=ctx.reporter, device=ctx.device
    )
    return package, folder


def _rules(params: dict[str, Any]) -> Any:
    from stats.overlay import OverlayWatch

    return OverlayWatch.from_config((params.get("services") or {}).get("overlay")).rules


def monitor(params: dict[str, Any], ctx: TaskContext) -> Any:
    """The overseer a task of the mission serves its answers under, or None with the overlay off."""
    if not params.get("overlay"):
        return None
    from bem.missions.mission_c.overlay import OverlayMonitor

    rules = _rules(params)
    package, _ = _package(params, ctx)
    return OverlayMonitor(
        package,
        ctx.reporter,
        kappa=rules.knob,
        every=rules.every,
        per_check=rules.per_check,
        seed=PACKAGE_SEED,
    )


def dry_run(params: dict[str, Any], fn: str) -> dict[str, Any]:
    """`run`: one seed's models; `overlay`: the overlay stage's (nothing with the overlay off)."""
    if fn == "overlay" and not params.get("overlay"):
        return {"nothing": "the overlay is off (params.overlay): the stage trains nothing"}
    from bem.missions.mission_c.recipe import dry_run as mission_c

    profile = str(params.get("profile", "smoke"))
    return mission_c(dry_run_base(params), profile=profile, overlay_only=fn == "overlay")
