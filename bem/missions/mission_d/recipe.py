"""Mission D (BEM_SPEC.md section 9): does scramble-equivariant training (SEP) make a model's states and
answers the same across meaning-preserving views, without costing clean quality?

Recipe, one seed, every arm from the same base (`train` has the arms, their losses, the clamp and the
thaw; `evaluate` the scores):
1. Training items: translation and role questions on training frames (`data`), the same for every arm
   and seed (the seed draws batches, views' epochs and initial weights).
2. Each arm trains a fresh BEM and controller on a copy of the base, Phase 0 under its clamp, then (the
   five main arms) the progressive thaw. `sep_phase0` is SEP after its Phase 0: scored from the `sep`
   arm's own run when both are asked for (the same steps, the same random stream).
3. Each arm is scored per example (`evaluate`): task rows on the plain source, on its S1-S4 views and
   on the OOD sets; representation rows (RRS, Ret@1, alignment, LDC of the view id, EqE). Phase-0
   arms get the plain test set only.
4. Per run: each arm's stages, steps and training FLOPs (counted), and `values` for the gates: the
   Phase-0 FLOPs ratio (hard clamp over none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bem.core.models import load_model
from bem.core.reporter import Laps, Reporter, ScoreRow, check_cancelled, row_means, write_scores
from bem.missions.mission_d import data, scramble
from bem.missions.mission_d.evaluate import Scorer, make_eval, score_arm
from bem.missions.mission_d.train import ARMS, Stage, TrainConfig, Trainer, build, items_of, shadow_inverse

DATA_SEED = 0  # training items and test examples are the same for every seed: example_ids pair


@dataclass(frozen=True)
class Profile:
    n_train: int  # training frames (each a translation and a role question)
    n_test: int  # test frames (and their views)
    n_ood: int  # held-out template frames
    n_probe: int  # training-split frames the LDC probes fit on
    train: TrainConfig
    max_new_tokens: int = 16  # per sentence translated


PROFILES = {
    "tiny": Profile(
        48, 12, 8, 12,
        TrainConfig(controller_hidden=16, batch_size=8, eval_every=2, min_steps=2, max_steps=4, n_dev=8,
                    min_epochs=0),
        max_new_tokens=6,
    ),
    # 600 frames: 1,200 items, 38 steps an epoch, so a stage's 5 epochs (190 steps) fit its 400.
    "smoke": Profile(600, 120, 60, 120, TrainConfig()),
    # A real model: section 9's lr 1e-4 for the thawed weights and batch 64, longer stages.
    "full": Profile(
        20_000, 500, 300, 500,
        TrainConfig(rank=16, controller_hidden=256, batch_size=64, lr=1e-3, base_lr=1e-4, eval_every=200,
                    min_steps=1000, max_steps=5000, n_dev=256),
        max_new_tokens=32,
    ),
}  # fmt: skip


def run_mission_d(
    base_path: str | Path,
    *,
    profile: str | Profile = "smoke",
    seed: int = 1,
    out_dir: str | Path,
    reporter: Reporter,
    device: str = "cpu",
    arms: Sequence[str] | None = None,
) -> dict[str, Any]:
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    wanted = list(arms or ARMS)
    unknown = sorted(set(wanted) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; arms: {list(ARMS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    laps = Laps()
    base, tok = load_model(base_path, device=device)
    base.requires_grad_(False)
    items = items_of(data.make_examples("train", prof.n_train, DATA_SEED))
    ev = make_eval(prof.n_test, prof.n_ood, prof.n_probe)
    inverse = shadow_inverse(tok, scramble.Shadow(0))
    laps.lap("data")

    rows: list[ScoreRow] = []
    runs: dict[str, dict[str, Any]] = {}

    def scored(arm: str, model: Any, phase0_only: bool) -> dict[str, Any]:
        arm_rows, detail = score_arm(
            Scorer(model, tok, inverse, prof.max_new_tokens), ev, arm, seed, phase0_only
        )
        rows.extend(arm_rows)
        reporter.scores(arm_rows)
        return {"means": row_means(arm_rows), **detail}

    for arm in wanted:
        if arm == "sep_phase0" and "sep" in wanted:
            continue  # scored after the sep arm's Phase 0
        cfg = ARMS[arm]
        torch.manual_seed(seed)
        model = build(base, tok, prof.train, items, seed)
        trainer = Trainer(model, tok, cfg, prof.train, items, inverse, seed, reporter, arm)

        def after(stage: Stage, spent: float, arm: str = arm, model: Any = model) -> None:
            if arm == "sep" and stage.name == "phase0" and "sep_phase0" in wanted:
                runs["sep_phase0"] = {"stages": [asdict(stage)], "flops": spent,
                                      **scored("sep_phase0", model, phase0_only=True)}  # fmt: skip

        trained = trainer.run(after)
        runs[arm] = {"stages": [asdict(s) for s in trained.stages], "flops": trained.flops,
                     **scored(arm, model, phase0_only=not cfg.thaw)}  # fmt: skip
        laps.lap(arm)
        check_cancelled(reporter)

    write_scores(rows, out / "scores.parquet")
    summary: dict[str, Any] = {
        "profile": asdict(prof),
        "seed": seed,
        "arms": runs,
        "timings_s": laps.timings,
        "values": run_values(runs),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    reporter.artifact(out / "summary.json", "summary")
    return summary


def run_values(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What the value guards read: SEP's Phase-0 training FLOPs under the hard clamp over the unclamped
    arm's (each counted to its own plateau)."""
    if "sep_phase0" in runs and "sep_unclamped" in runs:
        return {"phase0_flops_ratio": runs["sep_phase0"]["flops"] / runs["sep_unclamped"]["flops"]}
    return {}


DRY_RUN_SAMPLE = 256  # training frames a dry run draws to find the longest row


def dry_run(base_path: str | Path, profile: str | Profile = "full") -> dict[str, Any]:
    """One seed's arm model on the meta device, from the base's config.json alone (`bem.core.dryrun`):
    the BEM sites and the controller, and each phase's estimated peak memory. A training step holds a
    batch and its views (two passes' activations); the thaw's last stage trains the whole decoder,
    which is also what the unclamped and soft-clamped Phase 0 train (the soft clamp adds one copy of
    the decoder's weights as its anchor)."""
    from bem.core import dryrun
    from bem.core.train import Pair
    from bem.missions.mission_d.train import ArmModel

    prof = PROFILES[profile] if isinstance(profile, str) else profile
    base = dryrun.meta_base(base_path)
    arm = ArmModel(base.model, prof.train)
    examples = data.make_examples("train", min(prof.n_train, DRY_RUN_SAMPLE), DATA_SEED)
    items = items_of(examples)
    rows = [Pair(i.prompt(scramble.view(i.source, r, 0)), i.target) for i in items for r in scramble.RUNGS]
    rows += [Pair(i.prompt(), i.target) for i in items]
    step = dryrun.Pass(2 * prof.train.batch_size, base.longest(rows))
    adapters = arm.adapter_parameters()
    decoder = arm.base_parameters()
    anchor = dryrun.count(decoder) * base.dtype.itemsize
    longest_source = max(base.tokens(data.translation_prompt(s)) for s, _ in data.longer(examples, 4))
    decode = dryrun.Pass(64, longest_source + 4 * prof.max_new_tokens, backward=False)
    phases = [
        dryrun.phase("phase 0, hard clamp (BEM and controller)", base, [arm], adapters, step),
        dryrun.phase("thaw, last stage (and phase 0 unclamped)", base, [arm], [*adapters, *decoder], step),
        dryrun.phase("decode (4x inputs)", base, [arm], [], decode),
    ]
    return dryrun.summary(
        base,
        {"bem_sites": arm.attachment.num_parameters(), "controller": dryrun.count([arm.controller])},
        phases,
        soft_clamp_anchor_bytes=anchor,
        rank=prof.train.rank,
    )
