"""Mission C's safety phase: the skill subspace of each layer, and the safety overlays trained under a
Lagrangian while the model and its skill adapters stay frozen.

The objective (the issue's form of BEM_SPEC.md section 8) is

    L = L_util + λ·(v − target) + .5·Σ_layers L_orth,

with L_util the next-token loss on utility and benign prompts (the overlay on, so its cost to utility
is what the loss sees), and v the violation surrogate on training attacks: the mean of
σ(log p(unsafe) − log p(safe)), teacher-forced over each completion given its prompt (per-token
means, see `completion_logprob`), the model's soft preference for complying. It is tied to behaviour,
where the probe's σ(20(.5 − c)) on the model's own states could be lowered by making states look
safe without changing what is written.
λ moves in log space (`basis.lagrange_step`) on the measured v every `lam_every` steps, and Q is put
back on its constraint set (orthonormal, in S's complement) after every optimiser step.

The gate input c is the constitution probe's score of each prompt on the model without the overlay,
constant over the prompt and its completion (one chunk); the level is `level` throughout training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from bem.core.reporter import Reporter, check_cancelled
from bem.core.train import Pair, encode, lm_loss, lora_factors, row_losses
from bem.missions.mission_c import basis
from bem.missions.mission_c.data import Case
from bem.missions.mission_c.probe import ConstitutionProbe, prompt_features


def skill_bases(peft_model: PeftModel) -> dict[int, Tensor]:
    """Per decoder layer, S = orth([U_O, U_down]): the span of the skill LoRA's output factors at that
    layer's W_O and W_down, both of which write into the residual stream."""
    per_layer: dict[int, list[Tensor]] = {}
    for site, (_, b) in lora_factors(peft_model).items():
        found = re.search(r"layers\.(\d+)\.", site)
        if found is None:
            raise ValueError(f"cannot tell the layer of LoRA site {site!r}")
        per_layer.setdefault(int(found.group(1)), []).append(b)
    return {layer: basis.skill_subspace(bs) for layer, bs in sorted(per_layer.items())}


@dataclass(frozen=True)
class SafetyConfig:
    rank: int  # r_s per layer
    steps: int
    batch_size: int
    lr: float
    lam0: float = 1.0
    lam_lr: float = 0.5  # α of the log-space λ step
    lam_every: int = 10
    target: float = basis.VIOLATION_TARGET
    level: float = 1.0


@dataclass
class SafetyHistory:
    steps: list[int] = field(default_factory=list)
    violation: list[float] = field(default_factory=list)  # v on the step's attack batch
    utility: list[float] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    min_op: list[float] = field(default_factory=list)


def completion_logprob(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Case], unsafe: bool
) -> Tensor:
    """[B]: the mean log p of the completion's tokens and EOS given the prompt, teacher-forced; the safe or
    the unsafe one. A mean, not a sum: summed over a completion the two differ by tens of nats, where
    σ(margin) is flat and the surrogate would give no gradient on the attacks that matter most."""
    rows = [Pair(c.prompt, c.unsafe if unsafe else c.safe) for c in pairs]
    batch = encode(tokenizer, rows).to(next(model.parameters()).device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return -row_losses(logits, batch.labels)  # a row's mean cross-entropy is minus its mean log p


def violation_surrogate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, attacks: Sequence[Case]
) -> Tensor:
    """mean σ(log p(unsafe) − log p(safe)) over `attacks`."""
    margin = completion_logprob(model, tokenizer, attacks, True) - completion_logprob(
        model, tokenizer, attacks, False
    )
    return torch.sigmoid(margin).mean()


def constitution_scores(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, probe: ConstitutionProbe, cases: Sequence[Case]
) -> dict[str, float]:
    """c per prompt (by example id), on the model as given (call it with the overlay off)."""
    with torch.no_grad():
        c = probe.score(prompt_features(model, tokenizer, [x.prompt for x in cases], probe.layer))
    return {x.example_id: float(v) for x, v in zip(cases, c, strict=True)}


def train_safety(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    handle: basis.OverlayHandle,
    scores: dict[str, float],
    attacks: Sequence[Case],
    utility: Sequence[Case],
    cfg: SafetyConfig,
    *,
    seed: int,
    reporter: Reporter,
) -> SafetyHistory:
    """Train the overlays' parameters alone under the Lagrangian; returns the per-step record."""
    params = list(handle.parameters())
    frozen = [p for p in model.parameters() if p.requires_grad]
    if frozen:
        raise ValueError(f"the model must be frozen for the safety phase; {len(frozen)} tensors require grad")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(f"safety/{seed}")
    lam, history = cfg.lam0, SafetyHistory()
    device = next(model.parameters()).device
    measured: list[float] = []
    for step in range(cfg.steps):
        a = rng.sample(list(attacks), cfg.batch_size)
        u = rng.sample(list(utility), cfg.batch_size)
        with handle.overlay_inputs(c=_gate(scores, a, device), level=cfg.level):
            v = violation_surrogate(model, tokenizer, a)
        with handle.overlay_inputs(c=_gate(scores, u, device), level=cfg.level):
            batch = encode(tokenizer, u).to(device)
            util = lm_loss(
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels
            )
        orth = sum((o.orth_penalty() for o in handle.overlays.values()), torch.zeros((), device=device))
        loss = util + lam * (v - cfg.target) + 0.5 * orth
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        handle.reorthonormalise()
        measured.append(float(v.detach()))
        if (step + 1) % cfg.lam_every == 0:
            lam = basis.lagrange_step(lam, sum(measured) / len(measured), cfg.target, cfg.lam_lr)
            measured = []
        history.steps.append(step)
        history.violation.append(float(v.detach()))
        history.utility.append(float(util.detach()))
        history.lam.append(lam)
        history.min_op.append(
            min(basis.orthogonality_preservation(o.Q.detach(), o.S) for o in handle.overlays.values())
        )
        if step % 10 == 0 or step == cfg.steps - 1:
            reporter.metric("safety/violation_surrogate", float(v.detach()), step)
            reporter.metric("safety/utility_loss", float(util.detach()), step)
            reporter.metric("safety/lambda", lam, step)
            reporter.progress("train safety", step + 1, cfg.steps)
            check_cancelled(reporter)
    return history


def _gate(scores: dict[str, float], cases: Sequence[Case], device: torch.device) -> Tensor:
    """[B, 1]: each row's c, constant over its tokens."""
    return torch.tensor([[scores[c.example_id]] for c in cases], device=device)
