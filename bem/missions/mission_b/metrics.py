"""Mission B's scores (BEM_SPEC.md section 7): per prompt, from one teacher-forced pass, the aggregate
and its parts, all in [0, 1]; token hits by piece kind for the canaries; time-to-fix after an injection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bem.core.train import IGNORE
from bem.missions.mission_b.data import PIECE_KINDS, Encoded

# Aggregate = .3 task success + .25 quality + .2 user satisfaction + .15 tool success + .1 coherence.
AGGREGATE_WEIGHTS = {"success": 0.3, "quality": 0.25, "satisfaction": 0.2, "tool": 0.15, "coherence": 0.1}


SCORES = ("aggregate", *AGGREGATE_WEIGHTS)


def prompt_scores(logits: Tensor, enc: Encoded) -> dict[str, Tensor]:
    """Per prompt, all in [0, 1], from one teacher-forced pass. Greedy decoding reproduces the target
    exactly iff the argmax is right at every target position, so `success` is greedy exact match.
    - quality: share of target tokens right; tool: the tool call right; satisfaction (a fixed scorer):
      the JSON structure and keys right; coherence: exp(−mean token entropy) over the target."""
    labels, kinds = enc.batch.labels[:, 1:], enc.kinds[:, 1:]
    logits = logits[:, :-1].float()
    labelled = labels != IGNORE
    right = logits.argmax(-1) == labels
    logp = F.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    n = labelled.sum(1).clamp_min(1)
    out = {
        "success": (right | ~labelled).all(1).float(),
        "quality": (right & labelled).sum(1) / n,
        "satisfaction": (right | (kinds != PIECE_KINDS["structure"])).all(1).float(),
        "tool": (right | (kinds != PIECE_KINDS["call"])).all(1).float(),
        "coherence": torch.exp(-(entropy * labelled).sum(1) / n),
    }
    out["aggregate"] = sum(w * out[k] for k, w in AGGREGATE_WEIGHTS.items())  # type: ignore[assignment]
    return out


@dataclass
class TokenHits:
    right: Tensor  # [B, T−1]: the argmax is the label
    labelled: Tensor  # [B, T−1]
    kinds: Tensor  # [B, T−1]

    def share(self, rows: slice, kind: str | None = None) -> float:
        """Share of right target tokens in `rows`, of one piece kind or all."""
        keep = self.labelled[rows]
        if kind is not None:
            keep = keep & (self.kinds[rows] == PIECE_KINDS[kind])
        return float((self.right[rows] & keep).sum()) / max(int(keep.sum()), 1)


def token_hits(logits: Tensor, enc: Encoded) -> TokenHits:
    labels = enc.batch.labels[:, 1:]
    return TokenHits(logits[:, :-1].argmax(-1) == labels, labels != IGNORE, enc.kinds[:, 1:])


def time_to_fix(
    metric: Sequence[float], injected_at: int, canary_ok: Sequence[bool], censor: int = 1000
) -> int | None:
    """Prompts after an injection until the metric is back: the least k ≥ 20 with
    |mean(last min(k, 100) post-injection prompts) − mean(100 prompts before)| ≤ .02 and the latest
    canary passing; None (censored, a failure) if that does not happen within `censor` prompts or
    before the metric ends."""
    pre = metric[max(0, injected_at - 100) : injected_at]
    if not pre:
        raise ValueError("time-to-fix needs prompts before the injection")
    m_pre = sum(pre) / len(pre)
    for k in range(20, min(censor, len(metric) - injected_at) + 1):
        window = metric[injected_at + k - min(k, 100) : injected_at + k]
        if abs(sum(window) / len(window) - m_pre) <= 0.02 and canary_ok[injected_at + k - 1]:
            return k
    return None
