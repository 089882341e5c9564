"""Small training helpers shared by the experiments: prompt/target batches and the LM loss."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase


class TextPair(Protocol):
    """What training reads from an example: the prompt and the target (bem.tasks, bem.skills)."""

    @property
    def prompt(self) -> str: ...

    @property
    def target(self) -> str: ...


IGNORE = -100


@dataclass
class LMBatch:
    input_ids: Tensor  # [B, T], right-padded
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, T]: target tokens and EOS; IGNORE on prompt and padding
    prompt_mask: Tensor  # [B, T]: 1 on prompt tokens only (for prompt features)

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.prompt_mask))
        )


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[TextPair]) -> LMBatch:
    """prompt + target + EOS per row; the loss covers the target and EOS, never the prompt."""
    eos = tokenizer.eos_token_id
    rows = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt, target))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    prompt_mask = torch.zeros_like(ids)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p) : n] = torch.tensor(t)
        mask[i, :n] = 1
        prompt_mask[i, : len(p)] = 1
    return LMBatch(ids, mask, labels, prompt_mask)


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy over labelled positions (labels are aligned with inputs)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def minibatches(lengths: Tensor, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """`steps` random index batches of similar length, reshuffled every epoch.

    Each epoch is cut into pools of 8 batches, sorted by length inside a pool: batches stay random
    but carry little padding, which on a CPU is most of the cost of a step.
    """
    n = len(lengths)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples")
    made = 0
    while True:
        order = torch.randperm(n, generator=generator)
        pool = 8 * batch_size
        batches = []
        for lo in range(0, n - batch_size + 1, pool):
            chunk = order[lo : lo + pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            if made == steps:
                return
            yield batches[b]
            made += 1
