"""BEM's write gate for the compressive memory (BEM_SPEC.md section 10): per token, write or not.

ĝ_t = sigmoid(w · [novelty_t, surprise_t, coverage_t] + u · c + b), g_t = 1[ĝ_t > .7] with the gradient
of ĝ (straight-through), where c is the BEM controller's code for the segment. The features, per row
and token, averaged over KV heads:
- `novelty`: 1 − the cosine between the token's key feature σ(k) and the memory's summary z (the sum
  of every feature written). An empty memory is fully novel.
- `surprise`: the token's LM loss (its NLL over ln(vocab)), which the driver measures.
- `coverage`: how much of the token's value the memory already returns for its key,
  1 − ‖v − σ(k)M/σ(k)z‖ / ‖v‖, clipped to [0, 1]: the delta rule's residual, relative.

Per token, not per segment as section 10 writes it: a needle is a few tokens inside a segment of
haystack, which a segment's mean features call covered (docs/decisions.md). The gate closes for what
the memory holds (low novelty, high coverage, predictable) and opens for a surprising new token;
training learns w, u and b. g = 0 leaves the memory untouched (memory.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem.missions.mission_e.memory import CompressiveMemory, MemoryState, straight_through

THRESHOLD = 0.7


def novelty(keys: Tensor, state: MemoryState, memory: CompressiveMemory) -> Tensor:
    """[B, T] from keys [B, H, T, d_k] (before RoPE) and the state before the write."""
    features = memory.feature(keys.float())  # [B, H, T, d_k]
    empty = (state.z.abs().sum(-1) == 0)[..., None]  # [B, H, 1]
    cos = F.cosine_similarity(features, state.z[:, :, None, :], dim=-1).masked_fill(empty, 0.0)
    return (1.0 - cos).mean(dim=1)


def coverage(keys: Tensor, values: Tensor, state: MemoryState, memory: CompressiveMemory) -> Tensor:
    """[B, T]: the share of each value's norm the memory already returns for its key."""
    residual = values.float() - memory.retrieve(keys, state).float()
    ratio = residual.norm(dim=-1) / values.float().norm(dim=-1).clamp_min(1e-6)  # [B, H, T]
    return (1.0 - ratio).clamp(0.0, 1.0).mean(dim=1)


class WriteGate(nn.Module):
    """ĝ from the three features ([B, T] each) and the controller's code ([B, code_dim]); `forward`
    gives (g, ĝ), [B, T]."""

    def __init__(self, code_dim: int = 0) -> None:
        super().__init__()
        self.features = nn.Linear(3, 1)
        self.code = nn.Linear(code_dim, 1, bias=False) if code_dim else None
        with torch.no_grad():  # start open for the new and surprising, closed for what the memory holds
            self.features.weight.copy_(torch.tensor([[2.0, 1.0, -2.0]]))
            self.features.bias.fill_(1.5)  # open for a token the memory does not hold yet

    def forward(
        self, novelty: Tensor, surprise: Tensor, coverage: Tensor, code: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        logit = self.features(torch.stack([novelty, surprise, coverage], dim=-1)).squeeze(-1)
        if self.code is not None:
            if code is None:
                raise ValueError("this gate reads the controller's code: pass `code`")
            logit = logit + self.code(code)  # [B, 1]: one code per segment, over its tokens
        soft = torch.sigmoid(logit)
        return straight_through(soft, THRESHOLD), soft
