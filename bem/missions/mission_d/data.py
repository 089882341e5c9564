"""Mission D's tasks, generated from frames (missions_cde.md D.4): translation into a pseudo-language and
role extraction, with the splits the gates read.

- **Translation.** The source is the frame said plainly (SVO, active, canonical words); the target is
  the frame in a verb-final pseudo-language with case markers: `agent ka patient ro verb.`, each noun
  phrase as noun (+ `en` when plural) and adjective after it, a prepositional phrase as its noun phrase
  and a postposition after the patient. Every lexeme has one pseudo-word (`PSEUDO`). Because the target
  is a function of the frame, a meaning-preserving view of the source keeps the same target.
- **Role extraction.** The sentence, then `agent?`, `patient?` or `action?`; the answer is the
  canonical lexeme (a synonym in the view still asks for the canonical word). Scored by EM.
- **Splits.** A frame's template is the shape of its sentence (which noun phrases carry an adjective,
  whether there is a prepositional phrase, the two numbers). `HELD_OUT_TEMPLATES` never appear in
  training: the OOD set of held-out template combinations. `longer` joins k examples into one (the 2×
  and 4× OOD lengths).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bem.core.draws import distinct
from bem.missions.mission_d import language as lang
from bem.missions.mission_d import scramble

QUESTIONS = ("agent", "patient", "action")
SPLITS = ("train", "test", "ood_template")
_SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ri", "sa", "to", "vu", "xe", "da", "fo", "gi", "ju", "wa")
_RESERVED = {"ka", "ro", "en"}  # the pseudo-language's case markers and plural suffix


def _pseudo_words() -> dict[str, str]:
    """One pseudo-word per canonical lexeme (nouns, verbs, adjectives, prepositions), drawn once."""
    lexemes = [c for c, _ in (*lang.NOUNS, *lang.VERBS, *lang.ADJECTIVES)] + list(lang.PREPOSITIONS)
    rng = random.Random("mission_d/pseudo")
    out: dict[str, str] = {}
    taken = set(_RESERVED)
    for lexeme in lexemes:
        while True:
            word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
            if word not in taken:
                break
        taken.add(word)
        out[lexeme] = word
    return out


PSEUDO = _pseudo_words()


def _target_np(np: lang.NounPhrase) -> list[str]:
    noun = PSEUDO[np.noun] + ("en" if np.number == "pl" else "")
    return [noun] + ([PSEUDO[np.adjective]] if np.adjective is not None else [])


def translate(frame: lang.Frame) -> str:
    """The frame in the pseudo-language (module docstring)."""
    patient = _target_np(frame.patient)
    if frame.pp is not None:
        prep, np = frame.pp
        patient += [*_target_np(np), PSEUDO[prep]]
    # Detokenised, as sacrebleu expects of what it scores: the full stop sits on the verb.
    return " ".join([*_target_np(frame.agent), "ka", *patient, "ro", PSEUDO[frame.verb]]) + "."


def answer(frame: lang.Frame, question: str) -> str:
    if question == "agent":
        return frame.agent.noun
    if question == "patient":
        return frame.patient.noun
    if question == "action":
        return frame.verb
    raise ValueError(f"unknown question {question!r}; questions: {QUESTIONS}")


Template = tuple[bool, bool, bool, str, str]  # agent adjective, patient adjective, pp, the two numbers


def template_of(frame: lang.Frame) -> Template:
    return (
        frame.agent.adjective is not None,
        frame.patient.adjective is not None,
        frame.pp is not None,
        frame.agent.number,
        frame.patient.number,
    )


# Held out of training: four of the 32 shapes, each with both adjectives or a plural-plural pair.
HELD_OUT_TEMPLATES: frozenset[Template] = frozenset(
    {(True, True, True, "pl", "pl"), (True, True, False, "sg", "pl"), (False, True, True, "pl", "pl"),
     (True, False, True, "pl", "sg")}
)  # fmt: skip


@dataclass(frozen=True)
class Example:
    example_id: str
    frame: lang.Frame
    source: str  # the frame said plainly: SVO, active, canonical words
    target: str  # its translation
    question: str
    answer: str

    @property
    def qa_prompt(self) -> str:
        return f"{self.source} {self.question}?"


def make_examples(split: str, n: int, seed: int) -> list[Example]:
    """`n` distinct examples of a split; the same arguments give the same list. `train` and `test` hold
    the templates not held out (a frame's split is a hash of its sentence); `ood_template` the held
    out ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")
    rng = random.Random(f"mission_d/{seed}/{split}")

    def draw() -> tuple[str, lang.Frame] | None:
        frame = lang.random_frame(rng)
        source = lang.realise(frame)
        return (source, frame) if _split_of(frame, source) == split else None

    out = []
    for i, frame in enumerate(distinct(n, draw, f"{split} examples")):
        source, question = lang.realise(frame), QUESTIONS[i % len(QUESTIONS)]
        ex_id = f"{split}-{i:05d}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"
        out.append(Example(ex_id, frame, source, translate(frame), question, answer(frame, question)))
    return out


def _split_of(frame: lang.Frame, source: str) -> str:
    if template_of(frame) in HELD_OUT_TEMPLATES:
        return "ood_template"
    return "test" if int(hashlib.sha1(source.encode()).hexdigest(), 16) % 5 == 0 else "train"


def longer(examples: Sequence[Example], k: int) -> list[tuple[str, str]]:
    """(source, target) pairs of k consecutive examples joined: the 2× and 4× OOD lengths."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    groups = [examples[i : i + k] for i in range(0, len(examples) - k + 1, k)]
    return [(" ".join(e.source for e in g), " ".join(e.target for e in g)) for g in groups]


TRANSLATE_CUE, ANSWER_CUE = " translate:", " answer:"


def translation_prompt(source: str) -> str:
    return f" {source}{TRANSLATE_CUE}"


def qa_prompt(source: str, question: str) -> str:
    return f" {source} {question}?{ANSWER_CUE}"


def smoke_mixture() -> Any:
    """Mission D's base corpus: the language in every surface, the shadow language (S1 through π) as
    separate documents, never paired with their originals (as Dufter & Schütze pretrain on English and
    a disjoint "Fake-English"), and both tasks on training frames. Every word follows a space, so
    each word and each shadow word is one token and S1 is a bijection of token ids. The held-out π′
    and the held-out templates never appear."""
    from bem.core.smoke_base import Mixture, Recipe, Source

    pi = scramble.Shadow(0)

    def frame(rng: random.Random) -> lang.Frame:
        while True:
            f = lang.random_frame(rng)
            if _split_of(f, lang.realise(f)) == "train":
                return f

    def said(rng: random.Random) -> str:
        f = frame(rng)
        content = sorted(lang.content_lexemes(f))
        synonyms = frozenset(c for c in content if rng.random() < 0.5)
        return lang.realise(f, lang.Surface(rng.choice(lang.ORDERS), rng.choice(lang.VOICES), synonyms))

    def sentences(rng: random.Random) -> str:
        return " " + " ".join(said(rng) for _ in range(3))

    def shadow(rng: random.Random) -> str:
        return " " + " ".join(pi(said(rng)) for _ in range(3))

    def translation(rng: random.Random) -> tuple[str, str]:
        f = frame(rng)
        return translation_prompt(lang.realise(f)), f" {translate(f)}"

    def roles(rng: random.Random) -> tuple[str, str]:
        f = frame(rng)
        question = rng.choice(QUESTIONS)
        return qa_prompt(lang.realise(f), question), f" {answer(f, question)}"

    # 2,048 tokens: the language's ~200 words, as many shadow words and the pseudo-language's each
    # need their own token and the merges that lead to it; 1,024 left some words in pieces.
    recipe = Recipe(
        vocab_size=2048,
        num_hidden_layers=2,
        intermediate_size=256,
        seq_len=96,
        batch_size=64,
        steps=1600,
        warmup=300,
    )
    return Mixture(
        name="mission_d",
        sources=(
            Source("sentences", 0.3, sentences),
            Source("shadow", 0.3, shadow),
            Source("translation", 0.25, translation),
            Source("roles", 0.15, roles),
        ),
        recipe=recipe,
    )
