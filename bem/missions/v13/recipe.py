"""The v1.3 suite (BEM_SPEC.md section 11, issue 20): one arm, one seed per task.

Recipe:
1. The arm's knobs: fitted to parity at the base's shape (`arms.fit`), or set by hand in
   params.variants and refused off parity (also at submit, `workers.kinds.v13.check`).
2. A text arm trains on the four text tasks together (`data.TASKS`, one fixed training set, batches
   drawn by the seed); MM and MM_prefix train on scenes, half of them with a conflicting caption.
3. Scores per test example: `qa_em`, `qa_f1`; `em`, `f1` over QA and summary (the EM/F1 tasks);
   `chrf#k`, `bleu#k` (corpus chrF and BLEU, V3's target); `json_valid`, `json_fields` (V4's);
   `summary_em`, `summary_f1`; MM: `vqa_em` on the plain split, `vqa_em_conflict` on the conflict one.
4. `values` for the guards, each measured in this process: the arm's parity ratios from its built
   modules, its training step's memory against its baseline's, and its p50 latency against its
   baseline's (both models built here, timed interleaved).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.core.metrics import bleu_stats, chrf_stats, exact_match, token_f1
from bem.core.models import load_model
from bem.core.reporter import Laps, Reporter, ScoreRow, row_means, write_scores
from bem.core.train import Pair
from bem.missions.v13 import arms as A
from bem.missions.v13 import data, parity
from bem.missions.v13.mm import MMModel, PrefixModel
from bem.missions.v13.train import Arm, TrainConfig, batch_of, decode, step_loss, train
from bem.missions.v13.variants import ArmModel
from bem.missions.validation.metrics import json_scores

DATA_SEED = 0  # the same examples for every seed and arm: example_ids pair
MAX_NEW = {"qa": 4, "translate": 24, "json": 48, "summary": 40, "vqa": 3}


@dataclass(frozen=True)
class Profile:
    n_train: int  # per text task
    n_test: int  # per text task, and per VQA split
    n_scenes: int  # VQA training scenes (half conflicting)
    train: TrainConfig
    mm_train: TrainConfig
    latency_reps: int = 31


PROFILES = {
    "tiny": Profile(24, 6, 48, TrainConfig(steps=3, batch_size=4), TrainConfig(steps=3, batch_size=4), 3),
    "smoke": Profile(600, 100, 3000, TrainConfig(steps=200), TrainConfig(steps=1000)),
    "full": Profile(5000, 500, 20000, TrainConfig(steps=3000, batch_size=64, lr=1e-3),
                    TrainConfig(steps=3000, batch_size=64, lr=1e-3)),
}  # fmt: skip


def build(arm: str, lm: nn.Module, shape: A.Shape, knobs: A.Knobs) -> Any:
    if arm == "MM":
        return MMModel(lm, shape, knobs)
    if arm == "MM_prefix":
        return PrefixModel(lm, shape, knobs)
    return ArmModel(lm, arm, shape, knobs)


def run_v13(
    base_path: str | Path,
    *,
    profile: str | Profile = "smoke",
    seed: int = 1,
    out_dir: str | Path,
    reporter: Reporter,
    device: str = "cpu",
    arm: str = "anchor",
    variants: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if arm not in A.ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {list(A.ARMS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    laps = Laps()
    lm, tok = load_model(base_path, device=device)
    lm.config._attn_implementation = "eager"  # V2 reads attention weights; every arm runs the same kernel
    shape = A.Shape.of_config(lm.config.to_dict())
    knobs = A.knobs_for(arm, shape, (variants or {}).get(arm))
    A.require(arm, shape, knobs)  # a task refuses what submit would have
    torch.manual_seed(seed)
    model = build(arm, lm, shape, knobs).to(device)
    laps.lap("build")

    mm = arm in A.MM_ARMS
    if mm:
        scenes = data.vqa_scenes("train", prof.n_scenes // 2, DATA_SEED) + data.vqa_scenes(
            "train", prof.n_scenes - prof.n_scenes // 2, DATA_SEED, conflict=True
        )
        pairs = [Pair(data.vqa_prompt(s), f" {s.answer}") for s in scenes]
        extra = list(model.encoder_parameters())
        trained = train(model, tok, pairs, prof.mm_train, seed, reporter, arm, device,
                        [s.image for s in scenes], extra)  # fmt: skip
    else:
        pairs = [
            Pair(e.prompt, e.target) for t in data.TASKS for e in data.text_examples(t, "train", prof.n_train)
        ]
        trained = train(model, tok, pairs, prof.train, seed, reporter, arm, device)
    laps.lap("train")

    rows, detail = (
        score_vqa(model, tok, prof, arm, seed, device)
        if mm
        else score_text(model, tok, prof, arm, seed, device)
    )
    reporter.scores(rows)
    laps.lap("score")
    values = measure(arm, model, base_path, tok, shape, knobs, pairs[:8], prof, device)
    laps.lap("measure")
    summary: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "knobs": asdict(knobs),
        "train": trained,
        "means": row_means(rows),
        "detail": detail,
        "values": values,
        "timings_s": laps.timings,
    }
    write_scores(rows, out / "scores.parquet")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    reporter.artifact(out / "summary.json", "summary")
    return summary


# ---- scores -----------------------------------------------------------------------------------------


def score_text(
    model: Arm, tok: PreTrainedTokenizerBase, prof: Profile, arm: str, seed: int, device: str
) -> tuple[list[ScoreRow], dict[str, Any]]:
    rows: list[ScoreRow] = []
    samples: dict[str, list[tuple[str, str]]] = {}

    def row(example_id: str, metric: str, value: float) -> None:
        rows.append(ScoreRow(example_id, arm, seed, metric, float(value)))

    for task in data.TASKS:
        examples = data.text_examples(task, "test", prof.n_test, DATA_SEED)
        stop = _json_closed if task == "json" else None
        preds = decode(model, tok, [e.prompt for e in examples], MAX_NEW[task], device, stop=stop)
        samples[task] = [(e.target, p) for e, p in list(zip(examples, preds, strict=True))[:3]]
        for e, pred in zip(examples, preds, strict=True):
            for name, value in score_one(e, pred).items():
                row(e.example_id, name, value)
    return rows, {"samples": samples}


def score_one(example: data.Example, pred: str) -> dict[str, float]:
    """One prediction's scores (the names the gates read; see the module's docstring)."""
    gold = example.target.strip()
    first_line = pred.strip().split("\n")[0]
    if example.task in ("qa", "summary"):
        em, f1 = exact_match(first_line, gold), token_f1(first_line, gold)
        return {f"{example.task}_em": em, f"{example.task}_f1": f1, "em": em, "f1": f1}
    if example.task == "translate":
        stats = {f"chrf#{i}": v for i, v in enumerate(chrf_stats(first_line, gold))}
        return {**stats, **{f"bleu#{i}": v for i, v in enumerate(bleu_stats(first_line, gold))}}
    if example.task == "json":
        assert example.fields is not None
        valid, fields = json_scores(pred, example.fields)
        return {"json_valid": valid, "json_fields": fields}
    raise ValueError(f"unknown task {example.task!r}")


def _json_closed(text: str) -> bool:
    return text.count("{") > 0 and text.count("{") == text.count("}")


def score_vqa(
    model: Any, tok: PreTrainedTokenizerBase, prof: Profile, arm: str, seed: int, device: str
) -> tuple[list[ScoreRow], dict[str, Any]]:
    rows: list[ScoreRow] = []
    detail: dict[str, Any] = {}
    for conflict, metric in ((False, "vqa_em"), (True, "vqa_em_conflict")):
        scenes = data.vqa_scenes("test", prof.n_test, DATA_SEED, conflict)
        preds, gates = [], []
        for lo in range(0, len(scenes), 64):
            part = scenes[lo : lo + 64]
            preds += decode(model, tok, [data.vqa_prompt(s) for s in part], MAX_NEW["vqa"], device,
                            [s.image for s in part])  # fmt: skip
            if isinstance(model, MMModel) and model.last_gate is not None:
                gates += model.last_gate.flatten().tolist()
        for s, pred in zip(scenes, preds, strict=True):
            first = pred.strip().split("\n")[0].rstrip(".")
            rows.append(ScoreRow(s.example_id, arm, seed, metric, exact_match(first, s.answer)))
        if gates:
            detail[f"gate_mean_{'conflict' if conflict else 'plain'}"] = float(np.mean(gates))
    return rows, detail


# ---- the guards' values ----------------------------------------------------------------------------


def measure(
    arm: str,
    model: Any,
    base_path: str | Path,
    tok: PreTrainedTokenizerBase,
    shape: A.Shape,
    knobs: A.Knobs,
    pairs: Sequence[Pair],
    prof: Profile,
    device: str,
) -> dict[str, float]:
    """Parity from the built modules (parameters counted, FLOPs from their shapes), and memory and
    latency against `measured_against(arm)`, built here on its own copy of the frozen LM."""
    base_arm = measured_against(arm)
    baseline = model
    if base_arm != arm:
        lm, _ = load_model(base_path, device=device)
        lm.config._attn_implementation = "eager"
        baseline = build(base_arm, lm, shape, A.fit(base_arm, shape)).to(device)
    counted = parity.Cost(
        sum(p.numel() for p in model.adapter_parameters()), A.cost(arm, shape, knobs).flops_per_token
    )
    want = parity.Cost(
        sum(p.numel() for p in baseline.adapter_parameters()),
        A.cost(base_arm, shape, A.fit(base_arm, shape)).flops_per_token,
    )
    images = None
    if arm in A.MM_ARMS:
        images = torch.from_numpy(np.stack([s.image for s in data.vqa_scenes("test", len(pairs), DATA_SEED)]))
    batch = batch_of(tok, pairs, device)
    mem, base_mem = step_bytes(model, batch, images), step_bytes(baseline, batch, images)
    times, base_times = latency(model, baseline, batch, images, prof.latency_reps)
    values = {
        f"param_ratio_{arm}": counted.parameters / want.parameters,
        f"flops_ratio_{arm}": counted.flops_per_token / want.flops_per_token,
        f"memory_ratio_{arm}": mem / base_mem,
        f"latency_ratio_{arm}": statistics.median(times) / statistics.median(base_times),
        f"p50_ms_{arm}": 1e3 * statistics.median(times),
    }
    return values


def measured_against(arm: str) -> str:
    """Whose memory and latency an arm's are divided by: MM and its baseline each other's, the
    variants the anchor's (the anchor its own: 1)."""
    return {"MM": "MM_prefix", "MM_prefix": "MM"}.get(arm, "anchor")


def step_bytes(model: Any, batch: Any, images: Tensor | None) -> float:
    """A training step's memory: the frozen weights, the arm's weights, gradients and AdamW's two
    moments, and the activations autograd saves for the backward pass (each storage once, parameters
    not again). On CPU those are counted, deterministic unlike a process's RSS; on a GPU the step's
    peak `torch.cuda.max_memory_allocated` (with both models resident, which tilts the ratio toward 1)
    plus the moments, which no optimizer allocated here."""
    trainable = sum(p.numel() * p.element_size() for p in model.adapter_parameters())
    if images is not None:
        images = images.to(batch.input_ids.device)
    if batch.input_ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_loss(model, batch, images).backward()
        model.clear()
        peak = torch.cuda.max_memory_allocated()
        for p in model.adapter_parameters():
            p.grad = None
        return float(peak + 2 * trainable)
    weights = {p.data_ptr() for p in model.lm.parameters()} | {
        p.data_ptr() for p in model.adapter_parameters()
    }
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(model, batch, images)
    loss.backward()
    model.clear()
    for p in model.adapter_parameters():
        p.grad = None
    added = {id(p) for p in model.adapter_parameters()}
    frozen = sum(p.numel() * p.element_size() for p in model.lm.parameters() if id(p) not in added)
    return float(frozen + 4 * trainable + sum(storages.values()))


@torch.no_grad()
def latency(
    model: Any, baseline: Any, batch: Any, images: Tensor | None, reps: int
) -> tuple[list[float], list[float]]:
    """Seconds of one prompt pass (prepare and forward) per rep, the two models interleaved, the one
    going first alternating (whatever the machine does in between falls on both alike)."""
    device = batch.input_ids.device
    if images is not None:
        images = images.to(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    for rep in range(reps + 1):
        order = [(0, model), (1, baseline)]
        for i, m in order if rep % 2 else order[::-1]:
            m.image = images
            _sync(device)
            start = time.perf_counter()
            m.prepare(batch.input_ids, batch.attention_mask, batch.prompt_mask)
            m(batch.input_ids, batch.attention_mask)
            _sync(device)
            took = time.perf_counter() - start
            m.clear()
            if rep:  # the first rep warms up
                times[i].append(took)
    return times[0], times[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
