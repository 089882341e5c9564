"""Controllers: small networks that turn context features into the BEM code c (BEM_SPEC §2).

The simple controller maps one pooled feature vector to a code (per-example routing). The
hierarchical one emits a code per chunk: a prefix code to start, then an in-graph EMA of chunk
codes computed from the previous chunk's adapted hidden states, so the code of chunk k depends
only on tokens before it (cache safety) and gradients reach every earlier chunk.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CODE_MAX_NORM = 3.0


def masked_mean(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over tokens of [B, T, d], ignoring padded positions (mask 0)."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def code_entropy(code: Tensor) -> Tensor:
    """H(softmax c) per row: how spread the code is, logged and regularised toward .5·log R."""
    logp = F.log_softmax(code, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _mlp(widths: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _init_last(mlp: nn.Sequential, orthonormal: bool) -> None:
    """Init the last layer of an `_mlp`: orthonormal bases give ΔW = 0 only through a zero code, so
    it starts at zero; otherwise U = 0 already does that and a small Xavier init lets gradients reach U
    at once."""
    layer = cast(nn.Linear, mlp[-1])  # _mlp always ends with an nn.Linear
    if orthonormal:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=0.02)
    nn.init.zeros_(layer.bias)


@dataclass
class CodeStats:
    """What every controller logs about its codes, as batch means."""

    norm: float
    gate: float
    entropy: float

    @classmethod
    def of(cls, code: Tensor, gate: Tensor | None) -> CodeStats:
        with torch.no_grad():
            return cls(
                norm=code.norm(dim=-1).mean().item(),
                gate=1.0 if gate is None else gate.mean().item(),
                entropy=code_entropy(code).mean().item(),
            )


class CodePostprocess(nn.Module):
    """Norm clamp c ← c·min(1, 3/‖c‖₂), then the uncertainty gate c ← u·c, u = σ(g(mean h_prefix)/T)."""

    def __init__(self, d_model: int, max_norm: float = CODE_MAX_NORM, gate: bool = True) -> None:
        super().__init__()
        self.max_norm = max_norm
        self.gate = _mlp([d_model, max(8, d_model // 4), 1]) if gate else None
        self.log_temperature = nn.Parameter(torch.zeros(())) if gate else None

    def forward(self, code: Tensor, prefix_summary: Tensor) -> tuple[Tensor, Tensor | None]:
        norm = code.norm(dim=-1, keepdim=True)
        code = code * torch.clamp(self.max_norm / norm.clamp_min(1e-12), max=1.0)
        if self.gate is None or self.log_temperature is None:
            return code, None
        u = torch.sigmoid(self.gate(prefix_summary) / self.log_temperature.exp())
        return u * code, u


@dataclass
class ControllerOutput:
    code: Tensor
    stats: CodeStats
    gate: Tensor | None = None


class SimpleController(nn.Module):
    """LN → Lin(d,h) → GELU → Drop → Lin(h,h/2) → GELU → Drop → Lin(h/2,R) on pooled features.

    In interpolation mode the output is softmax(·): convex weights over experts (validation
    experiment), with no clamp or gate since the weights already sum to one.
    """

    feature_mean: Tensor  # buffers, registered in __init__
    feature_std: Tensor

    def __init__(
        self,
        d_model: int,
        code_dim: int,
        hidden: int | None = None,
        dropout: float = 0.1,
        orthonormal: bool = False,
        interpolation: bool = False,
    ) -> None:
        super().__init__()
        h = hidden or min(4 * d_model, 1024)
        self.interpolation = interpolation
        mlp = _mlp([d_model, h, h // 2, code_dim], dropout)
        self.net = nn.Sequential(nn.LayerNorm(d_model), mlp)
        _init_last(mlp, orthonormal)
        self.post = None if interpolation else CodePostprocess(d_model)
        # Frozen feature standardisation (identity until fitted). Pooled hidden states share a large
        # common direction (cosine ~.99 between tasks on the demo base) that LayerNorm keeps, so
        # without centring the controller needs several times more steps to separate contexts.
        self.register_buffer("feature_mean", torch.zeros(d_model))
        self.register_buffer("feature_std", torch.ones(d_model))

    @torch.no_grad()
    def fit_features(self, features: Tensor) -> None:
        """Freeze standardisation statistics from a warm-up set of features (never per batch)."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(1e-5))

    def forward(self, features: Tensor) -> ControllerOutput:
        features = (features - self.feature_mean) / self.feature_std
        code = self.net(features)
        if self.interpolation:
            code = code.softmax(dim=-1)
            return ControllerOutput(code, CodeStats.of(code, None))
        assert self.post is not None
        code, gate = self.post(code, features)
        return ControllerOutput(code, CodeStats.of(code, gate), gate)


class AttentionPool(nn.Module):
    """Learned-query attention pooling: one query attends over the prefix tokens."""

    def __init__(self, d_model: int, n_heads: int = 8) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, d_model) / math.sqrt(d_model))
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)

    def forward(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        query = self.query.expand(hidden.shape[0], -1, -1)
        pad = None if mask is None else mask == 0
        pooled, _ = self.attn(query, hidden, hidden, key_padding_mask=pad, need_weights=False)
        return pooled[:, 0]


@dataclass
class ChunkState:
    """The per-sequence controller state carried from chunk to chunk, inside the autograd graph."""

    ema: Tensor  # c̃_k before post-processing, [B, R]
    prefix_summary: Tensor  # mean h_prefix, [B, d]
    code: Tensor  # post-processed code for the next chunk, [B, R]
    stats: list[CodeStats] = field(default_factory=list)


class HierarchicalController(nn.Module):
    """Prefix code, then chunk codes smoothed by a per-sequence EMA kept in the graph.

    c̃_0 = c_pre;  c̃_k = β·c̃_{k−1} + (1−β)·c_k, with c_k computed from chunk k−1's adapted hidden
    states. No buffers, no detach, no batch averaging: state lives in `ChunkState`, one per call.
    """

    cache_safe = True

    def __init__(
        self,
        d_model: int,
        code_dim: int,
        beta: float = 0.5,
        prefix_len: int = 128,
        n_heads: int = 8,
        side_dim: int = 0,
        orthonormal: bool = False,
    ) -> None:
        super().__init__()
        self.beta, self.prefix_len = beta, prefix_len
        d = d_model
        self.pool = AttentionPool(d, n_heads)
        self.prefix_mlp = _mlp([d, 4 * d, 2 * d, code_dim])
        self.side = nn.Linear(side_dim, d) if side_dim else None
        self.chunk_norm = nn.LayerNorm(2 * d)
        self.chunk_mlp = _mlp([2 * d, 4 * d, 2 * d, code_dim])
        _init_last(self.prefix_mlp, orthonormal)
        _init_last(self.chunk_mlp, orthonormal)
        self.post = CodePostprocess(d)

    def start(self, prefix_hidden: Tensor, prefix_mask: Tensor | None = None) -> ChunkState:
        """Code for chunk 0 from the prompt prefix (first `prefix_len` tokens)."""
        hidden = prefix_hidden[:, : self.prefix_len]
        mask = None if prefix_mask is None else prefix_mask[:, : self.prefix_len]
        summary = masked_mean(hidden, mask)
        ema = self.prefix_mlp(self.pool(hidden, mask))
        return self._emit(ema, summary, [])

    def step(
        self,
        state: ChunkState,
        chunk_hidden: Tensor,
        chunk_mask: Tensor | None = None,
        side: Tensor | None = None,
    ) -> ChunkState:
        """Code for the next chunk from this chunk's (adapted) hidden states."""
        pooled = masked_mean(chunk_hidden, chunk_mask)
        if self.side is not None:
            if side is None:
                raise ValueError("this controller was built with a side signal; pass side=")
            pooled = pooled + self.side(side)
        c_k = self.chunk_mlp(self.chunk_norm(torch.cat([pooled, state.prefix_summary], dim=-1)))
        ema = self.beta * state.ema + (1 - self.beta) * c_k
        return self._emit(ema, state.prefix_summary, state.stats)

    def _emit(self, ema: Tensor, summary: Tensor, stats: list[CodeStats]) -> ChunkState:
        code, gate = self.post(ema, summary)
        return ChunkState(
            ema=ema, prefix_summary=summary, code=code, stats=[*stats, CodeStats.of(code, gate)]
        )


class TokenController(nn.Module):
    """Per-token codes for W_down: [h_t ; mean h_prefix] → LN → Lin → GELU → Lin.

    An ablation only: a code that changes inside a chunk breaks KV reuse, hence cache_safe = False.
    """

    cache_safe = False

    def __init__(self, d_model: int, code_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        h = hidden or 2 * d_model
        self.norm = nn.LayerNorm(2 * d_model)
        self.net = _mlp([2 * d_model, h, code_dim])
        _init_last(self.net, orthonormal=False)

    def forward(self, hidden: Tensor, prefix_summary: Tensor) -> Tensor:
        ctx = prefix_summary[:, None, :].expand_as(hidden)
        return self.net(self.norm(torch.cat([hidden, ctx], dim=-1)))
