"""The validation experiment (BEM_SPEC §5): can a controller route between two frozen skill LoRAs?

Recipe, one seed:
1. Train one static peft LoRA per task (r 8, α 16, W_O and W_down), and one multi-task LoRA of equal
   adapter budget (r 16) on both tasks.
2. Load all three into one BEM per site as column blocks [json | summary | multitask]; a code is
   then a weight per block, so every arm is just a different code and all arms run in one mixed batch.
3. Freeze everything but a simple controller in interpolation mode: c = softmax(controller(prompt
   features)) over the two skill blocks, trained with the LM loss on the mixed set, no task labels.
4. Decode the test set greedily under every arm, score per example, and summarise: per-arm means, and
   bem − equal judged by the stats engine (`stats.gates.compare`, as `python -m stats compare` does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.core import dryrun
from bem.core.attach import Attachment, attach_bems
from bem.core.chunked import read_hidden
from bem.core.controllers import SimpleController, masked_mean
from bem.core.export import save_bem
from bem.core.generate import greedy_generate
from bem.core.models import load_model
from bem.core.reporter import Laps, Reporter, ScoreRow, check_cancelled, write_scores
from bem.core.train import (
    LORA_RANK,
    LMBatch,
    encode,
    lm_loss,
    lora_factors,
    lora_model,
    minibatches,
    take_rows,
    train_lora,
)
from bem.missions.validation.data import TASKS, Example, make_dataset
from bem.missions.validation.metrics import score_example
from stats.gates import compare
from stats.table import COLUMNS

ARMS = ("bem", "random", "fixed_json", "fixed_sum", "equal", "multitask", "oracle", "base")
# Column blocks of the composed BEM: one per skill LoRA, then the multi-task LoRA (equal budget: 2 x r).
BLOCKS = {"json": LORA_RANK, "summary": LORA_RANK, "multitask": 2 * LORA_RANK}
# How bem − equal is judged: the stats engine's primary-claim path, the same as `python -m stats compare`.
BEM_MINUS_EQUAL_METHOD = "paired BCa over seed-averaged per-example deltas, BH family (stats engine)"
# The data seed is fixed so that test example_ids pair across training seeds (seeds are replicates).
DATA_SEED = 0


@dataclass(frozen=True)
class Profile:
    sizes: dict[str, int]
    lora_steps: int  # per skill LoRA; the multi-task LoRA gets twice as many
    controller_steps: int
    batch_size: int
    lora_lr: float
    controller_lr: float
    eval_batch: int


PROFILES = {
    "smoke": Profile(
        sizes={"train": 200, "val": 50, "test": 100},
        lora_steps=70,
        controller_steps=20,
        batch_size=16,
        lora_lr=1e-2,
        controller_lr=1e-3,
        eval_batch=64,
    ),
    "full": Profile(
        sizes={"train": 2000, "val": 200, "test": 500},
        lora_steps=1500,
        controller_steps=300,
        batch_size=16,
        lora_lr=2e-3,
        controller_lr=1e-3,
        eval_batch=64,
    ),
}


def block_code(weights: Tensor) -> Tensor:
    """[B, 3] weights over (json, summary, multitask) → the per-site code [B, 32], one weight per block."""
    widths = torch.tensor(list(BLOCKS.values()), device=weights.device)
    return weights.repeat_interleave(widths, dim=-1)


def compose(model: nn.Module, loras: dict[str, dict[str, tuple[Tensor, Tensor]]]) -> Attachment:
    """One BEM per site whose column blocks are the trained LoRAs: U = [s·B_i], Vᵀ = [A_i], scaling 1."""
    att = attach_bems(model, rank_schedule=[sum(BLOCKS.values())], max_overhead=1.0)
    with torch.no_grad():
        for name, site in att.sites.items():
            start = 0
            for block, width in BLOCKS.items():
                a, b = loras[block][name]
                site.V[start : start + width] = a
                site.U[:, start : start + width] = b
                start += width
            site.scaling = 1.0
            site.U.requires_grad_(False)
            site.V.requires_grad_(False)
    return att


def prompt_features(model: nn.Module, att: Attachment, data: LMBatch, layer: int, batch: int = 128) -> Tensor:
    """Mean hidden state over prompt tokens at `layer`, from one no-grad, adapter-off pass."""
    feats = []
    for lo in range(0, data.input_ids.shape[0], batch):
        part = take_rows(data, torch.arange(lo, min(lo + batch, data.input_ids.shape[0])))
        hidden = read_hidden(model, att, part.input_ids, part.attention_mask, layer)
        feats.append(masked_mean(hidden, part.prompt_mask))
    return torch.cat(feats)


def train_controller(
    model: nn.Module,
    att: Attachment,
    data: LMBatch,
    feats: Tensor,
    *,
    profile: Profile,
    generator: torch.Generator,
    reporter: Reporter,
) -> SimpleController:
    """Only the controller learns, from the LM loss on the mixed set; it never sees a task label."""
    device = feats.device
    ctrl = SimpleController(feats.shape[-1], len(TASKS), interpolation=True).to(device)
    ctrl.fit_features(feats)
    reporter.metric("adapter_overhead", att.check_budget(ctrl, max_overhead=1.0))
    opt = torch.optim.AdamW(ctrl.parameters(), lr=profile.controller_lr)
    model.train()
    steps = profile.controller_steps
    lengths = data.attention_mask.sum(dim=1)
    for step, idx in enumerate(minibatches(lengths, profile.batch_size, steps, generator)):
        batch = take_rows(data, idx).to(device)
        weights = ctrl(feats[idx]).code
        code = block_code(torch.cat([weights, torch.zeros_like(weights[:, :1])], dim=-1))
        with att.codes(code):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = lm_loss(logits, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            reporter.metric("controller/loss", loss.item(), step)
            reporter.progress("train controller", step + 1, steps)
            check_cancelled(reporter)
    model.eval()
    return ctrl.eval()


def arm_weights(arm: str, bem_weights: Tensor, task_index: Tensor, generator: torch.Generator) -> Tensor:
    """[N, 3] block weights (json, summary, multitask) that define each arm."""
    n = len(task_index)
    one_hot = torch.nn.functional.one_hot
    fixed = {
        "fixed_json": [1.0, 0.0, 0.0],
        "fixed_sum": [0.0, 1.0, 0.0],
        "equal": [0.5, 0.5, 0.0],
        "multitask": [0.0, 0.0, 1.0],
        "base": [0.0, 0.0, 0.0],
    }
    if arm in fixed:
        return torch.tensor(fixed[arm]).expand(n, 3)
    if arm == "bem":
        return torch.cat([bem_weights.cpu(), torch.zeros(n, 1)], dim=-1)
    if arm == "oracle":
        return one_hot(task_index, 3).float()
    if arm == "random":
        return one_hot(torch.randint(0, 2, (n,), generator=generator), 3).float()
    raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")


def decode_arms(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    att: Attachment,
    test: list[Example],
    codes: Tensor,
    train: list[Example],
    batch_size: int,
) -> list[str]:
    """Greedy outputs for every (arm, example) row; row r is example r % len(test) under codes[r].

    Greedy decoding is deterministic, so rows with the same example and the same code (oracle and
    fixed_json on a JSON example, say) are decoded once. Each task decodes under its own length cap,
    set from training targets, never test ones.
    """
    predictions = [""] * len(codes)
    for task in TASKS:
        cap = max(len(e.target.encode()) for e in train if e.task == task) + 8
        unique: dict[tuple[int, bytes], list[int]] = {}
        for r in range(len(codes)):
            if test[r % len(test)].task == task:
                unique.setdefault((r % len(test), codes[r].cpu().numpy().tobytes()), []).append(r)
        firsts = [rows[0] for rows in unique.values()]
        outputs = greedy_generate(
            model,
            tokenizer,
            [test[r % len(test)].prompt for r in firsts],
            max_new_tokens=cap,
            attachment=att,
            codes=codes[firsts],
            batch_size=batch_size,
        )
        for rows, text in zip(unique.values(), outputs, strict=True):
            for r in rows:
                predictions[r] = text
    return predictions


def load_base(
    base_path: str | Path, device: torch.device | str, read_layer: int | None
) -> tuple[nn.Module, PreTrainedTokenizerBase, int]:
    """The frozen base, and the layer the controller reads (the middle one unless told)."""
    model, tokenizer = load_model(base_path, device=device)
    model.requires_grad_(False)
    layer = read_layer if read_layer is not None else model.config.num_hidden_layers // 2
    return model, tokenizer, layer


def train_loras(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    *,
    profile: Profile,
    generator: torch.Generator,
    reporter: Reporter,
    out: Path,
) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """Step 1: a peft LoRA per skill on its own examples, and the multi-task LoRA (2 x r) on all of them.

    Each is saved as a peft folder (an artifact) and kept as per-site factors for `compose`.
    """
    loras = {}
    for name, examples, rank, steps in (
        ("json", [e for e in train if e.task == "json"], LORA_RANK, profile.lora_steps),
        ("summary", [e for e in train if e.task == "summary"], LORA_RANK, profile.lora_steps),
        ("multitask", train, 2 * LORA_RANK, 2 * profile.lora_steps),
    ):
        peft_model = train_lora(
            model, tokenizer, examples, rank=rank, steps=steps, lr=profile.lora_lr,
            batch_size=profile.batch_size, generator=generator, reporter=reporter, name=f"lora_{name}",
        )  # fmt: skip
        peft_model.save_pretrained(str(out / f"lora_{name}"))
        reporter.artifact(out / f"lora_{name}", "peft_lora")
        loras[name] = lora_factors(peft_model)
        del peft_model
    return loras


def compose_and_train_controller(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    loras: dict[str, dict[str, tuple[Tensor, Tensor]]],
    train: list[Example],
    layer: int,
    *,
    profile: Profile,
    generator: torch.Generator,
    reporter: Reporter,
    out: Path,
) -> tuple[Attachment, SimpleController]:
    """Steps 2 and 3: the LoRAs as blocks of one BEM per site, then the controller over them; saved."""
    att = compose(model, loras)
    train_batch = encode(tokenizer, train)
    device = next(model.parameters()).device
    feats = prompt_features(model, att, train_batch.to(device), layer)
    ctrl = train_controller(
        model, att, train_batch, feats, profile=profile, generator=generator, reporter=reporter
    )
    save_bem(att, out / "bem", {"controller": ctrl})
    reporter.artifact(out / "bem", "bem_checkpoint")
    return att, ctrl


def route_and_decode(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    att: Attachment,
    ctrl: SimpleController,
    train: list[Example],
    test: list[Example],
    layer: int,
    *,
    profile: Profile,
    generator: torch.Generator,
    reporter: Reporter,
) -> tuple[float, list[str]]:
    """Step 4, decoding: the controller routes the held-out prompts, then every arm decodes the test set.

    Returns the routing accuracy (argmax weight on the example's own skill) and the predictions, arm
    after arm in ARMS order (row r is example r % len(test)).
    """
    device = next(model.parameters()).device
    test_batch = encode(tokenizer, test).to(device)
    task_index = torch.tensor([TASKS.index(e.task) for e in test])
    with torch.no_grad():
        bem_weights = ctrl(prompt_features(model, att, test_batch, layer)).code
    routing_accuracy = (bem_weights.argmax(-1).cpu() == task_index).float().mean().item()
    reporter.metric("routing_accuracy", routing_accuracy)

    weights = [arm_weights(arm, bem_weights, task_index, generator) for arm in ARMS]
    codes = block_code(torch.cat(weights))
    return routing_accuracy, decode_arms(model, tokenizer, att, test, codes, train, profile.eval_batch)


def score_arms(
    test: list[Example], predictions: list[str], seed: int
) -> tuple[list[ScoreRow], dict[str, dict[str, float]]]:
    """Step 4, scoring: a row per (arm, example, metric), and each arm's mean score overall and per task."""
    rows: list[ScoreRow] = []
    per_arm: dict[str, dict[str, float]] = {}
    for a, arm in enumerate(ARMS):
        scores = [score_example(ex, predictions[a * len(test) + i]) for i, ex in enumerate(test)]
        rows += [
            ScoreRow(ex.example_id, arm, seed, m, v)
            for ex, s in zip(test, scores, strict=True)
            for m, v in s.items()
        ]
        per_arm[arm] = {"score": float(np.mean([s["score"] for s in scores]))}
        for task in TASKS:
            per_arm[arm][task] = float(
                np.mean([s["score"] for ex, s in zip(test, scores, strict=True) if ex.task == task])
            )
    return rows, per_arm


def score_frame(rows: list[ScoreRow]) -> pd.DataFrame:
    """The rows as the stats engine's score table, the same table `write_scores` puts in Parquet."""
    return pd.DataFrame(
        [(r.example_id, r.arm, r.seed, r.metric, r.value) for r in rows], columns=list(COLUMNS)
    )


def bem_minus_equal(rows: list[ScoreRow]) -> dict[str, Any]:
    """bem − equal on "score", judged by the stats engine exactly as `python -m stats compare
    SCORES.parquet --baseline equal --variant bem --metric score` judges it (one code path, its defaults).

    The interval is the one the decision was made on: BCa two-sided when the claim is not selected,
    the FCR-adjusted one-sided lower bound (high None) when it is.
    """
    decision = compare(score_frame(rows), "equal", "bem", ["score"]).decisions[0]
    return {
        "estimate": decision.estimate,
        "low": decision.low,
        "high": decision.high,
        "p_adj": decision.p_adjusted,
        "outcome": decision.outcome,
        "method": f"{BEM_MINUS_EQUAL_METHOD}; {decision.interval}",
        "n": decision.n,
    }


def samples(test: list[Example], predictions: list[str]) -> dict[str, list[str]]:
    """One example of each task under every arm (the test split lists all JSON examples, then all
    summaries), for a reader to look at."""
    shown = [0, len(test) - 1]
    by_arm = {arm: [predictions[a * len(test) + i] for i in shown] for a, arm in enumerate(ARMS)}
    return {"prompts": [test[i].prompt for i in shown], **by_arm}


def run_validation(
    base_path: str | Path,
    *,
    profile: str | Profile,
    seed: int,
    out_dir: str | Path,
    reporter: Reporter,
    device: torch.device | str = "cpu",
    read_layer: int | None = None,
) -> dict:
    """Run one seed end to end; write summary.json and scores.parquet into out_dir; return the summary."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    laps = Laps()
    torch.manual_seed(seed)  # dropout masks; every other draw uses an explicit generator
    gen = torch.Generator().manual_seed(seed)
    model, tokenizer, layer = load_base(base_path, device, read_layer)
    data = make_dataset(DATA_SEED, prof.sizes)
    train, test = data["train"], data["test"]
    laps.lap("setup")

    loras = train_loras(model, tokenizer, train, profile=prof, generator=gen, reporter=reporter, out=out)
    laps.lap("train_loras")
    att, ctrl = compose_and_train_controller(
        model, tokenizer, loras, train, layer, profile=prof, generator=gen, reporter=reporter, out=out
    )
    laps.lap("train_controller")
    routing_accuracy, predictions = route_and_decode(
        model, tokenizer, att, ctrl, train, test, layer, profile=prof, generator=gen, reporter=reporter
    )
    laps.lap("evaluate")

    rows, per_arm = score_arms(test, predictions, seed)
    reporter.scores(rows)
    write_scores(rows, out / "scores.parquet")
    reporter.artifact(out / "scores.parquet", "scores")
    summary = {
        "profile": profile if isinstance(profile, str) else "custom",
        "seed": seed,
        "routing_accuracy": routing_accuracy,
        "arms": per_arm,
        "bem_minus_equal": bem_minus_equal(rows),
        "timings_s": laps.timings,
        "config": {**asdict(prof), "read_layer": layer, "data_seed": DATA_SEED, "base": str(base_path)},
        "samples": samples(test, predictions),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    reporter.artifact(out / "summary.json", "summary")
    return summary


def dry_run(base_path: str | Path, profile: str | Profile = "full") -> dict[str, Any]:
    """One seed's models on the meta device, from the base's config.json alone (`bem.core.dryrun`): the
    LoRAs of `train_loras` (through `lora_model`, as `train_lora` builds them), the BEM `compose`
    makes of them and the controller `train_controller` trains; their parameters, and each phase's
    estimated peak memory."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    base = dryrun.meta_base(base_path)
    model = base.model.requires_grad_(False)  # as `load_base`
    train = make_dataset(DATA_SEED, {"train": prof.sizes["train"]})["train"]
    adapters, phases = {}, []
    loras = {}
    for name, examples, rank in (
        ("json", [e for e in train if e.task == "json"], LORA_RANK),
        ("summary", [e for e in train if e.task == "summary"], LORA_RANK),
        ("multitask", train, 2 * LORA_RANK),
    ):
        peft_model = lora_model(model, rank)
        lora = [p for p in peft_model.parameters() if p.requires_grad]
        adapters[f"lora_{name}"] = dryrun.count(lora)
        run = dryrun.Pass(prof.batch_size, base.longest(examples))
        phases.append(dryrun.phase(f"lora_{name} (r {rank})", base, [model, peft_model], lora, run))
        loras[name] = lora_factors(peft_model)
        del peft_model
    att = compose(model, loras)
    ctrl = SimpleController(int(model.config.hidden_size), len(TASKS), interpolation=True)
    adapters |= {"bem": att.num_parameters(), "controller": dryrun.count([ctrl])}
    longest = base.longest(train)
    # `prompt_features` reads every training prompt without gradients, 128 rows at a time.
    phases.append(dryrun.phase("prompt features", base, [model], [], dryrun.Pass(128, longest, False)))
    phases.append(
        dryrun.phase("controller", base, [model, ctrl], [ctrl], dryrun.Pass(prof.batch_size, longest))
    )
    return dryrun.summary(base, adapters, phases, bem_rank_per_site=sum(BLOCKS.values()))
