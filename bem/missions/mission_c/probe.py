"""The constitution score c (BEM_SPEC.md section 8): a logistic probe on a base-model layer.

c = σ(wᵀ·mean h + b) is the probability that a prompt is safe, with h the hidden states after decoder
layer `layer`, averaged over the prompt's tokens. scikit-learn fits it (L2-regularised logistic
regression on labelled prompts: attacks unsafe, utility and benign look-alikes safe); the same weights
then score in torch, so the Lagrangian's surrogate v = mean σ(20(.5 − c)) has a gradient through the
overlaid model's own hidden states. The held-out evaluator is not this probe: violations are counted by
`data.violates` on the decoded outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def layer_states(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layer: int,
    pool: Callable[[Tensor, Tensor], Tensor],
    batch: int = 32,
) -> Tensor:
    """[N, d]: `pool(hidden, mask)` of each prompt's hidden states after decoder layer `layer` (0 =
    embeddings), right-padded batches. transformers records `hidden_states` before forward hooks edit a
    layer's output, so these are the states without any overlay or steering hook, whatever is attached."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(
            list(prompts[i : i + batch]), return_tensors="pt", padding=True, add_special_tokens=False
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        out.append(pool(hidden, mask))
    return torch.cat(out).float()


def prompt_features(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], layer: int, batch: int = 32
) -> Tensor:
    """[N, d]: each prompt's hidden states after decoder layer `layer`, averaged over its tokens (padding
    excluded)."""
    return layer_states(model, tokenizer, prompts, layer, mean_over_tokens, batch)


def mean_over_tokens(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@dataclass
class ConstitutionProbe:
    """The fitted probe: `score` gives c ∈ [0, 1] (1 = safe) from mean hidden states, differentiably."""

    layer: int
    weight: Tensor  # [d]
    bias: float
    train_accuracy: float

    def score(self, features: Tensor) -> Tensor:
        return torch.sigmoid(features @ self.weight.to(features) + self.bias)


def fit_probe(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    safe: Sequence[str],
    unsafe: Sequence[str],
    layer: int,
    c_reg: float = 1.0,
) -> ConstitutionProbe:
    """Fit c on labelled prompts; raises if either class is empty (a probe of one class is no probe)."""
    if not safe or not unsafe:
        raise ValueError(
            f"the probe needs both classes; got {len(safe)} safe and {len(unsafe)} unsafe prompts"
        )
    x = prompt_features(model, tokenizer, [*safe, *unsafe], layer).cpu().numpy().astype(np.float64)
    y = np.array([1] * len(safe) + [0] * len(unsafe))
    clf = LogisticRegression(C=c_reg, max_iter=2000).fit(x, y)
    return ConstitutionProbe(
        layer,
        torch.from_numpy(clf.coef_[0].astype(np.float32)),
        float(clf.intercept_[0]),
        float(clf.score(x, y)),
    )
