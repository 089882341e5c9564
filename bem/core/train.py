"""Training helpers the missions share: prompt/target batches, the LM loss, and static peft LoRAs
(BEM_SPEC.md section 5: r 8, α 16 on W_O and W_down) that become BEM blocks."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from transformers import PreTrainedConfig, PreTrainedTokenizerBase

from bem.core.attach import role_sites
from bem.core.export import peft_lora_site
from bem.core.reporter import Reporter, check_cancelled

LORA_RANK, LORA_ALPHA = 8, 16.0


class TextPair(Protocol):
    """What training reads from an example: the prompt and the target (any mission's data examples)."""

    @property
    def prompt(self) -> str: ...

    @property
    def target(self) -> str: ...


@dataclass(frozen=True)
class Pair:
    """A prompt and its target: the plainest TextPair."""

    prompt: str
    target: str


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


def lm_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy over labelled positions (labels are aligned with inputs).

    `weights` [B] scale each row's tokens (importance weights of replayed rows); the mean is still over
    labelled tokens, so all-ones weights give the plain loss."""
    if weights is None:
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
        )
    tokens = _token_losses(logits, labels)
    labelled = labels[:, 1:] != IGNORE
    return (tokens * weights[:, None]).sum() / labelled.sum().clamp_min(1)


def row_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """[B]: each row's mean next-token cross-entropy over its labelled positions."""
    labelled = (labels[:, 1:] != IGNORE).sum(1).clamp_min(1)
    return _token_losses(logits, labels).sum(1) / labelled


def _token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, T−1]: the cross-entropy of each next token, 0 where unlabelled."""
    target = labels[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none"
    )


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


def lora_model(model: nn.Module, rank: int) -> PeftModel:
    """A copy of the base with a fresh static peft LoRA of `rank` (α/r = 2, W_O and W_down, dropout .1):
    what `train_lora` trains, and what a dry run builds on the meta device (`bem.core.dryrun`)."""
    config = LoraConfig(
        r=rank,
        # keeps α/r = 2 at every rank; peft annotates lora_alpha as int but only divides by it
        lora_alpha=LORA_ALPHA * rank / LORA_RANK,  # type: ignore[arg-type]
        target_modules=[n for n, _ in role_sites(model)],
        lora_dropout=0.1,
        fan_in_fan_out=cast(PreTrainedConfig, model.config).model_type == "gpt2",
    )
    return get_peft_model(copy.deepcopy(model), config)


def train_lora(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TextPair],
    *,
    rank: int,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    reporter: Reporter,
    name: str,
) -> PeftModel:
    """Train a static peft LoRA (α/r = 2, W_O and W_down, dropout .1) on a copy of the base."""
    peft_model = lora_model(model, rank)
    peft_model.train()
    data = encode(tokenizer, examples)
    device = next(model.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    lengths = data.attention_mask.sum(dim=1)
    for step, idx in enumerate(minibatches(lengths, batch_size, steps, generator)):
        batch = take_rows(data, idx).to(device)
        loss = lm_loss(
            peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            reporter.metric(f"{name}/loss", loss.item(), step)
            reporter.progress(f"train {name}", step + 1, steps)
            check_cancelled(reporter)
    return peft_model.eval()


def lora_factors(peft_model: PeftModel) -> dict[str, tuple[Tensor, Tensor]]:
    """{site: (lora_A, scaling·lora_B)}: the LoRA's ΔW = scaling·B·A, ready to become a BEM block.

    The sites are the model's LoRA layers, not the config's target list: peft rewrites a list of 20 or
    more names (any model of 10 layers or more) into a few name suffixes (`down_proj`, `o_proj`)."""
    model = cast(nn.Module, peft_model.base_model.model)
    sites = [name for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
    out = {}
    for site in sites:
        lora, lora_a, lora_b = peft_lora_site(peft_model, site)
        out[site] = (
            lora_a.weight.detach().clone(),
            lora.scaling["default"] * lora_b.weight.detach().clone(),
        )
    return out


def take_rows(data: LMBatch, idx: Tensor) -> LMBatch:
    """Rows `idx`, trimmed to their longest row so short batches do not pay for padding."""
    width = int(data.attention_mask[idx].sum(dim=1).max())
    return LMBatch(
        *(t[idx, :width] for t in (data.input_ids, data.attention_mask, data.labels, data.prompt_mask))
    )
