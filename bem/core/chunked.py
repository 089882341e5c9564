"""Causal chunk-by-chunk forward with generated codes, through the model's own KV cache.

Chunk k runs with code c̃_k, computed from chunk k−1's adapted hidden states; the K/V of earlier
chunks are never recomputed. Prefill and decoding therefore see the same lag, which is what makes
the codes cache-safe (BEM_SPEC §3). One pass over the tokens: no second full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from bem.core.attach import Attachment
from bem.core.controllers import CodeStats, HierarchicalController
from bem.core.routing import expand_to_tokens, num_chunks


@torch.no_grad()
def read_hidden(
    model: nn.Module, attachment: Attachment, input_ids: Tensor, attention_mask: Tensor | None, layer: int
) -> Tensor:
    """Hidden states after decoder layer `layer` (0 = embeddings) from one adapter-off pass."""
    with attachment.codes(None):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[layer]


@dataclass
class ChunkedOutput:
    logits: Tensor  # [B, T, V]
    chunk_codes: Tensor  # [B, K, R]: the code each chunk ran with
    stats: list[CodeStats]

    def token_codes(self, chunk_size: int) -> Tensor:
        return expand_to_tokens(self.chunk_codes, self.logits.shape[1], chunk_size)


def chunked_forward(
    model: nn.Module,
    attachment: Attachment,
    controller: HierarchicalController,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    chunk_size: int,
    read_layer: int,
    side: Tensor | None = None,
) -> ChunkedOutput:
    """Run `input_ids` chunk by chunk; gradients flow into the controller through every chunk's code.

    `side` ([B, K, side_dim]) is an optional per-chunk side signal (e.g. retrieval features).
    Right padding only: positions come from the cache, so left padding would shift them.
    """
    prefix_ids = input_ids[:, : controller.prefix_len]
    prefix_mask = None if attention_mask is None else attention_mask[:, : controller.prefix_len]
    state = controller.start(read_hidden(model, attachment, prefix_ids, prefix_mask, read_layer), prefix_mask)

    cache = DynamicCache(config=getattr(model, "config", None))
    logits, codes = [], []
    length = input_ids.shape[1]
    for k in range(num_chunks(length, chunk_size)):
        lo, hi = k * chunk_size, min((k + 1) * chunk_size, length)
        codes.append(state.code)
        with attachment.codes(state.code):
            out = model(
                input_ids=input_ids[:, lo:hi],
                attention_mask=None if attention_mask is None else attention_mask[:, :hi],
                past_key_values=cache,
                use_cache=True,
                output_hidden_states=True,
            )
        logits.append(out.logits)
        if hi < length:
            chunk_mask = None if attention_mask is None else attention_mask[:, lo:hi]
            chunk_side = None if side is None else side[:, k]
            state = controller.step(state, out.hidden_states[read_layer], chunk_mask, chunk_side)
    return ChunkedOutput(torch.cat(logits, dim=1), torch.stack(codes, dim=1), state.stats)
