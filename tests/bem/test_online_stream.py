"""Mission B's prompt stream and time-to-fix."""

from __future__ import annotations

import json

import pytest

from bem.missions.mission_b.data import SCENARIOS, probe_set, prompt_stream
from bem.missions.mission_b.metrics import time_to_fix


def test_injections_change_what_a_right_answer_is_from_their_prompt_on() -> None:
    schedule = [(10, "format_change"), (20, "domain_shift"), (30, "new_api_signature")]
    items = list(prompt_stream(40, seed=1, schedule=schedule))
    assert items == list(prompt_stream(40, seed=1, schedule=schedule))
    assert len({i.example_id for i in items}) == 40
    for it in items:
        answer = json.loads(it.target)
        assert ("result" in answer) == (it.index >= 10) and len(answer) == 2
        assert ("fetch(" in it.prompt) == (it.index >= 30) and ("lookup(" in it.prompt) == (it.index < 30)
        assert answer["call"].startswith("fetch(" if it.index >= 30 else "lookup(")
        shifted = any(w in it.prompt for w in ("height", "weight"))
        assert shifted == (it.index >= 20)
        assert it.active == tuple(sorted(s for at, s in schedule if it.index >= at))
        # The answer is the asked row's value in the table (the stream is answerable).
        value = answer["result" if it.index >= 10 else "answer"]
        name, attr = it.prompt.split("what is ")[1].split("?")[0].split("'s ")
        header, rows = it.prompt.split("context: ")[1].split("\n")[0].split(": ")
        assert header == attr and f"{name} {value}" in rows.split(", ")
        assert set(answer["call"].split("(")[1][:-1].split(", ")) == {name, attr}
        assert "".join(t for _, t in it.pieces) == it.target and {k for k, _ in it.pieces} == {
            "structure",
            "call",
            "value",
        }
    with pytest.raises(ValueError, match="unknown scenario"):
        list(prompt_stream(5, 0, [(1, "nope")]))
    with pytest.raises(ValueError, match="outside the stream"):
        list(prompt_stream(5, 0, [(9, SCENARIOS[0])]))


def test_probes_are_fixed_and_clean() -> None:
    probes = probe_set(32)
    assert probes == probe_set(32) and all(not p.active for p in probes)
    stream_ids = {i.example_id for i in prompt_stream(200, seed=0)}
    assert not stream_ids & {p.example_id for p in probes}


def test_time_to_fix() -> None:
    before = [0.8] * 100
    broken = [0.2] * 50
    recovering = [0.8] * 200
    metric = before + broken + recovering
    ok = [True] * len(metric)
    k = time_to_fix(metric, 100, ok)
    # The mean of the last min(k, 100) prompts is within .02 of .8 once at most 2 of 100 are broken.
    window = lambda k: metric[100 + k - min(k, 100) : 100 + k]  # noqa: E731
    assert abs(sum(window(k)) / len(window(k)) - 0.8) <= 0.02
    assert abs(sum(window(k - 1)) / len(window(k - 1)) - 0.8) > 0.02
    assert k == 147  # 150 − k broken prompts in the window: .6·(150 − k)/100 ≤ .02
    failing = ok[:]
    for i in range(100, 260):
        failing[i] = False  # the canary must pass too
    assert time_to_fix(metric, 100, failing) == 161
    assert time_to_fix(before + broken * 30, 100, [True] * 1600) is None  # censored


def test_target_tokens_are_the_whole_targets_tokens_each_with_the_kind_of_its_piece() -> None:
    """A BPE tokenizer merges across pieces (`)",` ends the call and starts the structure): the target is
    tokenised whole, as in pretraining, and every token still says which piece it starts in."""
    from bem.core.models import byte_tokenizer
    from bem.core.smoke_base import train_tokenizer
    from bem.missions.mission_b.data import PIECE_KINDS, smoke_mixture, target_tokens

    corpus = [context + target for context, target in smoke_mixture().documents()[:3000]]
    schedule = [(10, "format_change"), (20, "domain_shift"), (30, "new_api_signature")]
    items = list(prompt_stream(40, seed=2, schedule=schedule, rows=3))
    merged = 0
    for tok in (train_tokenizer(corpus, 512), byte_tokenizer()):
        for it in items:
            ids, kinds = target_tokens(tok, it.pieces)
            assert ids == tok(it.target, add_special_tokens=False)["input_ids"] and len(kinds) == len(ids)
            by_kind = {
                k: "".join(tok.decode([i]) for i, kk in zip(ids, kinds, strict=True) if kk == n)
                for k, n in PIECE_KINDS.items()
            }
            call, value = (text for kind, text in it.pieces if kind != "structure")
            assert by_kind["value"].strip() == value  # ' 11' is the value, space and all
            assert by_kind["call"].startswith(call) and by_kind["call"][len(call) :] in ("", '",')
            merged += by_kind["call"] != call
    assert merged > 0  # the BPE tokenizer did merge across pieces somewhere, so the test saw the case
