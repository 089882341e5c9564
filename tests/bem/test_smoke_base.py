"""The smoke base: a lossless tokenizer made from the mission's corpus, a cache keyed by content, and a
pretraining loop that keeps its time budget."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bem.core.models import load_model
from bem.core.smoke_base import Mixture, Recipe, Source, cache_key, recall_source, smoke_base, train_tokenizer
from bem.missions.validation.data import JSON_CUE, SUMMARY_CUE, make_split, smoke_mixture

TINY = Recipe(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    seq_len=32, batch_size=4, steps=6, warmup=2, corpus_docs=200,
)  # fmt: skip


def tiny_mixture(word: str = "alpha") -> Mixture:
    return Mixture(
        name="tiny",
        sources=(
            Source("words", 1.0, lambda rng: f"{word} {rng.randint(0, 99)} beta gamma."),
            recall_source(["k1", "k2", "k3", "k4"], ["v1", "v2", "v3"], 1.0),
        ),
        recipe=TINY,
    )


def texts(mixture: Mixture) -> list[str]:
    return [context + target for context, target in mixture.documents()]


TOKENIZER = train_tokenizer(texts(smoke_mixture())[:2000], 512)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_the_tokenizer_round_trips_any_string(text: str) -> None:
    assert TOKENIZER.decode(TOKENIZER(text, add_special_tokens=False)["input_ids"]) == text


def test_the_tokenizer_fits_the_missions_formats() -> None:
    """Words of the task formats are single tokens, so the model copies a field in few steps."""
    corpus = texts(smoke_mixture())[:2000]
    mean_chars = sum(map(len, corpus)) / len(corpus)
    mean_tokens = sum(len(TOKENIZER(d)["input_ids"]) for d in corpus) / len(corpus)
    assert mean_chars / mean_tokens > 2.0, (mean_chars, mean_tokens)
    assert TOKENIZER.eos_token_id is not None and TOKENIZER.pad_token_id != TOKENIZER.eos_token_id


def test_the_base_never_reads_a_held_out_input_or_a_cue() -> None:
    corpus = "\n".join(texts(smoke_mixture()))
    assert JSON_CUE.strip() not in corpus and SUMMARY_CUE.strip() not in corpus
    for task in ("json", "summary"):
        for ex in make_split(task, "test", 100, 1):
            body = ex.prompt.removeprefix("Summarize: ").split("\n")[0]
            assert body not in corpus, body


def test_the_cache_is_keyed_by_content_and_reused(tmp_path: Path) -> None:
    logs: list[str] = []
    first = smoke_base(tmp_path, tiny_mixture(), log=logs.append)
    summary = json.loads((first / "pretrain.json").read_text())
    assert summary["steps_run"] == TINY.steps and summary["corpus_docs"] == TINY.corpus_docs
    model, tokenizer = load_model(first)
    assert model.config.vocab_size == len(tokenizer) <= TINY.vocab_size
    assert smoke_base(tmp_path, tiny_mixture(), log=logs.append) == first and "cached" in logs[-1]
    docs = tiny_mixture().documents()
    assert cache_key(tiny_mixture("delta"), tiny_mixture("delta").documents()) != cache_key(
        tiny_mixture(), docs
    )
    changed = replace(tiny_mixture(), recipe=replace(TINY, lr=1e-3))
    assert cache_key(changed, docs) != cache_key(tiny_mixture(), docs)
    assert smoke_base(tmp_path, tiny_mixture("delta")) != first


def test_pretraining_stops_at_its_budget(tmp_path: Path) -> None:
    slow = replace(tiny_mixture(), recipe=replace(TINY, steps=10_000))
    path = smoke_base(tmp_path, slow, budget_s=1.0)
    summary = json.loads((path / "pretrain.json").read_text())
    assert 0 < summary["steps_run"] < 10_000 and summary["seconds"] < 30


def test_recall_documents_bind_each_queried_key_to_its_value() -> None:
    source = recall_source([f"k{i}" for i in range(10)], [f"v{i}" for i in range(10)], 1.0)
    rng = random.Random(0)
    for _ in range(200):
        doc = source.make(rng)
        assert isinstance(doc, str)
        table, queries = doc.rstrip(".").split(". ")
        bound = dict(pair.split(" ") for pair in table.split(", "))
        for pair in queries.split(", "):
            k, v = pair.split(" ")
            assert bound[k] == v


def test_a_target_document_supervises_its_target_only() -> None:
    """(context, target) documents: the loss mask covers the target and its eos, never the context."""
    from bem.core.smoke_base import _stream

    source = recall_source([f"k{i}" for i in range(10)], [f"v{i}" for i in range(10)], 1.0, answers_only=True)
    docs = [source.make(random.Random(i)) for i in range(50)]
    assert all(isinstance(d, tuple) for d in docs)
    pairs = [d for d in docs if isinstance(d, tuple)]
    ids, mask = _stream(pairs, TOKENIZER)
    assert ids.shape == mask.shape and ids[mask].numel() < ids.numel()
    # The supervised tokens decode to the targets, each followed by eos, in order.
    eos = TOKENIZER.eos_token
    assert TOKENIZER.decode(ids[mask]) == "".join(t + eos for _, t in pairs)
    assert TOKENIZER.decode(ids[~mask]) == "".join(c for c, _ in pairs)


def test_mission_corpora_hold_no_cue_no_composite_and_nothing_of_mission_bs_injections() -> None:
    from bem.missions.mission_a.data import smoke_mixture as mission_a
    from bem.missions.mission_b.data import SHIFTED_ATTRIBUTES, SHIFTED_NAMES
    from bem.missions.mission_b.data import smoke_mixture as mission_b

    a = "\n".join(texts(mission_a()))
    assert "question:" not in a and "answer:" not in a
    # Single-skill questions are asked (after other cues), composite ones never: composing is the
    # adapters' job.
    assert "what is" in a and "as json." in a
    assert "as json?" not in a and "who has the higher" not in a and not re.search(r"'s \w+ plus", a)
    b = "\n".join(texts(mission_b()))
    words = set(b.replace(",", " ").replace(";", " ").replace("(", " ").replace(")", " ").split())
    assert "json:" not in b and "fetch(" not in b and '"result"' not in b
    assert not words & {*SHIFTED_NAMES, *SHIFTED_ATTRIBUTES}
