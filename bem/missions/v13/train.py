"""Training and greedy decoding for every arm of the suite, text or MM, through one interface:
`prepare(input_ids, attention_mask, prompt_mask)` fixes each example's state from its prompt (and
image), then `model(input_ids, attention_mask)` gives logits under it.

Training is the target's cross-entropy only (the base frozen), AdamW over what the arm adds (and MM's
encoder), a fixed number of steps from the seed. Decoding recomputes the whole sequence each step
(no KV cache): outputs here are a few dozen tokens, and one code path then serves every arm, the
prefix model and V2's per-query statistics alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.core.reporter import Reporter, check_cancelled
from bem.core.train import LMBatch, Pair, encode, lm_loss


class Arm(Protocol):
    image: Tensor | None

    def prepare(self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor) -> Any: ...
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...
    def clear(self) -> None: ...
    def adapter_parameters(self) -> list[nn.Parameter]: ...
    def train(self, mode: bool = True) -> Any: ...


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    log_every: int = 25


def batch_of(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], device: torch.device | str
) -> LMBatch:
    return encode(tokenizer, pairs).to(device)


def step_loss(model: Arm, batch: LMBatch, image: Tensor | None = None) -> Tensor:
    model.image = image
    model.prepare(batch.input_ids, batch.attention_mask, batch.prompt_mask)
    return lm_loss(model(batch.input_ids, batch.attention_mask), batch.labels)


def train(
    model: Arm,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    cfg: TrainConfig,
    seed: int,
    reporter: Reporter,
    name: str,
    device: torch.device | str = "cpu",
    images: Sequence[np.ndarray] | None = None,
    extra: Sequence[nn.Parameter] = (),
) -> dict[str, float]:
    """`cfg.steps` AdamW steps on random batches of `pairs` (with their images for MM)."""
    params = [*model.adapter_parameters(), *extra]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(pairs), (cfg.batch_size,), generator=gen).tolist()
        batch = batch_of(tokenizer, [pairs[i] for i in idx], device)
        image = None if images is None else torch.from_numpy(np.stack([images[i] for i in idx])).to(device)
        loss = step_loss(model, batch, image)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            reporter.metric(f"{name}/loss", float(np.mean(losses[-cfg.log_every :])), step)
            check_cancelled(reporter)
    model.clear()
    model.train(False)
    return {"steps": cfg.steps, "final_loss": float(np.mean(losses[-cfg.log_every :])),
            "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


@torch.no_grad()
def decode(
    model: Arm,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    images: Sequence[np.ndarray] | None = None,
    batch_size: int = 64,
    stop: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy continuations; each example's state fixed from its prompt, as in training."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[lo : lo + batch_size]]
        prompt = _padded(rows, pad, device)
        model.image = (
            None if images is None else torch.from_numpy(np.stack(images[lo : lo + batch_size])).to(device)
        )
        model.prepare(prompt[0], prompt[1], prompt[1])
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            ids, mask = _padded([r + n for r, n in zip(rows, new, strict=True)], pad, device)
            logits = model(ids, mask)
            last = mask.sum(1) - 1
            nxt = logits[torch.arange(len(rows)), last].argmax(-1).tolist()
            for i, t in enumerate(nxt):
                if done[i]:
                    continue
                if t == eos:
                    done[i] = True
                else:
                    new[i].append(t)
                    if stop is not None and stop(str(tokenizer.decode(new[i]))):
                        done[i] = True
            if all(done):
                break
        model.clear()
        out.extend(str(tokenizer.decode(n, skip_special_tokens=True)) for n in new)
    return out


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)
