"""Mission D's tasks: the translation target is a function of the frame (so every meaning-preserving view
of a source keeps it), different frames translate differently, the held-out templates stay out of
training, and the corpus metrics on these strings agree with sacrebleu."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from bem.missions.mission_d import data, scramble
from bem.missions.mission_d import language as lang
from stats import corpus

TRAIN = data.make_examples("train", 300, 0)


def test_a_view_that_keeps_the_meaning_keeps_the_target_and_the_answer() -> None:
    for ex in TRAIN[:100]:
        for rung in ("S2", "S3"):
            frame, _ = lang.parse(scramble.view(ex.source, rung, 5))
            assert data.translate(frame) == ex.target
            assert data.answer(frame, ex.question) == ex.answer


def test_different_frames_translate_differently() -> None:
    by_target: dict[str, lang.Frame] = {}
    for ex in TRAIN:
        assert by_target.setdefault(ex.target, ex.frame) == ex.frame, ex.target


def test_held_out_templates_never_reach_training_and_splits_do_not_overlap() -> None:
    test = data.make_examples("test", 100, 0)
    ood = data.make_examples("ood_template", 50, 0)
    assert not {data.template_of(e.frame) for e in [*TRAIN, *test]} & data.HELD_OUT_TEMPLATES
    assert {data.template_of(e.frame) for e in ood} <= data.HELD_OUT_TEMPLATES
    sources = [{e.source for e in s} for s in (TRAIN, test, ood)]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert data.make_examples("train", 300, 0) == TRAIN  # the same arguments, the same list
    assert len({e.example_id for e in TRAIN}) == len(TRAIN)


def test_questions_ask_for_canonical_lexemes() -> None:
    ex = next(e for e in TRAIN if e.question == "agent")
    assert ex.answer == ex.frame.agent.noun and ex.qa_prompt == f"{ex.source} agent?"
    with pytest.raises(ValueError, match="unknown question"):
        data.answer(ex.frame, "where")


def test_longer_inputs_join_whole_examples() -> None:
    pairs = data.longer(TRAIN[:9], 4)
    assert len(pairs) == 2
    assert pairs[0] == (" ".join(e.source for e in TRAIN[:4]), " ".join(e.target for e in TRAIN[:4]))


@pytest.mark.parametrize("name", ["chrf", "bleu"])
def test_corpus_metrics_on_the_task_strings_agree_with_sacrebleu(name: str) -> None:
    """Per-example statistics summed and scored by `stats.corpus` equal sacrebleu's corpus score, on
    hypotheses that are the references with words dropped (the shape of a half-trained model)."""
    rng = np.random.default_rng(0)
    refs = [e.target for e in TRAIN[:80]]
    hyps = [" ".join(w for w in r.split() if rng.random() > 0.3) for r in refs]
    metric = sacrebleu.CHRF() if name == "chrf" else sacrebleu.BLEU()
    stats = np.array(metric._extract_corpus_statistics(hyps, [refs]), dtype=float)
    ours = float(corpus.METRICS[name](stats.sum(axis=0)))
    assert ours == pytest.approx(metric.corpus_score(hyps, [refs]).score, abs=1e-9)
    assert 0 < ours < 100  # neither trivially perfect nor empty


def test_the_smoke_corpus_keeps_held_out_parts_out_and_s1_is_a_token_bijection() -> None:
    """The base corpus: training frames only (no held-out template, no test sentence), shadow text only
    through π (π⁻¹ of it parses; π′ text would not), and a tokenizer trained on it that gives every word
    and every shadow word one token, so S1 maps token ids one to one."""
    from bem.core.smoke_base import train_tokenizer

    mixture = data.smoke_mixture()
    docs = mixture.documents()[:4000]
    pi = scramble.Shadow(0)
    test_sources = {e.source for e in data.make_examples("test", 200, 0)}
    for context, target in docs:
        text = (context + target).strip()
        if text.startswith(scramble.SHADOW_PREFIX):
            sentences = [s + " ." for s in pi.invert(text).split(" .") if s.strip()]
        elif data.TRANSLATE_CUE in text or data.ANSWER_CUE in text:
            sentences = [context.strip().rsplit(" .", 1)[0] + " ."]  # the source, before its cue
            assert sentences[0] not in test_sources
        else:
            sentences = [s + " ." for s in text.split(" .") if s.strip()]
        for sentence in sentences:
            frame, _ = lang.parse(sentence.strip())
            assert data.template_of(frame) not in data.HELD_OUT_TEMPLATES, sentence
    tokenizer = train_tokenizer([c + t for c, t in docs], mixture.recipe.vocab_size)
    for word in lang.vocabulary():
        for w in (word, pi.table[word]):
            assert len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
