"""Equal state bytes (missions_cde.md E.3): every arm holds the same B = kept KV + memory (M, z) + policy
and controller state, fixed in bytes, so it stays the same as the context grows.

Counted analytically from the model's shapes here, and checked against the tensors a run holds (the
cache's and the memory's `bytes`); a GPU run also logs `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCORE_BYTES = 4  # float32: each policy score kept per token and KV head (H2O's sum, SnapKV's votes)
MEMORY_BYTES = 4  # float32: the memory's M and z, whatever the model's dtype (memory.py)


@dataclass(frozen=True)
class Shapes:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 4

    @classmethod
    def of(cls, config: Any, dtype_bytes: int = 4) -> Shapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(int(config.num_hidden_layers), int(config.num_key_value_heads), int(head_dim), dtype_bytes)

    def kv_per_token(self, scores: int = 2) -> int:
        """One kept token's bytes over all layers: its key and value per KV head, and `scores` float32
        scores per KV head that an evicting cache keeps beside them."""
        return self.layers * self.kv_heads * (2 * self.head_dim * self.dtype_bytes + scores * SCORE_BYTES)

    def memory(self) -> int:
        """One sequence's compressive memory: M (d_k × d_v) and z (d_k) per KV head and layer, float32."""
        return self.layers * self.kv_heads * (self.head_dim * self.head_dim + self.head_dim) * MEMORY_BYTES


def budget_bytes(shapes: Shapes, tokens: int) -> int:
    """B of `tokens` tokens' worth of plain KV (keys and values, no scores): the smoke's unit."""
    return tokens * shapes.layers * shapes.kv_heads * 2 * shapes.head_dim * shapes.dtype_bytes


def kept_tokens(shapes: Shapes, budget: int, memory: bool, scores: int = 2, other: int = 0) -> int:
    """How many tokens an arm keeps within `budget` bytes, after its memory (if it has one) and `other`
    state (a controller's), with `scores` scores per kept token and head."""
    left = budget - (shapes.memory() if memory else 0) - other
    if left < 0:
        raise ValueError(
            f"a budget of {budget} B does not hold the memory ({shapes.memory()} B) and {other} B"
        )
    return left // shapes.kv_per_token(scores)
