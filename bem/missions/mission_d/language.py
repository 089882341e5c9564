"""Mission D's synthetic language (BEM_SPEC.md section 9, missions_cde.md D.4): semantic frames and
the sentences that express them.

A `Frame` is who does what to whom: an agent, a transitive verb, a patient, each noun with a number
(agreement) and an optional adjective, and an optional prepositional phrase on the patient. One frame
has many surfaces (`realise`): three word orders (SVO, SOV, VSO), active or passive voice, and the
canonical word or its synonym for every content word. `parse` reads any surface back into its frame,
so a test can check that a rewrite kept the meaning rather than trust that it did.

The vocabulary is closed and unambiguous: every surface word belongs to one lexeme and one form, and
the function words (`the`, `is`, `are`, `by`, `.`) mark structure. That is what makes the parse exact.
About 200 word types (`vocabulary()`), the size the issue asks for.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Order = Literal["SVO", "SOV", "VSO"]
Voice = Literal["active", "passive"]
Number = Literal["sg", "pl"]
ORDERS: tuple[Order, ...] = ("SVO", "SOV", "VSO")
VOICES: tuple[Voice, ...] = ("active", "passive")
NUMBERS: tuple[Number, ...] = ("sg", "pl")

# Each content lexeme: (canonical, synonym). Nouns take -s in the plural; the exceptions are spelt out.
NOUNS = (
    ("dog", "hound"), ("cat", "kitty"), ("bird", "fowl"), ("horse", "steed"), ("fox", "vixen"),
    ("wolf", "lobo"), ("child", "kid"), ("farmer", "grower"), ("king", "monarch"), ("queen", "empress"),
    ("doctor", "medic"), ("teacher", "tutor"), ("sailor", "mariner"), ("baker", "cook"),
    ("robot", "android"), ("pilot", "aviator"), ("singer", "vocalist"), ("painter", "artist"),
    ("guard", "sentry"), ("thief", "robber"), ("student", "pupil"), ("judge", "arbiter"),
    ("tree", "oak"), ("river", "stream"),
)  # fmt: skip
PLURALS = {"fox": "foxes", "wolf": "wolves", "child": "children", "thief": "thieves", "kitty": "kitties",
           "empress": "empresses"}  # fmt: skip
# Verbs: (canonical, synonym); present singular adds -s, participle adds -ed (exceptions spelt out).
VERBS = (
    ("chase", "pursue"), ("see", "spot"), ("help", "assist"), ("follow", "trail"), ("greet", "hail"),
    ("call", "summon"), ("push", "shove"), ("pull", "tug"), ("watch", "observe"), ("find", "locate"),
    ("teach", "train"), ("carry", "haul"),
)  # fmt: skip
PARTICIPLES = {"see": "seen", "find": "found", "teach": "taught", "carry": "carried", "chase": "chased",
               "pursue": "pursued", "observe": "observed", "locate": "located", "shove": "shoved",
               "hail": "hailed", "tug": "tugged"}  # fmt: skip
SINGULAR_VERBS = {"watch": "watches", "teach": "teaches", "carry": "carries", "push": "pushes"}
ADJECTIVES = (
    ("big", "large"), ("small", "tiny"), ("old", "aged"), ("young", "youthful"), ("happy", "glad"),
    ("angry", "furious"), ("quick", "swift"), ("quiet", "silent"), ("brave", "bold"), ("clever", "smart"),
)  # fmt: skip
PREPOSITIONS = ("near", "behind", "under", "beside")
FUNCTION_WORDS = ("the", "is", "are", "by", ".")
PP_NOUNS = ("tree", "river")  # places a prepositional phrase may name


@dataclass(frozen=True)
class NounPhrase:
    noun: str  # canonical lexeme
    number: Number
    adjective: str | None = None  # canonical lexeme


@dataclass(frozen=True)
class Frame:
    agent: NounPhrase
    verb: str  # canonical lexeme
    patient: NounPhrase
    pp: tuple[str, NounPhrase] | None = None  # (preposition, its noun phrase), on the patient


@dataclass(frozen=True)
class Surface:
    """How a frame is said: word order, voice, and which content words take their synonym."""

    order: Order = "SVO"
    voice: Voice = "active"
    synonyms: frozenset[str] = frozenset()  # canonical lexemes said with their synonym


# ---- the lexicon -------------------------------------------------------------------------------------


def _plural(noun: str) -> str:
    return PLURALS.get(noun, noun + "s")


def _singular_verb(verb: str) -> str:
    return SINGULAR_VERBS.get(verb, verb + "s")


def _participle(verb: str) -> str:
    return PARTICIPLES.get(verb, verb + "ed")


CONTENT = {**dict(NOUNS), **dict(VERBS), **dict(ADJECTIVES)}  # canonical -> synonym


def _forms() -> tuple[dict[str, tuple[str, str, str]], frozenset[str]]:
    """Every surface word -> (part of speech, canonical lexeme, form); and the words that are a
    synonym's forms."""
    out: dict[str, tuple[str, str, str]] = {}
    synonyms: set[str] = set()

    def add(word: str, entry: tuple[str, str, str], synonym: bool = False) -> None:
        if word in out and out[word] != entry:
            raise ValueError(f"ambiguous word {word!r}: {out[word]} and {entry}")
        out[word] = entry
        if synonym:
            synonyms.add(word)

    for canon, syn in NOUNS:
        for lex in (canon, syn):
            add(lex, ("noun", canon, "sg"), lex == syn)
            add(_plural(lex), ("noun", canon, "pl"), lex == syn)
    for canon, syn in VERBS:
        for lex in (canon, syn):
            add(lex, ("verb", canon, "pl"), lex == syn)
            add(_singular_verb(lex), ("verb", canon, "sg"), lex == syn)
            add(_participle(lex), ("verb", canon, "participle"), lex == syn)
    for canon, syn in ADJECTIVES:
        for lex in (canon, syn):
            add(lex, ("adj", canon, ""), lex == syn)
    for p in PREPOSITIONS:
        add(p, ("prep", p, ""))
    for w in FUNCTION_WORDS:
        add(w, ("function", w, ""))
    return out, frozenset(synonyms)


FORMS, SYNONYM_WORDS = _forms()


def vocabulary() -> list[str]:
    """Every word type of the language, sorted."""
    return sorted(FORMS)


def content_lexemes(frame: Frame) -> set[str]:
    """The canonical content words a frame uses: the verb, every noun and adjective."""
    nps = [frame.agent, frame.patient] + ([frame.pp[1]] if frame.pp else [])
    return {frame.verb} | {np.noun for np in nps} | {np.adjective for np in nps if np.adjective is not None}


# ---- saying a frame ------------------------------------------------------------------------------------


def _word(canon: str, surface: Surface) -> str:
    return CONTENT[canon] if canon in surface.synonyms else canon


def _noun_phrase(np: NounPhrase, surface: Surface) -> list[str]:
    noun = _word(np.noun, surface)
    words = ["the"]
    if np.adjective is not None:
        words.append(_word(np.adjective, surface))
    return [*words, _plural(noun) if np.number == "pl" else noun]


def realise(frame: Frame, surface: Surface = Surface()) -> str:
    """The sentence, words separated by single spaces, ending in ` .`.

    Active: the agent is the subject and the verb agrees with it. Passive: the patient is the subject,
    `is`/`are` agrees with it, the verb is a participle and the agent follows `by`. The prepositional
    phrase stays with the patient's noun phrase in every order."""
    verb = _word(frame.verb, surface)
    patient = _noun_phrase(frame.patient, surface)
    if frame.pp is not None:
        prep, np = frame.pp
        patient += [prep, *_noun_phrase(np, surface)]
    agent = _noun_phrase(frame.agent, surface)
    if surface.voice == "active":
        subject, rest = agent, patient
        vp = [_singular_verb(verb) if frame.agent.number == "sg" else verb]
    else:
        subject, rest = patient, ["by", *agent]
        vp = ["is" if frame.patient.number == "sg" else "are", _participle(verb)]
    parts = {"SVO": [subject, vp, rest], "SOV": [subject, rest, vp], "VSO": [vp, subject, rest]}
    return " ".join(w for part in parts[surface.order] for w in part) + " ."


# ---- reading it back -----------------------------------------------------------------------------------


class ParseError(ValueError):
    pass


def parse(text: str) -> tuple[Frame, Surface]:
    """The frame a sentence of this language says, and how it says it (the inverse of `realise`)."""
    words = text.split()
    if not words or words[-1] != ".":
        raise ParseError(f"a sentence ends with ' .': {text!r}")
    unknown = [w for w in words if w not in FORMS]
    if unknown:
        raise ParseError(f"words outside the language: {unknown}")
    words = words[:-1]
    synonyms = {FORMS[w][1] for w in words if w in SYNONYM_WORDS}
    verb_at = [i for i, w in enumerate(words) if FORMS[w][0] == "verb"]
    if len(verb_at) != 1:
        raise ParseError(f"one verb expected, found {len(verb_at)}: {text!r}")
    v = verb_at[0]
    passive = v > 0 and words[v - 1] in ("is", "are")
    vp_start = v - 1 if passive else v
    phrases = _noun_phrases(words[:vp_start]) + _noun_phrases(words[v + 1 :])
    # Which side of the verb the phrases lie on gives the order.
    before = len(_noun_phrases(words[:vp_start]))
    order: Order = "VSO" if before == 0 else "SVO" if before == 1 else "SOV"
    lemma = FORMS[words[v]][1]
    if passive:
        by = [p for p in phrases if p[0]]
        if len(by) != 1:
            raise ParseError(f"a passive sentence needs one 'by' phrase: {text!r}")
        patient = next(p for p in phrases if not p[0])
        agent = by[0]
    else:
        if any(p[0] for p in phrases) or len(phrases) != 2:
            raise ParseError(f"an active sentence has two noun phrases and no 'by': {text!r}")
        agent, patient = phrases[0], phrases[1]
    if agent[2] is not None:
        raise ParseError(f"a prepositional phrase belongs to the patient: {text!r}")
    frame = Frame(agent[1], lemma, patient[1], patient[2])
    return frame, Surface(order, "passive" if passive else "active", frozenset(synonyms))


def _noun_phrases(words: Sequence[str]) -> list[tuple[bool, NounPhrase, tuple[str, NounPhrase] | None]]:
    """(after 'by', the phrase, its prepositional phrase) for each noun phrase in `words`."""
    out: list[tuple[bool, NounPhrase, tuple[str, NounPhrase] | None]] = []
    i, by = 0, False
    while i < len(words):
        if words[i] == "by":
            by, i = True, i + 1
            continue
        np, i = _one_np(words, i)
        pp = None
        if i < len(words) and FORMS[words[i]][0] == "prep":
            prep = words[i]
            inner, i = _one_np(words, i + 1)
            pp = (prep, inner)
        out.append((by, np, pp))
        by = False
    return out


def _one_np(words: Sequence[str], i: int) -> tuple[NounPhrase, int]:
    if i >= len(words) or words[i] != "the":
        raise ParseError(f"a noun phrase starts with 'the' at word {i}: {' '.join(words)!r}")
    i += 1
    adjective = None
    if i < len(words) and FORMS[words[i]][0] == "adj":
        adjective, i = FORMS[words[i]][1], i + 1
    if i >= len(words) or FORMS[words[i]][0] != "noun":
        raise ParseError(f"a noun expected at word {i}: {' '.join(words)!r}")
    _, noun, number = FORMS[words[i]]
    return NounPhrase(noun, number, adjective), i + 1  # type: ignore[arg-type]


# ---- drawing frames ------------------------------------------------------------------------------------


def random_frame(rng: random.Random) -> Frame:
    """A frame with distinct agent and patient; adjectives and the prepositional phrase are optional."""
    people = [c for c, _ in NOUNS if c not in PP_NOUNS]
    agent, patient = rng.sample(people, 2)

    def np(noun: str) -> NounPhrase:
        adj = rng.choice(ADJECTIVES)[0] if rng.random() < 0.5 else None
        return NounPhrase(noun, rng.choice(NUMBERS), adj)

    pp = (rng.choice(PREPOSITIONS), np(rng.choice(PP_NOUNS))) if rng.random() < 0.4 else None
    return Frame(np(agent), rng.choice(VERBS)[0], np(patient), pp)
