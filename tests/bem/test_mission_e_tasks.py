"""Mission E's task generators: each sample fits its token budget as tightly as its units allow, puts
its needle where asked, and carries answers that the context supports; RULER's metric on hand cases."""

from __future__ import annotations

import random
import re

import pytest

from bem.missions.mission_e import tasks


def words(text: str) -> int:
    return len(text.split())


UNIT = words(tasks.NOISE)


def test_string_match_all_is_the_share_of_references_in_the_prediction() -> None:
    assert tasks.string_match_all("The keys are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert tasks.string_match_all("only 1234567", ["1234567", "7654321"]) == 0.5
    assert tasks.string_match_all("KITCHEN", ["kitchen"]) == 1.0  # case-insensitive
    assert tasks.string_match_all("", ["x"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        tasks.string_match_all("x", [])


@pytest.mark.parametrize("length", [300, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_fits_its_budget_and_hides_the_key_at_its_depth(length: int, depth: float) -> None:
    s = tasks.passkey(random.Random(1), length, depth, words)
    assert length - UNIT < words(s.prompt) <= length
    (key,) = s.answers
    assert s.prompt.count(f"The pass key is {key}.") == 1 and 1 <= int(key) <= 50_000
    needle = s.prompt.index("The pass key is")
    before = s.prompt[:needle].count(tasks.NOISE)
    total = s.prompt.count(tasks.NOISE)
    assert before == round(depth * total)
    assert s.prompt.endswith(tasks.PASSKEY_QUESTION)
    assert tasks.passkey(random.Random(1), length, depth, words) == s  # deterministic in the seed


@pytest.mark.parametrize("task", sorted(tasks.NIAH))
def test_niah_asks_for_the_values_of_its_queried_keys_only(task: str) -> None:
    s = tasks.niah(task, random.Random(2), 600, 0.5, words)
    assert 600 - 30 < words(s.prompt) <= 600
    n_keys, n_values, n_queries, _ = tasks.NIAH[task]
    needles = re.findall(r"special magic numbers for (\S+) is: (\d{7})\.", s.prompt)
    assert len(needles) == n_queries * n_values + (n_keys - n_queries)  # asked, then the distractors
    queried = re.search(r"What are all the special magic numbers for (.+?) mentioned", s.prompt)
    assert queried is not None
    keys = queried.group(1).split(", ")
    assert len(keys) == n_queries
    assert sorted(s.answers) == sorted(v for k, v in needles if k in keys)
    assert len(s.answers) == n_queries * n_values


def test_variable_tracking_chains_every_name_to_the_value_in_order() -> None:
    s = tasks.variable_tracking(random.Random(3), 800, 0.25, words)
    assert 800 - UNIT - 8 < words(s.prompt) <= 800
    first = re.search(r"VAR (\w{5}) = (\d{5})\.", s.prompt)
    assert first is not None
    value, chain = first.group(2), [first.group(1)]
    for name, source in re.findall(r"VAR (\w{5}) = VAR (\w{5})\.", s.prompt):
        assert source == chain[-1]  # each assignment reads the previous one, in text order
        chain.append(name)
    assert tuple(chain) == s.answers and len(chain) == 5
    assert f"assigned the value {value}" in s.prompt


@pytest.mark.parametrize("task", ["qa1", "qa2"])
def test_babi_answers_follow_from_the_facts(task: str) -> None:
    for seed in range(20):
        s = tasks.babi(task, random.Random(seed), 400, 0.3, words)
        where: dict[str, str] = {}
        held: dict[str, str] = {}
        for person, verb, thing in re.findall(r"(\w+) (went to|picked up) the (\w+)\.", s.prompt):
            if verb == "went to":
                where[person] = thing
            else:
                held[thing] = person
        asked = re.search(r"Where is (the )?(\w+)\?", s.prompt)
        assert asked is not None
        expected = where[held[asked.group(2)]] if asked.group(1) else where[asked.group(2)]
        assert s.answers == (expected,)


def test_a_budget_too_small_for_the_question_is_refused() -> None:
    with pytest.raises(ValueError, match="over 10 tokens"):
        tasks.passkey(random.Random(0), 10, 0.5, words)


def test_an_essay_haystack_grows_as_far_as_the_budget_asks() -> None:
    """No fixed pool of units: 40,000 words of essay (past any cap) fit, within one unit."""
    s = tasks.niah("niah_multikey", random.Random(4), 40_000, 0.5, words)
    assert 40_000 - 20 < words(s.prompt) <= 40_000
