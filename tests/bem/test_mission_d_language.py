"""Mission D's language and scramblers: every surface reads back to its frame, S1 is a bijection onto a
disjoint vocabulary, S2 and S3 keep the meaning (checked by parsing their output, not assumed), and
every view is a function of (text, seed)."""

from __future__ import annotations

import contextlib
import itertools
import random

import pytest

from bem.missions.mission_d import language as lang
from bem.missions.mission_d import scramble

FRAMES = [lang.random_frame(random.Random(i)) for i in range(60)]


def sentences() -> list[str]:
    return [lang.realise(f) for f in FRAMES]


def test_the_vocabulary_is_the_size_asked_and_every_word_is_unambiguous() -> None:
    words = lang.vocabulary()
    assert 150 <= len(words) <= 250
    assert len(set(words)) == len(words) == len(lang.FORMS)  # _forms raises on a word with two readings


def test_every_surface_of_every_frame_parses_back_to_it() -> None:
    for frame in FRAMES[:20]:
        content = sorted(lang.content_lexemes(frame))
        for order, voice in itertools.product(lang.ORDERS, lang.VOICES):
            for synonyms in (frozenset(), frozenset(content), frozenset(content[::2])):
                surface = lang.Surface(order, voice, synonyms)
                text = lang.realise(frame, surface)
                assert lang.parse(text) == (frame, surface), text


def test_verbs_agree_with_their_subject() -> None:
    sg = lang.NounPhrase("dog", "sg")
    pl = lang.NounPhrase("cat", "pl")
    assert lang.realise(lang.Frame(sg, "chase", pl)) == "the dog chases the cats ."
    assert lang.realise(lang.Frame(pl, "chase", sg)) == "the cats chase the dog ."
    passive = lang.Surface("SVO", "passive")
    assert lang.realise(lang.Frame(sg, "see", pl), passive) == "the cats are seen by the dog ."
    assert lang.realise(lang.Frame(pl, "see", sg), passive) == "the dog is seen by the cats ."
    vso = lang.Surface("VSO", "active", frozenset({"dog", "chase"}))
    assert lang.realise(lang.Frame(sg, "chase", pl), vso) == "pursues the hound the cats ."


@pytest.mark.parametrize(
    "bad", ["the dog chases the cat", "the dog chases the blorp .", "the dog the cat .", "chases the dog ."]
)
def test_what_is_not_a_sentence_is_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(lang.ParseError):
        lang.parse(bad)


def test_s1_is_a_bijection_onto_a_disjoint_shadow_vocabulary() -> None:
    pi, held_out = scramble.Shadow(0), scramble.Shadow(1)
    assert sorted(pi.table) == lang.vocabulary()
    assert len(set(pi.table.values())) == len(pi.table)  # injective, so a bijection onto its image
    assert not set(pi.table.values()) & set(lang.vocabulary())  # disjoint from the language
    assert set(pi.table.values()) == set(held_out.table.values()) and pi.table != held_out.table
    for text in sentences():
        shadowed = pi(text)
        assert pi.invert(shadowed) == text
        assert not set(shadowed.split()) & set(lang.vocabulary())
        assert len(shadowed.split()) == len(text.split())  # length-preserving: positions align


def test_s2_and_s3_keep_the_frame_and_change_the_surface() -> None:
    for text in sentences():
        frame, surface = lang.parse(text)
        reordered = scramble.reorder(text, seed=3)
        f2, s2 = lang.parse(reordered)
        assert f2 == frame and s2.order != surface.order and s2.voice == surface.voice
        para = scramble.paraphrase(text, seed=3)
        f3, s3 = lang.parse(para)
        assert f3 == frame and s3.voice != surface.voice and s3.order == surface.order


def test_views_are_functions_of_text_and_seed_and_the_seed_rotates_per_epoch() -> None:
    texts = sentences()
    for rung in scramble.RUNGS:
        assert scramble.views(texts, rung, 7) == scramble.views(texts, rung, 7)
    seeds = [scramble.epoch_seed(1, epoch) for epoch in range(4)]
    assert len(set(seeds)) == 4
    per_epoch = [scramble.views(texts, "S3", s) for s in seeds]
    assert len({tuple(v) for v in per_epoch}) == 4  # other views each epoch


def test_the_shuffle_control_does_not_keep_the_meaning() -> None:
    """The negative control must be one: most shuffled sentences no longer say their frame."""
    kept = 0
    for text in sentences():
        with contextlib.suppress(lang.ParseError):
            kept += lang.parse(scramble.shuffle(text, 0))[0] == lang.parse(text)[0]
    assert kept < len(FRAMES) // 4
