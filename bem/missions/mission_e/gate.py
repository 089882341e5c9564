"""BEM's write gate for the compressive memory (BEM_SPEC.md section 10): per segment, write or not.

ĝ = sigmoid(w · [novelty, surprise, coverage] + u · c + b), g = 1[ĝ > .7] with the gradient of ĝ
(straight-through), where c is the BEM controller's code for the segment. The features, per row:
- `novelty`: 1 − the cosine between the segment's mean key feature σ(k) and the memory's summary z
  (the sum of every feature written), averaged over heads. An empty memory is fully novel.
- `surprise`: the segment's LM loss (mean next-token NLL), which the driver measures.
- `coverage`: how much of the segment's values the memory already returns for its keys,
  1 − ‖v − σ(k)M/σ(k)z‖ / ‖v‖, clipped to [0, 1]: the delta rule's residual, relative.

The gate closes (g = 0) for a segment the memory holds (low novelty, high coverage) and opens for a
surprising new one; training learns w, u and b. g = 0 leaves the memory untouched (memory.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem.missions.mission_e.memory import CompressiveMemory, MemoryState, straight_through

THRESHOLD = 0.7


def novelty(keys: Tensor, state: MemoryState, memory: CompressiveMemory) -> Tensor:
    """[B] from keys [B, H, T, d_k] (before RoPE) and the state before the write."""
    mean = memory.feature(keys).mean(dim=2)  # [B, H, d_k]
    empty = state.z.abs().sum(-1) == 0
    cos = F.cosine_similarity(mean, state.z, dim=-1).masked_fill(empty, 0.0)
    return (1.0 - cos).mean(dim=1)


def coverage(keys: Tensor, values: Tensor, state: MemoryState, memory: CompressiveMemory) -> Tensor:
    """[B]: the share of the values' norm the memory already returns for their keys."""
    residual = values - memory.retrieve(keys, state)
    ratio = residual.flatten(1).norm(dim=-1) / values.flatten(1).norm(dim=-1).clamp_min(1e-6)
    return (1.0 - ratio).clamp(0.0, 1.0)


class WriteGate(nn.Module):
    """ĝ from the three features and the controller's code; `forward` gives (g, ĝ)."""

    def __init__(self, code_dim: int = 0) -> None:
        super().__init__()
        self.features = nn.Linear(3, 1)
        self.code = nn.Linear(code_dim, 1, bias=False) if code_dim else None
        with torch.no_grad():  # start open for the new and surprising, closed for what the memory holds
            self.features.weight.copy_(torch.tensor([[2.0, 1.0, -2.0]]))
            self.features.bias.fill_(1.5)  # open for a segment the memory does not hold yet

    def forward(
        self, novelty: Tensor, surprise: Tensor, coverage: Tensor, code: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        logit = self.features(torch.stack([novelty, surprise, coverage], dim=-1)).squeeze(-1)
        if self.code is not None:
            if code is None:
                raise ValueError("this gate reads the controller's code: pass `code`")
            logit = logit + self.code(code).squeeze(-1)
        soft = torch.sigmoid(logit)
        return straight_through(soft, THRESHOLD), soft
