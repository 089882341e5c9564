"""The demo mission's kinds: the validation experiment (BEM_SPEC section 5), one seed per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.kinds import TaskContext

# Missions that declare a smoke_mixture().
SMOKE_CORPORA = ("validation", "mission_a", "mission_b", "mission_c", "mission_d", "mission_e", "v13")


def find_base(params: dict[str, Any], ctx: TaskContext) -> Path:
    """params.base (a local model folder), else the base an earlier task left (its output `base`), else
    the smoke base pretrained on the mixture the mission declares (`corpus`, its data module's
    `smoke_mixture`; `base_recipe = "smoke"`, the default), else the byte-level demo base
    (`base_recipe = "byte"`)."""
    if params.get("base"):
        path = Path(params["base"])
        if not path.is_dir():
            raise FileNotFoundError(f"params.base {path} is not a local model folder (nothing is downloaded)")
        return path
    if "base" in ctx.inputs:  # the base stage's output, fetched onto this host (fleet.artifacts)
        return ctx.inputs["base"]
    recipe = params.get("base_recipe", "smoke")
    if recipe == "byte":
        from bem.core.models import demo_base

        return demo_base(ctx.cache_dir, log=lambda msg: print(msg, flush=True))
    if recipe != "smoke":
        raise ValueError(f"params.base_recipe {recipe!r}: 'smoke' or 'byte'")
    import importlib

    from bem.core.smoke_base import smoke_base, union

    # One mission's corpus, or several joined by "+" (a base for a mission run with another's overlay).
    corpus = str(params.get("corpus", "validation"))
    names = corpus.split("+")
    for name in names:
        if name not in SMOKE_CORPORA:
            raise ValueError(f"params.corpus {corpus!r}: {name!r} is not one of {', '.join(SMOKE_CORPORA)}")
    mixtures = [importlib.import_module(f"bem.missions.{name}.data").smoke_mixture() for name in names]
    mixture = mixtures[0] if len(mixtures) == 1 else union(mixtures)
    # The guard scales with the steps (a union pretrains each member's): about 3 a second on one core at
    # smoke size (a 2-core box runs two workers), so half a second a step only stops a runaway.
    budget_s = max(300.0, 0.5 * mixture.recipe.steps)
    return smoke_base(ctx.cache_dir, mixture, log=lambda msg: print(msg, flush=True), budget_s=budget_s)


def dry_run_base(params: dict[str, Any]) -> Path:
    """params.base for a dry run, which pretrains nothing: a local model folder, or an error naming it."""
    if not params.get("base"):
        raise ValueError(
            "params.base is not set: a dry run needs a local model folder "
            "(--set profiles.<profile>.params.base=DIR)"
        )
    path = Path(params["base"])
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"params.base {path} is not a local model folder (no config.json there; nothing is downloaded)"
        )
    return path


def run_args(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """What every experiment runner takes from a task: base, profile, seed and where to report."""
    return {
        "base_path": find_base(params, ctx),
        "profile": str(params.get("profile", "smoke")),
        "seed": int(params.get("seed", 1)),
        "out_dir": ctx.out_dir,
        "reporter": ctx.reporter,
        "device": ctx.device,
    }


def base(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Find or pretrain the demo base once, before the seeds need it; a base it built is left to the
    later tasks (`outputs`), so a worker on another host fetches it instead of pretraining again. A
    params.base is a folder every host has: nothing to send."""
    path = str(find_base(params, ctx))
    return {"base": path} if params.get("base") else {"base": path, "outputs": {"base": path}}


def validate(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    from bem.missions.validation.recipe import run_validation

    summary = run_validation(**run_args(params, ctx))
    return {
        "routing_accuracy": summary["routing_accuracy"],
        "scores": {arm: s["score"] for arm, s in summary["arms"].items()},
        "timings_s": summary["timings_s"],
    }


def dry_run(params: dict[str, Any], fn: str) -> dict[str, Any]:
    """`base` only finds params.base; `validate` builds one seed's models (the recipe's `dry_run`)."""
    base_path = dry_run_base(params)
    if fn == "base":
        return {"nothing": f"params.base {base_path} is a local model folder: nothing to build"}
    from bem.missions.validation.recipe import dry_run as validation

    return validation(base_path, profile=str(params.get("profile", "smoke")))
