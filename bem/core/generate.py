"""Greedy decoding with per-row BEM codes, batched with left padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.core.attach import Attachment


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    attachment: Attachment | None = None,
    codes: Tensor | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Decode each prompt greedily, row i under code `codes[i]` (one fixed code per example).

    Rows with different codes share a batch: U and V are shared, so this is one mixed batch.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Left padding keeps every prompt's last token at the end, where decoding continues.
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[lo : lo + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
        )
        batch = batch.to(device)
        code = None if codes is None else codes[lo : lo + batch_size].to(device)
        if attachment is None:
            generated = _generate(model, tokenizer, batch, max_new_tokens)
        else:
            with attachment.codes(code):
                generated = _generate(model, tokenizer, batch, max_new_tokens)
        new = generated[:, batch["input_ids"].shape[1] :]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    model.train(was_training)
    tokenizer.padding_side = side
    return out


def _generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch: dict, max_new_tokens: int
) -> Tensor:
    return model.generate(  # type: ignore[operator]
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
