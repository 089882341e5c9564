"""The selftest kinds: CPU-only tasks that exercise the fleet's paths without torch.

`score` emits per-example scores with a known effect (arm b = arm a + effect + noise), so the stats
engine has something real to judge; example difficulty is shared across arms, as in real evals. With
`skill_accuracy` it also emits a 0/1 `skill_em` per example, right on that share: 0 is a skill that
never learns, which a precondition must catch.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any, cast

from bem.core.reporter import Commanded, ScoreRow, Value, check_cancelled
from workers.kinds import TaskContext


def _wait(
    seconds: float, ctx: TaskContext, stage: str, curve: Callable[[int, int], dict[str, float]] | None = None
) -> None:
    """Sleep in steps of about 0.1 s, reporting a loss (and `curve(step, steps)`'s points) at each."""
    steps = max(1, round(seconds / 0.1))
    for i in range(steps):
        time.sleep(seconds / steps)
        ctx.reporter.metrics({f"{stage}/loss": 1.0 / (i + 1), **(curve(i, steps) if curve else {})}, i)
        ctx.reporter.progress(stage, i + 1, steps)
        check_cancelled(ctx.reporter)


def noop(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    return {}


def sleep(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    _wait(float(params.get("seconds", 1.0)), ctx, "sleep")
    return {"slept_s": params.get("seconds", 1.0)}


def flaky(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    _wait(float(params.get("seconds", 1.0)), ctx, "flaky")
    if ctx.attempt <= int(params.get("fail_attempts", 1)):
        raise RuntimeError(f"planned failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


def crash(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    _wait(float(params.get("seconds", 1.0)), ctx, "crash")
    if ctx.attempt <= int(params.get("crash_attempts", 1)):
        print(f"crashing on attempt {ctx.attempt}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return {"attempt": ctx.attempt}


def score(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    import numpy as np  # here, not at the top: the other kinds start faster without it

    arm, seed = str(params["arm"]), int(params["seed"])
    n, effect = int(params.get("n_examples", 200)), float(params.get("effect", 0.1))
    difficulty = np.random.default_rng(0).uniform(0.2, 0.8, n)  # shared by arms and seeds: paired data
    noise = np.random.default_rng([seed, sum(map(ord, arm))]).normal(0, 0.1, n)
    values = np.clip(difficulty + (effect if arm == "b" else 0.0) + noise, 0, 1)

    def running_mean(step: int, steps: int) -> dict[str, float]:  # as if scoring the examples in turn
        return {"score/running_mean": float(values[: max(1, n * (step + 1) // steps)].mean())}

    _wait(float(params.get("seconds", 1.0)), ctx, f"score {arm}", running_mean)
    rows = [ScoreRow(f"ex{i:04d}", arm, seed, "score", float(v)) for i, v in enumerate(values)]
    if "skill_accuracy" in params:  # a 0/1 skill check per example, right on this share of them
        right = np.random.default_rng([seed, 7]).uniform(size=n) < float(params["skill_accuracy"])
        rows += [ScoreRow(f"ex{i:04d}", arm, seed, "skill_em", float(r)) for i, r in enumerate(right)]
    ctx.reporter.scores(rows)
    return {"mean": float(values.mean())}


def obey(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Steps that apply commands at step boundaries and acknowledge them (the shape of Mission B's
    online learner and of a task under Mission C's overlay): `promote`, `rollback`, `knob` and `raise`
    are applied, anything else refused."""
    steps, applied = int(params.get("steps", 100)), []
    kappa = float(params.get("knob", 0.0))
    commands = cast(Commanded, ctx.reporter)
    # Scripted checks, as an online learner streams them: {"step": 10, "drift": {"grad_norm": 25.0}}
    # or {"step": 20, "canary": 0.97, "prompts_since_promotion": 1500}; as an overlay's monitor does:
    # {"step": 30, "violated": 9, "n": 10} (reported with the κ the job runs at).
    checks = {int(c["step"]): c for c in params.get("checks", [])}
    for step in range(steps):
        check = checks.get(step, {})
        points: dict[str, Value] = {
            f"drift/{name}": float(value) for name, value in check.get("drift", {}).items()
        }
        if "canary" in check:
            points["canary/prompts_since_promotion"] = float(check.get("prompts_since_promotion", 0))
            points["canary/pass_rate"] = float(check["canary"])
        if "violated" in check:
            violated, n = int(check["violated"]), int(check["n"])
            points["overlay/violation"] = [1.0] * violated + [0.0] * (n - violated)
            points["overlay/knob"] = kappa
        if points:  # one check's points travel together, as the services expect
            ctx.reporter.metrics(points, step)
        for command in commands.commands():
            if command.action in ("promote", "rollback", "knob", "raise"):
                if command.action == "knob" and command.value is not None:
                    kappa = command.value
                elif command.action == "raise" and command.value is not None:
                    kappa = max(kappa, command.value)
                applied.append({"action": command.action, "step": step, "value": command.value})
                ctx.reporter.metric(f"applied/{command.action}", 1.0, step)
                commands.acknowledge(command, True, f"{command.action} applied at step {step}")
            else:
                commands.acknowledge(command, False, f"{command.action} is not a command this job knows")
        time.sleep(float(params.get("step_s", 0.05)))
        ctx.reporter.progress("obey", step + 1, steps)
        check_cancelled(ctx.reporter)
    return {"applied": applied}


def _payload(seed: int, size: int) -> bytes:
    """`size` bytes that only `seed` gives: what `make` writes and `use` expects."""
    import hashlib

    block = hashlib.sha256(f"selftest-{seed}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def make(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """A base-stage stand-in: a folder (a weights file and a config) left for later tasks as `base`."""
    folder = ctx.out_dir / "made"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    seed, size = int(params.get("seed", 1)), int(params.get("bytes", 1024))
    (folder / "weights.bin").write_bytes(_payload(seed, size))
    (folder / "sub" / "config.json").write_text(f'{{"seed": {seed}, "bytes": {size}}}\n')
    _wait(float(params.get("seconds", 0.1)), ctx, "make")
    return {"outputs": {"base": str(folder)}}


def use(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """A seed-stage stand-in: reads the `base` an earlier task left and checks it byte for byte."""
    if "base" not in ctx.inputs:
        raise RuntimeError(f"no input 'base' (inputs: {sorted(ctx.inputs)})")
    folder = ctx.inputs["base"]
    seed, size = int(params.get("made_seed", 1)), int(params.get("bytes", 1024))
    if (folder / "weights.bin").read_bytes() != _payload(seed, size):
        raise RuntimeError(f"{folder}/weights.bin is not what make wrote")
    if (folder / "sub" / "config.json").read_text() != f'{{"seed": {seed}, "bytes": {size}}}\n':
        raise RuntimeError(f"{folder}/sub/config.json is not what make wrote")
    _wait(float(params.get("seconds", 0.1)), ctx, "use")
    return {"input": str(folder)}
