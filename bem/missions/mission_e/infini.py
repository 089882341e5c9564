"""Infini-attention inside a Llama (Munkhdalai et al. 2024): each attention layer mixes its local
attention over the current segment (and whatever KV its cache keeps) with a read of its compressive
memory, then writes the segment into the memory (`memory.CompressiveMemory`).

`attach_memory(model)` wraps every decoder layer's `self_attn` in place; the wrapped module keeps the
original projections (so BEM sites on W_O still apply) and adds one β per query head. A driver calls
`reset(batch)` before a sequence and feeds it segment by segment; each forward pass reads the memory
as the previous segments left it, then writes its own keys and values. Memory reads and writes use the
keys and queries before RoPE: the memory has no positions, which is why it reaches past the lengths
the model was trained on. `gate` (per token, [B, T]) weighs the next write; BEM sets it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, repeat_kv

from bem.missions.mission_e.memory import CompressiveMemory, MemoryState


class InfiniAttention(nn.Module):
    def __init__(self, attn: nn.Module, delta: bool = True) -> None:
        super().__init__()
        self.attn = attn
        config = cast(Any, attn).config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(cast(Any, attn).head_dim)
        self.memory = CompressiveMemory(self.heads, delta=delta)
        self.state: MemoryState | None = None
        self.gate: Tensor | None = None  # [B, T] weights of the next write; None: write every token
        self.writing = True

    def reset(self, batch: int, device: torch.device | str | None = None) -> None:
        self.state = MemoryState.zeros(batch, self.kv_heads, self.head_dim, self.head_dim, device=device)

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
        if self.state is None:
            self.reset(b, hidden_states.device)
        assert self.state is not None
        groups = self.heads // self.kv_heads  # a KV head's memory serves its group of query heads
        read = MemoryState(
            repeat_kv(self.state.M, groups), repeat_kv(self.state.z[..., None], groups)[..., 0]
        )
        from_memory = self.memory.retrieve(q, read)  # [B, H, T, d]
        mixed = self.memory.mix(from_memory, local.transpose(1, 2)).transpose(1, 2)  # [B, T, H, d]
        if self.writing:  # after the read: a segment reads what the segments before it left
            self.state = self.memory.write(k, v, self.state, self.gate)
        out = attn.o_proj(mixed.reshape(b, t, -1).contiguous())
        return out, weights


def attach_memory(model: nn.Module, delta: bool = True) -> list[InfiniAttention]:
    """Wrap every decoder layer's attention (Llama's layout); returns the wrappers, in layer order."""
    layers = cast(nn.ModuleList, model.get_submodule("model.layers"))
    wrapped = []
    for layer in layers:
        infini = InfiniAttention(cast(Any, layer).self_attn, delta=delta)
        cast(Any, layer).self_attn = infini
        wrapped.append(infini)
    return wrapped
