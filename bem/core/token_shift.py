"""A Llama with a token shift: each position's input is its token's embedding plus a learned embedding
of the token before it (Zoology's short convolution at width 2; Olsson et al.'s "smeared keys").

Why: in-context lookup (`bo 3, cy 14 ... bo` -> `3`) needs an induction head, and a plain 2-layer
Llama must first grow a previous-token head for the induction head to compose with, a phase change
that on this repository's 2-core box did not come within a smoke base's budget; with the shift the
same model learns clean recall in a few hundred steps (`python bench/token_shift.py` runs both in one
process). The smoke base must learn its missions' formats in minutes, so it gets the shift;
everything else is Llama, so BEM sites, LoRA targets, chunked decoding and `transformers`' generation
work unchanged.

The previous token of a call's first position is the last token of the call before it on the same
KV cache (kept on the cache object), or none at the start of a sequence, so chunked and incremental
decoding give the logits of one full forward pass (tested). Right padding only, as `bem.core.chunked`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

MODEL_TYPE = "token_shift_llama"
_LAST = "token_shift_last"  # the cache attribute holding each row's last token id


class TokenShiftLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE


class TokenShiftLlamaModel(LlamaModel):
    config_class = TokenShiftLlamaConfig

    def __init__(self, config: TokenShiftLlamaConfig) -> None:
        if config.pad_token_id is None:
            raise ValueError("a token-shift Llama needs pad_token_id: it stands for 'no previous token'")
        super().__init__(config)
        # padding_idx: "no previous token" (a sequence's first position) adds the zero vector.
        self.prev_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        if input_ids is not None:
            if use_cache is None:
                use_cache = self.config.use_cache
            if use_cache and cache is None:
                cache = DynamicCache(config=self.config)
            inputs_embeds = self.embed_tokens(input_ids) + self.prev_tokens(self._previous(input_ids, cache))
            if cache is not None:
                setattr(cache, _LAST, input_ids[:, -1].detach())
        return super().forward(cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)

    def _previous(self, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        carried = getattr(cache, _LAST, None) if cache is not None and cache.get_seq_length() > 0 else None
        pad = int(self.config.pad_token_id)  # type: ignore[arg-type]  # checked in __init__
        first = carried if carried is not None else torch.full_like(input_ids[:, 0], pad)
        return torch.cat([first[:, None], input_ids[:, :-1]], dim=1)


class TokenShiftLlamaForCausalLM(LlamaForCausalLM):
    config_class = TokenShiftLlamaConfig

    def __init__(self, config: TokenShiftLlamaConfig) -> None:
        super().__init__(config)
        self.model = TokenShiftLlamaModel(config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, TokenShiftLlamaConfig)
AutoModelForCausalLM.register(TokenShiftLlamaConfig, TokenShiftLlamaForCausalLM)
