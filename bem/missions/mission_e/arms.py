"""Mission E's arms at equal state bytes (issue 19; missions_cde.md E.3).

Every arm holds the same B bytes: kept KV with the scores its cache keeps per token (H2O's
accumulated attention and SnapKV's votes for every evicting cache, BEM's signal in its own), plus the
compressive memory (M, z) for the memory arms. `budget_tokens` turns B into the tokens each arm keeps
per layer and KV head. `full_kv` keeps everything (run only where the length fits the model's
positions).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bem.missions.mission_e import budget, kv
from bem.missions.mission_e.controller import MemoryController
from bem.missions.mission_e.driver import Arm, eager
from bem.missions.mission_e.infini import attach_memory

SCORES = 2  # per kept token and KV head, every evicting cache: H2O's sum and SnapKV's votes


@dataclass(frozen=True)
class ArmSpec:
    policy: kv.Policy
    memory: bool = False  # Infini-attention's compressive memory
    bem: bool = False  # BEM's write gate and eviction signal
    full: bool = False  # keeps every token (no budget)


# BEM's signal ranks the tokens it marks above any H2O score (a sum of attention weights over at most
# the tokens seen, far below 10^6); H2O orders the rest.
BEM_LAMBDA = 1e6

ARMS: dict[str, ArmSpec] = {
    "full_kv": ArmSpec(kv.Window(), full=True),
    "window": ArmSpec(kv.Window()),
    "streaming_llm": ArmSpec(kv.StreamingLLM()),
    "h2o": ArmSpec(kv.H2O()),
    "snapkv": ArmSpec(kv.SnapKV()),
    "infini": ArmSpec(kv.Window(), memory=True),
    "bem": ArmSpec(kv.Biased(kv.H2O(), lam=BEM_LAMBDA), memory=True, bem=True),
}
KV_ONLY = ("window", "streaming_llm", "h2o", "snapkv")


def budget_tokens(spec: ArmSpec, shapes: budget.Shapes, bytes_: int) -> int:
    """The tokens an arm keeps per layer and KV head within `bytes_` of state."""
    scores = SCORES + (1 if spec.bem else 0)
    return budget.kept_tokens(shapes, bytes_, memory=spec.memory, scores=scores)


def build(base: nn.Module, spec: ArmSpec, tokens: int, *, rank: int = 8, code_dim: int = 8) -> Arm:
    """An arm on `base` (frozen); a memory arm gets its own copy, wrapped, with trainable memory
    parameters (β, the memory adapters) and, for BEM, the controller."""
    eager(base)
    if not spec.memory:
        return Arm(base, spec.policy, 10**9 if spec.full else tokens)
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    wrappers = attach_memory(model, delta=True, rank=rank)
    model.requires_grad_(False)  # the memory's parameters too, until a training stage asks for them
    controller = None
    if spec.bem:
        config: Any = model.config
        controller = MemoryController(int(config.hidden_size), int(config.num_hidden_layers), code_dim)
        controller.to(next(model.parameters()).device).requires_grad_(False)
    return Arm(model, spec.policy, tokens, wrappers, controller)


def memory_parameters(arm: Arm) -> list[nn.Parameter]:
    """Infini-attention's own: β per head and the memory's query and key adapters, every layer."""
    return [p for w in arm.wrappers for m in (w.memory, w.query, w.key) for p in m.parameters()]


def copy_memory(source: Arm, target: Arm) -> None:
    """Give `target` the memory parameters `source` learnt (the BEM arm starts from the seed's Infini)."""
    with torch.no_grad():
        for a, b in zip(memory_parameters(source), memory_parameters(target), strict=True):
            b.copy_(a)
