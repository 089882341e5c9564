"""Mission D's representation metrics (missions_cde.md D.3; the issue's definitions replace section 9's).

- **RRS** (representation robustness): linear CKA between the pooled states of N sentences and of
  their views, chance-corrected by the CKA against the views in a random pairing:
  RRS = (CKA(Z, Z′) − CKA(Z, Z′_shuf)) / (1 − CKA(Z, Z′_shuf)), the shuffle within sentences of one
  length where lengths are given (`chance_cka`). CKA alone can be gamed and is
  outlier-sensitive, so `retrieval_at_1` (is a sentence's nearest view its own?) and `alignment`
  (mean squared distance of the normalised pairs) are reported beside it.
- **EqE** (prediction equivariance error, S1): the R-Drop symmetric KL between the next-token
  distributions on x and on π(x) read back through π⁻¹, averaged over positions.
- **LDC** (linear decodability of a surface cue): a logistic probe's held-out accuracy on the cue minus
  its accuracy on a Hewitt–Liang control task (each type, a random label with the cue's marginal),
  normalised by 1 − the majority rate, floored at 0. Lower is better. The probes are fitted once on a
  training split; the per-example correctness on the test split is returned, so intervals resample it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X, Y (rows paired)."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CKA needs the same number (≥ 2) of paired rows; got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def chance_cka(
    z: np.ndarray, z_view: np.ndarray, strata: Sequence[int] | None = None, seed: int = 0, draws: int = 20
) -> float:
    """The CKA of sentences against views of other sentences, averaged over `draws` random pairings.
    Each pairing is a derangement (no sentence meets its own view, which would leak the true pairing
    into chance). With `strata` (each sentence's length), a sentence is paired only with a view of a
    sentence of the same stratum: mean-pooled states carry the sentence's length, and pairs that share
    nothing else would otherwise count as chance-level, crediting a model that encodes only length. A
    stratum of one sentence joins its neighbour."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(z))] if strata is None else _groups(strata)
    total = 0.0
    for _ in range(draws):
        perm = np.arange(len(z))
        for g in groups:
            order = rng.permutation(g)
            perm[order] = np.roll(order, 1)  # a cycle through the shuffled group: no fixed point
        total += linear_cka(z, z_view[perm])
    return total / draws


def _groups(strata: Sequence[int]) -> list[np.ndarray]:
    """Indices per stratum value, in order of value; a group of one is merged into the next (or, last,
    the previous), so every group can be deranged."""
    s = np.asarray(strata)
    groups = [np.flatnonzero(s == v) for v in np.unique(s)]
    if len(s) < 2:
        raise ValueError("a chance pairing needs at least 2 sentences")
    merged: list[np.ndarray] = []
    carry = np.array([], dtype=int)
    for g in groups:
        g = np.concatenate([carry, g])
        if len(g) < 2:
            carry = g
            continue
        merged.append(g)
        carry = np.array([], dtype=int)
    if len(carry):
        merged[-1] = np.concatenate([merged[-1], carry])
    return merged


def rrs(z: np.ndarray, z_view: np.ndarray, seed: int = 0, strata: Sequence[int] | None = None) -> float:
    """Chance-corrected CKA of sentences and their views (module docstring); 1 when the views' states
    are the sentences' own (up to rotation and scale), about 0 when they carry no pairing (beyond the
    strata, when given)."""
    chance = chance_cka(z, z_view, strata, seed)
    return (linear_cka(z, z_view) - chance) / (1.0 - chance)


def rrs_pseudo_values(
    z: np.ndarray, z_view: np.ndarray, seed: int = 0, strata: Sequence[int] | None = None
) -> np.ndarray:
    """Per sentence, RRS's jackknife pseudo-value ψ_i = n·RRS − (n−1)·RRS_(−i), whose mean is the
    jackknife's bias-corrected RRS. RRS is not a mean over sentences, so a paired bootstrap over
    sentences resamples these instead (the pseudo-value bootstrap): their spread is the jackknife's
    variance of RRS, and two arms' pseudo-values pair by sentence. The chance term is computed once on
    all sentences and held fixed: a fresh random pairing per left-out sentence would put its draw
    noise, times n − 1, into every pseudo-value."""
    n = len(z)
    if n < 4:
        raise ValueError(f"pseudo-values need at least 4 sentences; got {n}")
    chance = chance_cka(z, z_view, strata, seed)

    def corrected(cka: float) -> float:
        return (cka - chance) / (1.0 - chance)

    whole = corrected(linear_cka(z, z_view))
    keep = np.ones(n, dtype=bool)
    out = np.empty(n)
    for i in range(n):
        keep[i] = False
        out[i] = n * whole - (n - 1) * corrected(linear_cka(z[keep], z_view[keep]))
        keep[i] = True
    return out


def retrieval_at_1(z: np.ndarray, z_view: np.ndarray) -> np.ndarray:
    """Per sentence, 1.0 when its cosine-nearest view is its own (Dufter & Schütze's retrieval)."""
    a = z / np.linalg.norm(z, axis=1, keepdims=True)
    b = z_view / np.linalg.norm(z_view, axis=1, keepdims=True)
    return (np.argmax(a @ b.T, axis=1) == np.arange(len(z))).astype(float)


def alignment(z: np.ndarray, z_view: np.ndarray) -> np.ndarray:
    """Per sentence, ‖ẑ − ẑ′‖² of the L2-normalised pair (Wang & Isola)."""
    a = z / np.linalg.norm(z, axis=1, keepdims=True)
    b = z_view / np.linalg.norm(z_view, axis=1, keepdims=True)
    return np.sum((a - b) ** 2, axis=1)


def eqe(
    logits: Tensor,
    view_logits: Tensor,
    inverse: Tensor,
    mask: Tensor | None = None,
    unmapped: Tensor | None = None,
) -> Tensor:
    """Per sequence, the symmetric KL between p(x) and π⁻¹p(π x), averaged over its (unmasked) positions.

    `logits` [B, T, V] on x; `view_logits` [B, T, V′] on π(x), position-aligned (S1 keeps length);
    `inverse` [V] the view-vocabulary id of each original id, so `view_logits[..., inverse]` is the
    view's distribution over the original vocabulary. `unmapped` [B, T] marks positions whose next
    token the view did not scramble (a task's target, which stays in the original words): there the
    two distributions are compared as they are."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(view_logits.float()[..., inverse], dim=-1)
    if unmapped is not None:
        plain = torch.log_softmax(view_logits.float(), dim=-1)
        log_q = torch.where(unmapped.bool().unsqueeze(-1), plain, log_q)
    kl_pq = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl_qp = (log_q.exp() * (log_q - log_p)).sum(-1)
    per_position = 0.5 * (kl_pq + kl_qp)
    if mask is None:
        return per_position.mean(-1)
    m = mask.to(per_position.dtype)
    return (per_position * m).sum(-1) / m.sum(-1).clamp_min(1)


@dataclass(frozen=True)
class Decodability:
    """A cue's held-out decodability: per test example, whether the cue probe and the control probe
    were right, and the majority rate of the cue on the test split."""

    cue_correct: np.ndarray
    control_correct: np.ndarray
    majority: float

    @property
    def ldc(self) -> float:
        return ldc_from(self.cue_correct, self.control_correct, self.majority)


def ldc_from(cue_correct: np.ndarray, control_correct: np.ndarray, majority: float) -> float:
    """max(0, acc_cue − acc_ctrl) / (1 − acc_majority)."""
    if majority >= 1.0:
        raise ValueError("the cue has one value on the test split: nothing to decode")
    return max(0.0, float(cue_correct.mean() - control_correct.mean())) / (1.0 - majority)


def control_labels(types: Sequence[str], labels: Sequence[int], seed: int) -> dict[str, int]:
    """Hewitt–Liang's control task: each type gets one random label, drawn from the cue's marginal."""
    rng = np.random.default_rng(seed)
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    kinds = sorted(set(types))
    drawn = rng.choice(values, size=len(kinds), p=counts / counts.sum())
    return {t: int(v) for t, v in zip(kinds, drawn, strict=True)}


def decodability(
    train: np.ndarray,
    train_labels: Sequence[int],
    train_types: Sequence[str],
    test: np.ndarray,
    test_labels: Sequence[int],
    test_types: Sequence[str],
    *,
    c_reg: float = 1.0,
    seed: int = 0,
) -> Decodability:
    """Fit the cue probe and the control probe (same class and settings) on the training split, and
    score both on the test split. A test type unseen in training gets a control label drawn the same
    way, so the control task stays defined."""
    control = control_labels([*train_types, *test_types], [*train_labels, *test_labels], seed)
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
    c_train = np.array([control[t] for t in train_types])
    c_test = np.array([control[t] for t in test_types])

    def fit(y: np.ndarray) -> Pipeline:
        # Standardised first: an embedding layer's states are orders of magnitude smaller than a top
        # layer's, and one C must regularise both alike.
        return make_pipeline(StandardScaler(), LogisticRegression(C=c_reg, max_iter=2000)).fit(train, y)

    cue = fit(y_train).predict(test) == y_test
    ctrl = fit(c_train).predict(test) == c_test if len(set(c_train)) > 1 else c_test == c_train[0]
    majority = float(np.max(np.unique(y_test, return_counts=True)[1]) / len(y_test))
    return Decodability(cue.astype(float), np.asarray(ctrl, dtype=float), majority)


def pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """[B, d]: the mean of each row's hidden states over its unmasked tokens."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
