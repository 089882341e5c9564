"""SEP's loss terms (BEM_SPEC.md section 9; the issue's Phase-0 weights are `PHASE0_WEIGHTS`).

- `symmetric_kl`: the R-Drop consistency, ½[KL(p‖q) + KL(q‖p)] per position, between the next-token
  distributions of a sentence and of its view. For S1 the view's distribution is read back through π⁻¹
  (`bem.missions.mission_d.metrics.eqe`, the same quantity as the metric); for S2 and S3 the source
  positions do not align, but the target's do (the task's answer is the same), so `target_kl`
  compares the two teacher-forced targets position by position.
- `info_nce`: SimCSE's contrastive loss on pooled states, each sentence's own view the positive and
  the batch's other views the negatives, at temperature τ (0.1), both directions.
- `variance_guard`: VICReg's variance term, which keeps the pooled states from collapsing onto one
  point (where InfoNCE and the KL are trivially satisfied).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from bem.missions.mission_d.metrics import eqe

PHASE0_WEIGHTS = {"kl": 1.0, "info_nce": 0.5, "ce": 0.1, "variance": 0.01}


def symmetric_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per position, ½[KL(p‖q) + KL(q‖p)] of two log-distributions over the same last axis."""
    p, q = log_p.exp(), log_q.exp()
    return 0.5 * ((p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1))


def shadow_kl(
    logits: Tensor,
    view_logits: Tensor,
    inverse: Tensor,
    mask: Tensor | None = None,
    unmapped: Tensor | None = None,
) -> Tensor:
    """S1's consistency loss: the batch mean of `eqe` (differentiable; `unmapped` marks the target's
    positions, whose words S1 leaves as they are)."""
    return eqe(logits, view_logits, inverse, mask, unmapped).mean()


def target_kl(logits: Tensor, target_mask: Tensor, view_logits: Tensor, view_target_mask: Tensor) -> Tensor:
    """S2/S3's consistency loss: the symmetric KL between the predictions at the target's positions of a
    sentence and of its view (the same target, after sources of different lengths), averaged over them.
    The masks mark the positions whose next token is a target token; each row must mark as many."""
    if not torch.equal(target_mask.sum(-1), view_target_mask.sum(-1)):
        raise ValueError("a sentence and its view must have as many target positions, row by row")
    log_p = torch.log_softmax(logits.float()[target_mask.bool()], dim=-1)
    log_q = torch.log_softmax(view_logits.float()[view_target_mask.bool()], dim=-1)
    return symmetric_kl(log_p, log_q).mean()


def info_nce(z: Tensor, z_view: Tensor, tau: float = 0.1) -> Tensor:
    """Cross-entropy of cosine similarities / τ with the diagonal as the positives, averaged over both
    directions (sentence → views and view → sentences)."""
    if z.shape != z_view.shape or z.shape[0] < 2:
        raise ValueError(
            f"need two equal batches of at least 2 rows; got {tuple(z.shape)}, {tuple(z_view.shape)}"
        )
    sim = F.normalize(z, dim=-1) @ F.normalize(z_view, dim=-1).T / tau
    labels = torch.arange(z.shape[0], device=z.device)
    return 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))


def variance_guard(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg's variance term: mean over dimensions of relu(γ − std), so 0 once every dimension of the
    pooled states varies by at least γ across the batch."""
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def weighted(terms: Mapping[str, Tensor], weights: Mapping[str, float] = PHASE0_WEIGHTS) -> Tensor:
    """Σ weight·term over the terms an arm uses; a term without a weight is an error, not a zero."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise ValueError(f"no weight for {missing}; weights: {dict(weights)}")
    return torch.stack([weights[name] * value for name, value in terms.items()]).sum()
