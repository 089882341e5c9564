"""Scoring Mission E's arms: accuracy by task, length and depth, the spike ratio, latency and memory.

- Test samples: every task at every length and depth, `repeats` each, the same for every arm and
  seed (their ids pair the arms). Scored with `string_match_all` on the answer's first sentence, as
  rows `{task}_{length}` and `acc_{length}` (all tasks), and under the names the gates read whatever
  the profile's lengths: `acc_largest`; `acc_training` and `{task}_training` at the first length (the
  training length); `passkey_in_window` for passkey needles at the very end at the largest length (a
  KV-only arm's kept window holds them).
- Development samples (other draws, largest length only) choose the best KV-only arm; its test rows
  are copied under the arm `best_kv`, which the claims compare against.
- The perplexity spike ratio: over one long stream of documents, the maximum over 256-token windows
  of PPL_arm / PPL_reference, the reference being full KV where the stream fits the model's positions
  and else a sliding window recomputed over the budget's tokens (StreamingLLM's oracle).
- Latency: prefill seconds per token at the largest length, the arms interleaved sample by sample so
  a busy machine slows them alike; p50 over samples.
- Memory: each arm's peak state bytes (counted from the tensors held after every step) by length.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from bem.core.reporter import ScoreRow
from bem.missions.mission_e import tasks
from bem.missions.mission_e.driver import Arm, answer, recompute_nll, stream_nll

TASKS = ("passkey", "niah_multikey", "variable_tracking")
MAX_NEW = {"passkey": 12, "niah_multikey": 12, "variable_tracking": 32}
DATA_SEED = 0  # test and dev samples are the same for every seed


@dataclass(frozen=True)
class EvalConfig:
    lengths: tuple[int, ...] = (256, 512, 2048, 8192)  # the first is the training length
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    repeats: int = 4  # samples per task, length and depth
    dev_repeats: int = 2  # development samples per task and depth, at the largest length
    latency_samples: int = 6
    chunk: int = 64
    spike_window: int = 256


def make(
    task: str, rng: random.Random, length: int, depth: float, count: Callable[[str], int], i: int
) -> tasks.Sample:
    if task == "passkey":
        return tasks.passkey(rng, length, depth, count, i)
    if task == "variable_tracking":
        # The chain's first line at `depth` of the first half: its four successors follow it.
        return tasks.variable_tracking(rng, length, depth * 0.5, count, i)
    return tasks.niah(task, rng, length, depth, count, i)


def samples(
    split: str, cfg: EvalConfig, count: Callable[[str], int], lengths: Sequence[int] | None = None
) -> list[tasks.Sample]:
    repeats = cfg.repeats if split == "test" else cfg.dev_repeats
    out = []
    for task in TASKS:
        for length in lengths or cfg.lengths:
            for depth in cfg.depths:
                for i in range(repeats):
                    rng = random.Random(f"mission_e/{split}/{DATA_SEED}/{task}/{length}/{depth}/{i}")
                    out.append(make(task, rng, length, depth, count, i))
    return out


def score(text: str, sample: tasks.Sample) -> float:
    return tasks.string_match_all(text.split(".")[0], sample.answers)


@dataclass(frozen=True)
class Scored:
    rows: list[ScoreRow]
    accuracy: dict[str, float]  # metric -> mean
    peak_bytes: dict[int, int]  # length -> the most state held
    written_share: float | None  # the share of tokens BEM's gate wrote (None without the gate)


def score_arm(
    arm: Arm,
    name: str,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    test: Sequence[tasks.Sample],
    cfg: EvalConfig,
    fits: Callable[[int], bool] = lambda _n: True,
) -> Scored:
    rows: list[ScoreRow] = []
    peak: dict[int, int] = {}
    offered = written = 0
    largest = max(cfg.lengths)
    for s in test:
        if not fits(s.length):
            continue
        got = answer(arm, tokenizer, s.prompt, chunk=cfg.chunk, max_new_tokens=MAX_NEW[s.task])
        value = score(got.text, s)
        peak[s.length] = max(peak.get(s.length, 0), got.peak_bytes)
        offered, written = offered + got.offered, written + got.written
        metrics = [f"{s.task}_{s.length}", f"acc_{s.length}"]
        if s.length == largest:
            metrics.append("acc_largest")
            if s.task == "passkey" and s.depth == 1.0:
                metrics.append("passkey_in_window")
        if s.length == cfg.lengths[0]:
            metrics += ["acc_training", f"{s.task}_training"]
        rows += [ScoreRow(s.example_id, name, seed, m, value) for m in metrics]
    return Scored(rows, means(rows), peak, written / offered if offered else None)


def means(rows: Sequence[ScoreRow]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r.metric, []).append(r.value)
    return {m: sum(v) / len(v) for m, v in sorted(by.items())}


def dev_accuracy(
    arm: Arm, tokenizer: PreTrainedTokenizerBase, dev: Sequence[tasks.Sample], cfg: EvalConfig
) -> float:
    values = [
        score(answer(arm, tokenizer, s.prompt, chunk=cfg.chunk, max_new_tokens=MAX_NEW[s.task]).text, s)
        for s in dev
    ]
    return sum(values) / len(values)


def stream(count: Callable[[str], int], tokenizer: PreTrainedTokenizerBase, length: int) -> torch.Tensor:
    """[1, length] token ids: training-style documents (prompt and answer) at 256 tokens, end to end."""
    rng = random.Random(f"mission_e/stream/{DATA_SEED}")
    ids: list[int] = []
    i = 0
    while len(ids) < length:
        s = make(TASKS[i % len(TASKS)], rng, 256, rng.random(), count, i)
        text = s.prompt + " " + ", ".join(s.answers) + ". "
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        i += 1
    return torch.tensor([ids[:length]])


def spike_ratio(arm_nll: torch.Tensor, ref_nll: torch.Tensor, window: int) -> float:
    """max over consecutive `window`-token windows of PPL_arm / PPL_ref."""
    n = (arm_nll.numel() // window) * window
    a = arm_nll[:n].view(-1, window).mean(1)
    r = ref_nll[:n].view(-1, window).mean(1)
    return float(torch.exp(a - r).max())


def reference_nll(base: torch.nn.Module, ids: torch.Tensor, window: int, max_positions: int) -> torch.Tensor:
    """Full KV where the stream fits the positions (a window as long as the stream), else a window."""
    return recompute_nll(base, ids, ids.shape[1] if ids.shape[1] <= max_positions else window)


def arm_spike(arm: Arm, ids: torch.Tensor, ref: torch.Tensor, cfg: EvalConfig) -> float:
    return spike_ratio(stream_nll(arm, ids, cfg.chunk), ref, cfg.spike_window)


def latency(
    arms: dict[str, Arm], tokenizer: PreTrainedTokenizerBase, test: Sequence[tasks.Sample], cfg: EvalConfig
) -> dict[str, float]:
    """p50 prefill seconds per token at the largest length, the arms interleaved per sample."""
    largest = max(cfg.lengths)
    longest = [s for s in test if s.length == largest]  # task by task: spread the picks over them
    chosen = longest[:: max(1, len(longest) // cfg.latency_samples)][: cfg.latency_samples]
    times: dict[str, list[float]] = {name: [] for name in arms}
    for s in chosen:
        for name, arm in arms.items():
            got = answer(arm, tokenizer, s.prompt, chunk=cfg.chunk, max_new_tokens=1)
            times[name].append(got.prefill_s / got.tokens)
    return {name: statistics.median(t) for name, t in times.items()}
