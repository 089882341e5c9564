"""Infini-attention's compressive memory, per head (Munkhdalai et al. 2024; missions_cde.md E.1), with a
per-token write gate for BEM (BEM_SPEC.md section 10).

State per head: M ∈ ℝ^{d_k×d_v} and z ∈ ℝ^{d_k}, both starting at zero. With σ = ELU + 1:
- retrieve: A_mem = σ(Q)M / σ(Q)z;
- linear write: M ← M + σ(K)ᵀ V, z ← z + Σ_t σ(K_t);
- delta write: M ← M + σ(K)ᵀ (V − σ(K)M / σ(K)z), the value minus what the memory already returns for
  the key, so writing an association the memory holds changes nothing;
- mix: A = sigmoid(β)·A_mem + (1 − sigmoid(β))·A_dot, a learned β per head.

The gate g ∈ [0, 1] per token scales its row of σ(K) in both updates: g = 0 leaves M and z exactly as
they were (tested bit for bit). `straight_through` makes a hard 0/1 gate whose gradient is the soft
gate's, as BEM's write gate trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-6


def elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


@dataclass(frozen=True)
class MemoryState:
    M: Tensor  # [B, H, d_k, d_v]
    z: Tensor  # [B, H, d_k]

    @classmethod
    def zeros(
        cls, batch: int, heads: int, d_k: int, d_v: int, device: torch.device | str | None = None
    ) -> MemoryState:
        return cls(
            torch.zeros(batch, heads, d_k, d_v, device=device), torch.zeros(batch, heads, d_k, device=device)
        )

    def bytes(self) -> int:
        return self.M.numel() * self.M.element_size() + self.z.numel() * self.z.element_size()


def straight_through(soft: Tensor, threshold: float = 0.5) -> Tensor:
    """1 where `soft` > threshold, else 0, in the forward pass; the gradient of `soft` backward."""
    hard = (soft > threshold).to(soft.dtype)
    return hard + (soft - soft.detach())  # the bracket is exactly 0: forward values are exactly 0 or 1


class CompressiveMemory(nn.Module):
    """The memory's read, write and mix for `heads` heads; `delta` picks the update rule."""

    def __init__(self, heads: int, delta: bool = True, feature: Callable[[Tensor], Tensor] = elu_plus_one):
        super().__init__()
        self.delta, self.feature = delta, feature
        self.beta = nn.Parameter(torch.zeros(heads))  # sigmoid(0) = ½: memory and local attention alike

    def retrieve(self, q: Tensor, state: MemoryState) -> Tensor:
        """[B, H, T, d_v] from queries [B, H, T, d_k]; zero where the memory is empty. The memory is
        float32 whatever the model's dtype (a bf16 sum of thousands of writes would lose them), and
        the read comes back in the queries' dtype."""
        s = self.feature(q.float())
        num = s @ state.M
        den = (s @ state.z.unsqueeze(-1)).clamp_min(EPS)
        return (num / den).to(q.dtype)

    def write(self, k: Tensor, v: Tensor, state: MemoryState, gate: Tensor | None = None) -> MemoryState:
        """The state after writing keys [B, H, T, d_k] and values [B, H, T, d_v]; `gate` weighs each
        write: [B] per row (a segment's gate), [B, T] per token or [B, H, T] (None: every token fully)."""
        k, v = k.float(), v.float()
        s = self.feature(k)
        if gate is not None:
            g = gate.float()
            g = g[:, None, None] if g.dim() == 1 else g[:, None, :] if g.dim() == 2 else g
            s = s * g.expand(s.shape[:3]).unsqueeze(-1)
        target = v
        if self.delta:
            # What the memory returns for each key now; a token whose gate is 0 adds 0·(v − that).
            target = v - self.retrieve(k, state)
        return MemoryState(state.M + s.transpose(-1, -2) @ target, state.z + s.sum(-2))

    def mix(self, a_mem: Tensor, a_dot: Tensor) -> Tensor:
        b = torch.sigmoid(self.beta)[None, :, None, None]
        return b * a_mem + (1.0 - b) * a_dot
