"""Corpus metrics from summed per-example sufficient statistics, vectorised over resamples.

A corpus metric (micro-F1, chrF, BLEU) is not a mean of per-example scores, so the bootstrap
resamples the examples' sufficient statistics and re-scores their totals (STATS_SPEC §2, "ratio of
sums"). Each function takes totals of shape (..., k) and returns (...), so one call scores all B
resamples and all n jackknife totals. Layouts follow sacrebleu's segment statistics, so
`metric._extract_corpus_statistics(hyps, [refs])` rows can be passed in directly; the tests check
every function against sacrebleu's own `_compute_score_from_stats` on random totals.

`METRICS` names them for gates: a claim or precondition with `corpus = "chrf"` scores the table's
per-example statistics `M#0` … `M#{k-1}` with `chrf` (the convention is in `stats.table`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Metric = Callable[[np.ndarray], np.ndarray]


def ratio_of_sums(t: np.ndarray) -> np.ndarray:
    """Σ numerator / Σ denominator, from columns [numerator, denominator]: micro accuracy, token rates."""
    if t.shape[-1] != 2:
        raise ValueError(f"ratio_of_sums needs 2 columns [numerator, denominator], got {t.shape[-1]}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return t[..., 0] / t[..., 1]


def micro_f1(t: np.ndarray) -> np.ndarray:
    """2·TP / (2·TP + FP + FN) from columns [TP, FP, FN]; 0 when there is nothing to score."""
    if t.shape[-1] != 3:
        raise ValueError(f"micro_f1 needs 3 columns [TP, FP, FN], got {t.shape[-1]}")
    tp, fp, fn = t[..., 0], t[..., 1], t[..., 2]
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0)


def chrf(t: np.ndarray, beta: float = 2.0) -> np.ndarray:
    """sacrebleu's default chrF (effective-order averaging, no eps smoothing), 0-100.

    Columns: [hyp, ref, match] per n-gram order.
    """
    if t.shape[-1] % 3:
        raise ValueError(f"chrf needs [hyp, ref, match] per n-gram order, got {t.shape[-1]} columns")
    per = t.reshape(*t.shape[:-1], -1, 3)
    hyp, ref, match = per[..., 0], per[..., 1], per[..., 2]
    valid = (hyp > 0) & (ref > 0)  # orders that count toward the effective order
    prec = np.divide(match, hyp, out=np.zeros_like(match), where=valid)
    rec = np.divide(match, ref, out=np.zeros_like(match), where=valid)
    eff = valid.sum(axis=-1)
    avg_p = np.divide(prec.sum(axis=-1), eff, out=np.zeros(eff.shape), where=eff > 0)
    avg_r = np.divide(rec.sum(axis=-1), eff, out=np.zeros(eff.shape), where=eff > 0)
    f = beta**2
    num, den = (1 + f) * avg_p * avg_r, f * avg_p + avg_r
    return 100 * np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def bleu(t: np.ndarray, max_order: int = 4) -> np.ndarray:
    """sacrebleu's corpus BLEU with its default "exp" smoothing, 0-100.

    Columns: [sys_len, ref_len, correct_1..N, total_1..N].
    """
    if t.shape[-1] != 2 + 2 * max_order:
        raise ValueError(f"bleu needs 2 + 2·{max_order} columns, got {t.shape[-1]}")
    sys_len, ref_len = t[..., 0], t[..., 1]
    correct, total = t[..., 2 : 2 + max_order], t[..., 2 + max_order :]
    zero = correct == 0
    # "exp" smoothing: the k-th order with no match scores 100 / (2^k · total).
    smoothed = 100.0 / (2.0 ** np.cumsum(zero, axis=-1) * np.where(total > 0, total, 1))
    prec = np.where(zero, smoothed, 100.0 * correct / np.where(total > 0, total, 1))
    # sacrebleu stops at the first order with no n-grams; the rest count as log(0), i.e. a zero score.
    stopped = np.cumsum(total == 0, axis=-1) > 0
    log_p = np.where(stopped, -9999999999.0, np.log(np.where(stopped, 1.0, prec)))
    with np.errstate(divide="ignore", over="ignore"):
        bp = np.where(sys_len < ref_len, np.exp(1 - ref_len / np.where(sys_len > 0, sys_len, 1)), 1.0)
    bp = np.where((sys_len < ref_len) & (sys_len == 0), 0.0, bp)
    score = bp * np.exp(log_p.sum(axis=-1) / max_order)
    return np.where(zero.all(axis=-1), 0.0, score)


METRICS: dict[str, Metric] = {
    "chrf": chrf,
    "bleu": bleu,
    "micro_f1": micro_f1,
    "ratio_of_sums": ratio_of_sums,
}
"""The corpus metrics a gate may name (`Claim.corpus`, `Precondition.corpus`), by name."""
