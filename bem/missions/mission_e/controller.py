"""BEM's part in Mission E (BEM_SPEC.md section 10): a controller that reads each segment and decides
what the state keeps.

Per segment (chunk) of hidden states h [B, T, D] (the model's last layer, from the same pass):
- the code c = tanh(MLP(mean_t h_t)) [B, code_dim], BEM's per-chunk code;
- the eviction signal s_t = sigmoid(a · [h_t, c]) per token: how likely the token is to be asked for
  later. The cache holds it hard (s_t > ½), so `kv.Biased` keeps the marked tokens first and H2O's
  accumulated attention orders the rest;
- one write gate per layer (`gate.WriteGate`, reading c), per token, from each token's novelty,
  surprise and coverage against that layer's memory.

The controller carries no state from one segment to the next: its bytes in the budget are the signal
the cache keeps per token (counted by the cache).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bem.missions.mission_e.gate import WriteGate, coverage, novelty
from bem.missions.mission_e.infini import InfiniAttention

MARK = 0.5  # a token is marked for keeping when its signal is above this


class MemoryController(nn.Module):
    def __init__(self, hidden: int, layers: int, code_dim: int = 8, width: int = 32) -> None:
        super().__init__()
        self.encode = nn.Sequential(
            nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, code_dim), nn.Tanh()
        )
        self.signal = nn.Linear(hidden + code_dim, 1)
        self.gates = nn.ModuleList(WriteGate(code_dim) for _ in range(layers))

    def code(self, hidden: Tensor) -> Tensor:
        return torch.as_tensor(self.encode(hidden.float().mean(dim=1)))

    def keep_signal(self, hidden: Tensor, code: Tensor) -> Tensor:
        """[B, T] in (0, 1)."""
        h = hidden.float()
        joined = torch.cat([h, code[:, None, :].expand(-1, h.shape[1], -1)], dim=-1)
        return torch.sigmoid(self.signal(joined).squeeze(-1))

    def write_gates(
        self, wrappers: list[InfiniAttention], code: Tensor, surprise: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer (g [B, T] exactly 0 or 1 forward, ĝ [B, T]), from the layer's pending keys and
        values and its memory before the write."""
        hard, soft = [], []
        for w, gate in zip(wrappers, self.gates, strict=True):
            assert w.pending is not None and w.state is not None
            k, v = w.pending
            g, g_soft = gate(novelty(k, w.state, w.memory), surprise, coverage(k, v, w.state, w.memory), code)
            hard.append(g)
            soft.append(g_soft)
        return hard, soft


def surprise(logits: Tensor, ids: Tensor, before: Tensor | None = None) -> Tensor:
    """[B, T]: each token's NLL over ln(vocab) (about 1 for a uniform guess), the first predicted by
    `before` ([B, V], the previous step's last logits; 0 surprise without them)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = torch.zeros(ids.shape, device=ids.device)
    if ids.shape[1] > 1:
        nll[:, 1:] = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    if before is not None:
        nll[:, 0] = -torch.log_softmax(before.float(), dim=-1).gather(-1, ids[:, :1]).squeeze(-1)
    return (nll / math.log(logits.shape[-1])).detach()
