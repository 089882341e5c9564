"""Training a memory arm (BEM_SPEC.md section 10): the base stays frozen. First Infini-attention's β
and memory adapters learn with every segment written; the BEM arm then learns its controller (code,
eviction signal, write gates) on that memory, which stays fixed, so BEM's gate and eviction are what
differ between it and ungated Infini-attention.

One step is one training sample (256-512 tokens at smoke: passkey, multikey NIAH, variable tracking)
read chunk by chunk through the arm's state with a KV window of one chunk, so everything older than
the last chunk reaches the answer only through the memory (Infini-attention's segment-local attention).
The answer is then teacher-forced after the prompt, without a write. Losses:
- compression (1.0): the answer's cross-entropy (the memory's only loss);
- reconstruction (.5, BEM): what the final memory returns for the keys of the tokens the question
  attends to, against their values (relative squared error, per layer): "keep what will be asked";
- alignment (.3, BEM): the eviction signal against those same tokens (BCE).
"Those tokens" are the teacher's: the top-k attention of the prompt's last position in the frozen base
with full KV (the sample fits its positions), averaged over layers and heads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.missions.mission_e import kv, tasks
from bem.missions.mission_e.arms import memory_parameters
from bem.missions.mission_e.driver import Arm
from bem.missions.mission_e.memory import MemoryState

WEIGHTS = {"compression": 1.0, "reconstruction": 0.5, "alignment": 0.3}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600  # optimiser steps
    accumulate: int = 4  # samples per step
    lengths: tuple[int, ...] = (256, 384, 512)
    chunk: int = 64
    window: int = 64  # KV kept per layer while training: older tokens only through the memory
    lr: float = 3e-3
    top_k: int = 16  # the teacher's tokens for reconstruction and alignment
    log_every: int = 20


def target_text(sample: tasks.Sample) -> str:
    """The answer as the base learnt to write it (data._source)."""
    return " " + ", ".join(sample.answers) + "."


def training_samples(
    n: int, lengths: Sequence[int], count: Callable[[str], int], seed: int
) -> list[tasks.Sample]:
    rng = random.Random(f"mission_e/train/{seed}")
    makers: list[Callable[[int, float, int], tasks.Sample]] = [
        lambda length, depth, i: tasks.passkey(rng, length, depth, count, i),
        lambda length, depth, i: tasks.niah("niah_multikey", rng, length, depth, count, i),
        lambda length, depth, i: tasks.variable_tracking(rng, length, depth * 0.5, count, i),
    ]
    return [rng.choice(makers)(rng.choice(list(lengths)), rng.random(), i) for i in range(n)]


@torch.no_grad()
def teacher(base: nn.Module, ids: Tensor, k: int) -> Tensor:
    """[T] 0/1: the k prompt tokens the last position attends to most in the base with full KV."""
    out = base(input_ids=ids, use_cache=False, output_attentions=True)
    attention = torch.stack([a[0, :, -1].float() for a in out.attentions]).mean(dim=(0, 1))  # [T]
    marked = torch.zeros_like(attention)
    marked[attention.topk(min(k, attention.numel())).indices] = 1.0
    return marked


def reconstruction(arm: Arm, written: list[list[tuple[Tensor, Tensor]]], marked: Tensor) -> Tensor:
    """Mean over layers of ‖v − read(k)‖² / ‖v‖² for the marked tokens, read from the final memory."""
    index = marked.nonzero().squeeze(-1)
    losses = []
    for w, parts in zip(arm.wrappers, written, strict=True):
        assert w.state is not None
        k = torch.cat([p[0] for p in parts], dim=2)[:, :, index]
        v = torch.cat([p[1] for p in parts], dim=2)[:, :, index].float()
        read = w.memory.retrieve(k, MemoryState(w.state.M, w.state.z)).float()
        losses.append((v - read).pow(2).sum() / v.pow(2).sum().clamp_min(1e-6))
    return torch.stack(losses).mean()


def sample_terms(
    arm: Arm,
    base: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sample: tasks.Sample,
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Tensor]:
    """One sample read chunk by chunk through the arm, its answer teacher-forced: the loss terms."""
    prompt = tokenizer(sample.prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    answer = tokenizer(target_text(sample), add_special_tokens=False, return_tensors="pt").input_ids.to(
        device
    )
    arm.reset(1)
    written: list[list[tuple[Tensor, Tensor]]] = [[] for _ in arm.wrappers]
    signals, last = [], None
    for lo in range(0, prompt.shape[1], cfg.chunk):
        st = arm.step(prompt[:, lo : lo + cfg.chunk])
        last = st.logits[:, -1:]
        if st.signal is not None:
            signals.append(st.signal[0])
        for parts, w in zip(written, arm.wrappers, strict=True):
            assert w.committed is not None
            parts.append(w.committed)
    assert last is not None
    logits = torch.cat([last, arm.step(answer, write=False).logits[:, :-1]], dim=1)
    terms = {"compression": F.cross_entropy(logits[0].float(), answer[0])}
    if arm.controller is not None:
        marked = teacher(base, prompt, cfg.top_k)
        terms["reconstruction"] = reconstruction(arm, written, marked)
        # Plain BCE: the signal estimates P(asked for), so the cache's mark (above ½) keeps only the
        # tokens more likely asked for than not. (Balanced, it marked a fifth of a haystack.)
        terms["alignment"] = F.binary_cross_entropy(torch.cat(signals).clamp(1e-6, 1 - 1e-6), marked)
    return terms


def train_arm(
    arm: Arm,
    base: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[tasks.Sample],
    cfg: TrainConfig,
    seed: int,
    log: Callable[[int, dict[str, float]], None],
    part: Literal["memory", "controller"] = "memory",
) -> list[dict[str, float]]:
    """Train one part of the arm in place on `samples`; returns the logged losses. "memory": β and the
    memory adapters, every segment written, no controller (the compression loss alone); "controller":
    BEM's controller on a trained memory, which stays as it is (all three losses)."""
    controller = arm.controller
    if part == "memory":
        params = memory_parameters(arm)
        arm.controller = None
    elif controller is None:
        raise ValueError("this arm has no controller to train")
    else:
        params = list(controller.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    order, pool = random.Random(f"mission_e/order/{seed}"), list(samples)
    # A window of one chunk, whatever the arm evicts with at test: a policy that keeps old tokens (H2O
    # keeps the needle, which draws attention) would let the answer come from the KV and teach the
    # memory nothing.
    kept = arm.budget, arm.policy
    arm.budget, arm.policy = cfg.window, kv.Window()
    history: list[dict[str, float]] = []
    device = next(arm.model.parameters()).device
    try:
        for step in range(1, cfg.steps + 1):
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for _ in range(cfg.accumulate):
                terms = sample_terms(arm, base, tokenizer, order.choice(pool), cfg, device)
                loss = sum((WEIGHTS[name] * t for name, t in terms.items()), torch.zeros(()))
                (loss / cfg.accumulate).backward()
                for name, t in (*terms.items(), ("loss", loss)):
                    sums[name] = sums.get(name, 0.0) + float(t.detach()) / cfg.accumulate
            opt.step()
            history.append(sums)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log(step, sums)
    finally:
        (arm.budget, arm.policy), arm.controller = kept, controller
        for p in params:
            p.requires_grad_(False)
    return history
