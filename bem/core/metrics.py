"""Per-example text scores the missions share: SQuAD-style EM and token F1, chrF and its statistics.

Every score is a float in [0, 1] per example, because the success test is a paired bootstrap over
per-example scores: corpus-level numbers would hide the pairing. Normalisation and F1 follow the official
SQuAD v2 evaluation script so numbers stay comparable with published EM/F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import sacrebleu

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation, in the script's order: lowercase, punctuation, articles, whitespace."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
    # A str is itself a Sequence[str]; without this check "abc" would score against "a", "b", "c".
    gold_list = [golds] if isinstance(golds, str) else list(golds)
    if not gold_list:
        raise ValueError("need at least one gold answer")
    return gold_list


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold, else 0.0."""
    norm = normalize_answer(pred)
    return max(float(norm == normalize_answer(gold)) for gold in _as_list(golds))


def _f1(pred: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD v2: an empty answer is right only against an empty answer.
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    # 2c / (|p| + |g|) is 2PR / (P + R) rearranged; it is exactly symmetric in floats, the other form is not.
    return 2 * common / (len(pred_tokens) + len(gold_tokens))


def token_f1(pred: str, golds: str | Sequence[str]) -> float:
    """Token-multiset F1 of the normalised strings, the best over the golds."""
    return max(_f1(pred, gold) for gold in _as_list(golds))


def chrf(pred: str, gold: str) -> float:
    """sacrebleu's sentence chrF scaled to [0, 1] (sacrebleu gives 0 when both strings are empty)."""
    return float(sacrebleu.sentence_chrf(pred, [gold]).score) / 100.0


_CHRF = sacrebleu.metrics.CHRF()


def chrf_stats(pred: str, gold: str) -> list[float]:
    """sacrebleu's per-segment chrF sufficient statistics ([hyp, ref, match] per character n-gram
    order, 18 numbers): summed over examples they give the corpus chrF (`stats.corpus.chrf`), which
    is not a mean of sentence scores, so the bootstrap resamples these instead."""
    return [float(x) for x in _CHRF._extract_corpus_statistics([pred], [[gold]])[0]]


_BLEU = sacrebleu.metrics.BLEU()


def bleu_stats(pred: str, gold: str) -> list[float]:
    """sacrebleu's per-segment BLEU statistics ([sys_len, ref_len, correct_1..4, total_1..4]), which
    `stats.corpus.bleu` scores from their sums, as `chrf_stats` for chrF."""
    return [float(x) for x in _BLEU._extract_corpus_statistics([pred], [[gold]])[0]]
