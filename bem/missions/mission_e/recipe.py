"""Mission E (BEM_SPEC.md section 10, issue 19): at equal state bytes, does BEM-gated compressive
memory with BEM-biased eviction answer long-context questions better than KV-only eviction and than
ungated Infini-attention?

Recipe, one seed, every arm from the same frozen base:
1. The budget B: `budget_tokens` tokens' worth of plain KV, in bytes; each arm keeps what fits in B
   (`arms.budget_tokens`).
2. KV-only arms (window, StreamingLLM, H2O, SnapKV) and full KV (where the length fits the base's
   positions) are scored as they are; the KV-only arms also on the development split, which picks
   the best of them (`best_kv`).
3. The memory arms are trained (`train`) and scored on the same samples: ungated Infini-attention's
   memory first; the BEM arm starts from that memory and learns its controller (gate and eviction).
4. Values for the guards: the BEM arm's spike ratio, its p50 prefill latency per token over the best
   KV-only arm's (interleaved), and its peak state from the second-largest length to the largest.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bem.core.models import load_model
from bem.core.reporter import Laps, Reporter, ScoreRow, check_cancelled, write_scores
from bem.missions.mission_e import arms as A
from bem.missions.mission_e import evaluate as E
from bem.missions.mission_e.budget import Shapes, budget_bytes
from bem.missions.mission_e.driver import eager
from bem.missions.mission_e.train import TrainConfig, train_arm, training_samples


@dataclass(frozen=True)
class Profile:
    budget_tokens: int  # B, in tokens' worth of plain KV
    n_train: int  # training samples drawn (steps pick among them)
    train: TrainConfig
    eval: E.EvalConfig = field(default_factory=E.EvalConfig)


PROFILES = {
    "tiny": Profile(
        48, 8,
        TrainConfig(steps=3, accumulate=1, lengths=(160,), chunk=32, window=32, log_every=1),
        # The smoke's lengths (the gates name them), one sample per task, length and depth.
        E.EvalConfig(depths=(0.0, 1.0), repeats=1, dev_repeats=1, latency_samples=2, chunk=256),
    ),
    "smoke": Profile(256, 512, TrainConfig()),
    "full": Profile(
        8192, 4096,
        TrainConfig(steps=5000, lengths=(2048, 4096, 8192), chunk=2048, window=2048, lr=2e-5, top_k=64),
        E.EvalConfig(lengths=(8192, 32768, 131072, 262144, 524288), repeats=8, dev_repeats=2, chunk=2048,
                     spike_window=256),
    ),
}  # fmt: skip


def run_mission_e(
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
    wanted = list(arms or A.ARMS)
    unknown = sorted(set(wanted) - set(A.ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; arms: {list(A.ARMS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    laps = Laps()
    base, tok = load_model(base_path, device=device)
    base.requires_grad_(False)
    eager(base)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    shapes = Shapes.of(base.config, dtype_bytes=base.dtype.itemsize)
    budget = budget_bytes(shapes, prof.budget_tokens)
    positions = int(base.config.max_position_embeddings)
    cfg = prof.eval
    test = E.samples("test", cfg, count)
    dev = E.samples("dev", cfg, count, lengths=[max(cfg.lengths)])
    laps.lap("data")

    # Drawn once: both memory arms train on the same samples.
    memory_arms = any(A.ARMS[n].memory for n in wanted)
    samples = training_samples(prof.n_train, prof.train.lengths, count, seed) if memory_arms else []
    rows: list[ScoreRow] = []
    runs: dict[str, dict[str, Any]] = {}
    built: dict[str, Any] = {}
    for name in wanted:
        spec = A.ARMS[name]
        tokens = A.budget_tokens(spec, shapes, budget)
        torch.manual_seed(seed)
        arm = A.build(base, spec, tokens)
        info: dict[str, Any] = {"kept_tokens": None if spec.full else tokens}
        if spec.memory:
            if spec.bem and "infini" in built:
                A.copy_memory(built["infini"], arm)  # the same memory: only BEM's gate and eviction differ
            else:
                log = logger(reporter, f"{name}/memory")
                info["memory_losses"] = train_arm(arm, base, tok, samples, prof.train, seed, log)[-1]
            if spec.bem:
                log = logger(reporter, f"{name}/controller")
                history = train_arm(arm, base, tok, samples, prof.train, seed, log, part="controller")
                info["controller_losses"] = history[-1]
            info["beta"] = [torch.sigmoid(w.memory.beta).tolist() for w in arm.wrappers]
        fits = (lambda n: n + max(E.MAX_NEW.values()) <= positions) if spec.full else (lambda _n: True)
        scored = E.score_arm(arm, name, seed, tok, test, cfg, fits)
        rows += scored.rows
        reporter.scores(scored.rows)
        info |= {
            "means": scored.accuracy,
            "peak_bytes": scored.peak_bytes,
            "written_share": scored.written_share,
        }
        if name in A.KV_ONLY:
            info["dev_accuracy"] = E.dev_accuracy(arm, tok, dev, cfg)
        runs[name] = info
        built[name] = arm
        laps.lap(name)
        check_cancelled(reporter)

    best = max((n for n in A.KV_ONLY if n in runs), key=lambda n: runs[n]["dev_accuracy"], default=None)
    if best is not None:
        copied = [ScoreRow(r.example_id, "best_kv", r.seed, r.metric, r.value) for r in rows if r.arm == best]
        rows += copied
        reporter.scores(copied)

    ids = E.stream(count, tok, max(cfg.lengths)).to(base.device)
    ref = E.reference_nll(base, ids, prof.budget_tokens, positions)
    spikes = {n: E.arm_spike(arm, ids, ref, cfg) for n, arm in built.items() if not A.ARMS[n].full}
    timed = {n: built[n] for n in ("bem", "infini", best) if n in built}
    p50 = E.latency(timed, tok, test, cfg)
    laps.lap("spike_latency")

    summary: dict[str, Any] = {
        "profile": asdict(prof),
        "seed": seed,
        "budget_bytes": budget,
        "best_kv": best,
        "arms": runs,
        "spike_ratio": spikes,
        "p50_s_per_token": p50,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timings_s": laps.timings,
        "values": run_values(runs, spikes, p50, best, budget, cfg.lengths),
    }
    write_scores(rows, out / "scores.parquet")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    reporter.artifact(out / "summary.json", "summary")
    return summary


def logger(reporter: Reporter, prefix: str) -> Callable[[int, dict[str, float]], None]:
    def log(step: int, values: dict[str, float]) -> None:
        reporter.metrics({f"{prefix}/{k}": v for k, v in values.items()}, step)

    return log


def run_values(
    runs: dict[str, dict[str, Any]],
    spikes: dict[str, float],
    p50: dict[str, float],
    best: str | None,
    budget: int,
    lengths: Sequence[int],
) -> dict[str, float]:
    """What the value guards read, for the BEM arm: its spike ratio, its p50 latency over the best
    KV-only arm's, its peak state at the largest length over the second-largest, and its peak state
    over the budget (at most 1: the arm held no more than B)."""
    if "bem" not in runs:
        return {}
    peak = runs["bem"]["peak_bytes"]
    second, largest = sorted(lengths)[-2:]
    values = {
        "spike_ratio": spikes["bem"],
        "memory_ratio": peak[largest] / peak[second],
        "state_over_budget": max(peak.values()) / budget,
    }
    if best is not None:
        values["p50_ratio"] = p50["bem"] / p50[best]
    return values


def dry_run(base_path: str | Path, profile: str | Profile = "full") -> dict[str, Any]:
    """The state each arm holds at the profile's budget, from the base's config.json alone: tokens kept
    per layer and KV head, and bytes; beside it what full KV would hold at each length."""
    from transformers import AutoConfig

    prof = PROFILES[profile] if isinstance(profile, str) else profile
    config = AutoConfig.from_pretrained(base_path, local_files_only=True)
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    shapes = Shapes.of(config, dtype_bytes=torch.empty(0, dtype=dtype).element_size())
    budget = budget_bytes(shapes, prof.budget_tokens)
    kept = {n: A.budget_tokens(s, shapes, budget) for n, s in A.ARMS.items() if not s.full}
    return {
        "budget_bytes": budget,
        "memory_bytes": shapes.memory(),
        "kept_tokens": kept,
        "full_kv_bytes": {n: budget_bytes(shapes, n) for n in prof.eval.lengths},
        "max_position_embeddings": int(config.max_position_embeddings),
    }
