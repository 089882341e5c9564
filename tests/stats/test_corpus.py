"""Corpus metrics on summed statistics against sacrebleu's own scoring of the same totals."""

import numpy as np
import pytest
import sacrebleu

from stats import corpus


def _sentence_pairs(rng, n):
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "field", "value", "is", "7", "12", "json"]
    refs = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(n)]
    hyps = [" ".join(rng.choice(words, rng.integers(0, 12))) if i % 5 else refs[i] for i in range(n)]
    return hyps, refs


@pytest.mark.parametrize("name", ["chrf", "bleu"])
def test_totals_of_random_subsets_score_like_sacrebleu(name) -> None:
    metric = sacrebleu.CHRF() if name == "chrf" else sacrebleu.BLEU()
    ours = corpus.chrf if name == "chrf" else corpus.bleu
    rng = np.random.default_rng(0)
    hyps, refs = _sentence_pairs(rng, 60)
    stats = np.array(metric._extract_corpus_statistics(hyps, [refs]), dtype=float)
    # Bootstrap-like totals: random multisets of segments, plus tiny corpora that hit the edge cases.
    picks = [rng.integers(0, 60, rng.integers(1, 60)) for _ in range(200)] + [[i] for i in range(60)]
    totals = np.array([stats[p].sum(axis=0) for p in picks])
    expected = [metric._compute_score_from_stats(list(t)).score for t in totals]
    assert np.allclose(ours(totals), expected, rtol=0, atol=1e-9)


def test_bleu_edge_cases_match_sacrebleu() -> None:
    metric = sacrebleu.BLEU()
    cases = [
        [3, 5, 0, 0, 0, 0, 3, 2, 1, 0],  # no matches at all
        [2, 5, 2, 1, 0, 0, 2, 1, 0, 0],  # an order with no n-grams: sacrebleu stops there
        [0, 5, 0, 0, 0, 0, 0, 0, 0, 0],  # empty hypothesis
        [9, 6, 8, 5, 0, 1, 9, 8, 7, 6],  # a zero in the middle gets "exp" smoothing
        [6, 9, 6, 5, 4, 3, 6, 5, 4, 3],  # brevity penalty
    ]
    ours = corpus.bleu(np.array(cases, dtype=float))
    assert np.allclose(ours, [metric._compute_score_from_stats(c).score for c in cases], atol=1e-9)


def test_micro_f1_and_ratio() -> None:
    t = np.array([[8, 2, 4], [0, 0, 0], [0, 3, 1]], dtype=float)
    assert np.allclose(corpus.micro_f1(t), [16 / 22, 0.0, 0.0])
    assert corpus.ratio_of_sums(np.array([3.0, 4.0])) == 0.75
    with pytest.raises(ValueError, match="3 columns"):
        corpus.micro_f1(np.ones((2, 2)))
    with pytest.raises(ValueError, match="2 columns"):
        corpus.ratio_of_sums(np.ones(3))
