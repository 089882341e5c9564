"""Infini-attention inside a Llama (Munkhdalai et al. 2024): each attention layer mixes its local
attention over the current segment (and whatever KV its cache keeps) with a read of its compressive
memory (`memory.CompressiveMemory`).

`attach_memory(model)` wraps every decoder layer's `self_attn` in place; the wrapped module keeps the
original projections (so BEM sites on W_O still apply) and adds one β per query head and a low-rank
correction of the memory's queries and keys (`MemoryAdapter`, zero at the start: the frozen model's
own queries and keys). A driver calls `reset(batch)` before a sequence and feeds it segment by
segment. Each forward pass reads the memory as the previous segments left it and keeps its own keys
and values as `pending`; `commit(gate)` then writes them, so the write can wait for what is only known
after the pass (BEM's gate reads the segment's LM loss). Memory reads and writes use queries and keys
before RoPE: the memory has no positions, which is why it reaches past the lengths the model was
trained on.

The wrapper is not a `LlamaAttention`, so transformers' `output_attentions` does not record it: the
local attention weights of the last pass are `weights`, for the eviction policies.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, repeat_kv

from bem.missions.mission_e.memory import CompressiveMemory, MemoryState


class MemoryAdapter(nn.Module):
    """x ↦ B·A·x, rank r, B zero at the start: a learnt correction of the memory's queries or keys."""

    def __init__(self, hidden: int, out: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.up(self.down(x)))


class InfiniAttention(nn.Module):
    def __init__(self, attn: nn.Module, delta: bool = True, rank: int = 8) -> None:
        super().__init__()
        self.attn = attn
        config = cast(Any, attn).config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(cast(Any, attn).head_dim)
        hidden = int(config.hidden_size)
        self.memory = CompressiveMemory(self.heads, delta=delta)
        weight = cast(Any, attn).q_proj.weight  # the adapters take the model's hidden states as they are
        self.query = MemoryAdapter(hidden, self.heads * self.head_dim, rank).to(weight.device, weight.dtype)
        self.key = MemoryAdapter(hidden, self.kv_heads * self.head_dim, rank).to(weight.device, weight.dtype)
        self.state: MemoryState | None = None
        self.pending: tuple[Tensor, Tensor] | None = None  # the last pass's keys and values, unwritten
        self.committed: tuple[Tensor, Tensor] | None = None  # the last keys and values committed
        self.weights: Tensor | None = None  # the last pass's local attention [B, H, q, T]

    def reset(self, batch: int, device: torch.device | str | None = None) -> None:
        self.state = MemoryState.zeros(batch, self.kv_heads, self.head_dim, self.head_dim, device=device)
        self.pending = self.committed = None

    def commit(self, gate: Tensor | None = None) -> None:
        """Write the last pass's keys and values; `gate` ([B] a segment's, [B, T] per token; None: all)
        weighs the write, and 0 leaves the memory as it was."""
        if self.pending is None or self.state is None:
            raise RuntimeError("nothing to commit: run a forward pass after reset() first")
        k, v = self.pending
        self.state = self.memory.write(k, v, self.state, gate)
        self.committed, self.pending = self.pending, None

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        attn = cast(Any, self.attn)
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        assert position_embeddings is not None
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = (k_rot, v) if cache is None else cache.update(k_rot, v, attn.layer_idx, kwargs=kwargs)
        local, weights = eager_attention_forward(
            attn, q_rot, keys, values, attention_mask, scaling=attn.scaling
        )
        self.weights = weights
        if self.state is None:
            self.reset(b, hidden_states.device)
        assert self.state is not None
        q_mem = q + self.query(hidden_states).view(shape).transpose(1, 2)
        k_mem = k + self.key(hidden_states).view(shape).transpose(1, 2)
        groups = self.heads // self.kv_heads  # a KV head's memory serves its group of query heads
        read = MemoryState(
            repeat_kv(self.state.M, groups), repeat_kv(self.state.z[..., None], groups)[..., 0]
        )
        from_memory = self.memory.retrieve(q_mem, read)  # [B, H, T, d]
        local = local.transpose(1, 2)  # [B, H, T, d]
        # A head whose memory holds nothing yet reads only its local attention (rather than half of it
        # mixed with zeros): the first segment, or every segment a closed gate kept out.
        empty = (read.z.abs().sum(-1) == 0)[:, :, None, None]
        mixed = torch.where(empty, local, self.memory.mix(from_memory, local).to(local.dtype))
        mixed = mixed.transpose(1, 2)  # [B, T, H, d]
        self.pending = (k_mem, v)  # written by commit(), after the read: a segment reads its past only
        out = attn.o_proj(mixed.reshape(b, t, -1).contiguous())
        return out, weights


def attach_memory(model: nn.Module, delta: bool = True, rank: int = 8) -> list[InfiniAttention]:
    """Wrap every decoder layer's attention (Llama's layout); returns the wrappers, in layer order."""
    layers = cast(nn.ModuleList, model.get_submodule("model.layers"))
    wrapped = []
    for layer in layers:
        infini = InfiniAttention(cast(Any, layer).self_attn, delta=delta, rank=rank)
        cast(Any, layer).self_attn = infini
        wrapped.append(infini)
    return wrapped
