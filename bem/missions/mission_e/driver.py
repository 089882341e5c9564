"""Feeding a long prompt through a cache at chunk granularity, then decoding greedily (Mission E's arms).

After each chunk's forward pass (eager attention, so the weights exist) the evicting cache observes the
attention and evicts to its budget; decoding goes on one token at a time under the same rule. With a
budget at least the length this is plain greedy decoding with full KV (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from bem.missions.mission_e import kv


def eager(model: nn.Module) -> None:
    """Eager attention: the policies read attention weights, which SDPA does not return."""
    model.config._attn_implementation = "eager"  # type: ignore[union-attr]


def evicting_cache(model: nn.Module, policy: kv.Policy, budget: int, window: int = 16) -> kv.EvictingCache:
    config: Any = model.config
    rotary: Any = model.get_submodule("model.rotary_emb")
    return kv.EvictingCache(int(config.num_hidden_layers), rotary.inv_freq, policy, budget, window)


@torch.no_grad()
def answer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    cache: kv.EvictingCache,
    *,
    chunk: int = 64,
    max_new_tokens: int = 16,
) -> str:
    """The greedy continuation of `prompt` (one row) with `cache` evicting after every chunk and token."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)

    def step(piece: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=piece, cache=cache, use_cache=True, output_attentions=True)
        cache.observe(out.attentions)
        cache.evict()
        return out.logits[:, -1]

    logits = torch.empty(0)
    for lo in range(0, ids.shape[1], chunk):
        logits = step(ids[:, lo : lo + chunk])
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        logits = step(torch.tensor([[token]], device=device))
    return str(tokenizer.decode(new, skip_special_tokens=True))
