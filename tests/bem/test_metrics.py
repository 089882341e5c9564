"""Scores against hand-worked SQuAD examples, JSON edge cases and sacrebleu's own chrF."""

from __future__ import annotations

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st

from bem.core.metrics import chrf, exact_match, normalize_answer, token_f1
from bem.missions.validation.data import Example, make_split
from bem.missions.validation.metrics import json_scores, score_example


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Cat's  hat!", "cats hat"),
        ("An apple a day", "apple day"),
        ("theatre anchor", "theatre anchor"),  # articles only as whole words
        ("the, a. an!", ""),
        ("  Eiffel\tTower \n", "eiffel tower"),
        ("a-team", "ateam"),  # punctuation goes before articles, so this is no longer "a team"
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match() -> None:
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert exact_match("b", "bc") == 0.0  # a str gold is one answer, not a list of characters
    assert exact_match("", "") == 1.0


@pytest.mark.parametrize(
    ("pred", "golds", "f1"),
    [
        ("the cat sat on the mat", "a cat sat on a mat", 1.0),
        ("cat sat", "cat sat on mat", 2 / 3),  # P 1, R 1/2
        ("cat cat", "cat", 2 / 3),  # multisets: only one "cat" matches
        ("big red dog", "red cat", 0.4),  # P 1/3, R 1/2
        ("dog", "cat", 0.0),
        ("cat sat", ["dog", "cat sat on mat", "sat"], 2 / 3),  # best gold wins
        ("", "", 1.0),
        ("the", "a", 1.0),  # both normalise to nothing
        ("", "cat", 0.0),
        ("cat", "", 0.0),
    ],
)
def test_token_f1(pred: str, golds: str | list[str], f1: float) -> None:
    assert token_f1(pred, golds) == pytest.approx(f1)


def test_no_golds_raises() -> None:
    with pytest.raises(ValueError):
        token_f1("cat", [])
    with pytest.raises(ValueError):
        exact_match("cat", [])


_answers = st.lists(st.sampled_from(["the", "a", "Cat", "cat,", "sat", "on", "mat!", "dog"]), max_size=8).map(
    " ".join
) | st.text(max_size=30)


@settings(max_examples=200, deadline=None)
@given(_answers, _answers)
def test_token_f1_is_symmetric_bounded_and_reflexive(a: str, b: str) -> None:
    assert token_f1(a, b) == token_f1(b, a)
    assert 0.0 <= token_f1(a, b) <= 1.0
    assert token_f1(a, a) == 1.0


GOLD = {"title": "Dune", "author": "Herbert", "year": 1965}


@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        ('{"title":"Dune","author":"Herbert","year":1965}', (1.0, 1.0)),
        ('  {"year": 1965, "author": "Herbert", "title": "Dune"}\n', (1.0, 1.0)),  # order is free
        ('{"title":"Dune","author":"Herbert","year":1965} and then more', (1.0, 1.0)),
        ('JSON: {"title":"Dune","author":"Herbert","year":1965}}}', (1.0, 1.0)),
        ('{"title":"Dune","author":"Asimov","year":1965}', (1.0, 2 / 3)),
        ('{"title":"Dune","extra":1}', (1.0, 1 / 3)),  # missing fields count as wrong, extras are free
        ('{"title":"Dune","author":"Herbert","year":"1965"}', (1.0, 2 / 3)),  # string is not the int
        ('{"title":"Dune","author":"Herbert","year":1965.0}', (1.0, 2 / 3)),  # float is not the int
        ("{}", (1.0, 0.0)),
        ('{"title":"Dune",', (0.0, 0.0)),
        ("title: Dune", (0.0, 0.0)),
        ("", (0.0, 0.0)),
        ("{'title': 'Dune'}", (0.0, 0.0)),  # a Python dict repr is not JSON
    ],
)
def test_json_scores(pred: str, expected: tuple[float, float]) -> None:
    valid, accuracy = json_scores(pred, GOLD)
    assert valid == expected[0]
    assert accuracy == pytest.approx(expected[1])


def test_json_scores_bool_is_not_int() -> None:
    assert json_scores('{"n": true}', {"n": 1}) == (1.0, 0.0)
    assert json_scores('{"n": 1}', {"n": 1}) == (1.0, 1.0)


def test_json_scores_needs_gold_fields() -> None:
    with pytest.raises(ValueError):
        json_scores("{}", {})


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("Heavy rain hit Oslo on Monday.", "Heavy rain hit Oslo on Monday, closing 12 roads."),
        ("the cat sat", "a dog ran"),
        ("xyz", "abc"),
    ],
)
def test_chrf_matches_sacrebleu(pred: str, gold: str) -> None:
    assert chrf(pred, gold) == pytest.approx(sacrebleu.sentence_chrf(pred, [gold]).score / 100)
    assert 0.0 <= chrf(pred, gold) < 1.0


def test_chrf_is_one_on_identical_strings() -> None:
    assert chrf("Acme bought Nova for 12 million.", "Acme bought Nova for 12 million.") == pytest.approx(1.0)


def test_score_example_json() -> None:
    (ex,) = make_split("json", "test", 1, 0)
    assert score_example(ex, ex.target) == {"score": 1.0, "json_valid": 1.0}
    assert score_example(ex, "no idea") == {"score": 0.0, "json_valid": 0.0}


def test_score_example_summary() -> None:
    (ex,) = make_split("summary", "test", 1, 0)
    perfect = score_example(ex, ex.target)
    stats = {k: perfect.pop(k) for k in [k for k in perfect if k.startswith("chrf#")]}
    assert perfect == {"score": 1.0, "em": 1.0, "chrf": pytest.approx(1.0)}
    # The corpus statistics: for one example, sacrebleu's score from them is the sentence chrF.
    assert len(stats) == 18
    row = [stats[f"chrf#{i}"] for i in range(18)]
    assert sacrebleu.metrics.CHRF()._compute_score_from_stats(row).score == pytest.approx(100.0)
    partial = score_example(ex, " ".join(ex.target.split()[:3]) + " said nothing")
    assert 0.0 < partial["score"] < 1.0 and partial["em"] == 0.0 and 0.0 < partial["chrf"] < 1.0


def test_score_example_rejects_unknown_task() -> None:
    ex = Example("x-test-00000-00000000", "xml", "test", "p", "t", None)
    with pytest.raises(ValueError, match="xml"):
        score_example(ex, "t")
