"""The scrambler ladder (BEM_SPEC.md section 9, missions_cde.md D.2 and D.4): views of a sentence that
keep its meaning, each deterministic in (text, seed), with the seed rotated per epoch.

- S1, bijective: every word to a word of a disjoint shadow vocabulary by a fixed permutation π (a
  second one, π′, is held out for OOD). A shared embedding table would otherwise have to make e(t) and
  e(π(t)) equal and lose the distinction between the two tokens; with a disjoint shadow vocabulary the
  question is the cross-lingual one, whether the model learns that shadow-t means t.
- S2, syntax: the same frame said in another word order (SVO, SOV, VSO), by rewriting the parse.
- S3, semantics: the same frame with the other voice and a fresh choice of synonyms.
- `shuffle`: the words in a random order, which keeps no meaning: the negative control only.
S4 (the highest-loss view of rungs 1-3) needs a model and lives with the training code.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from bem.missions.mission_d import language as lang

# Shadow words are z + two letters (zaa, zab, ...): letters only, so a byte-level BPE's pre-tokenizer
# keeps each one whole (it splits letters from digits), and no word of the language starts with z.
SHADOW_PREFIX = "z"


def shadow_word(i: int) -> str:
    if not 0 <= i < 26 * 26:
        raise ValueError(f"shadow word {i} out of range: two letters name 676")
    return SHADOW_PREFIX + chr(ord("a") + i // 26) + chr(ord("a") + i % 26)


def rng_for(text: str, seed: int, rung: str) -> random.Random:
    """The randomness of one view: a function of (text, seed, rung) alone."""
    digest = hashlib.sha256(f"{rung}\0{seed}\0{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def epoch_seed(base_seed: int, epoch: int) -> int:
    """The scramblers' seed for an epoch: rotated, so each epoch sees other views of each sentence."""
    digest = hashlib.sha256(f"epoch\0{base_seed}\0{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class Shadow:
    """S1: a bijection from the language's words onto the shadow vocabulary, drawn from `seed` (π for
    training, another seed for the held-out π′)."""

    seed: int

    @cached_property
    def table(self) -> dict[str, str]:
        words = lang.vocabulary()
        if any(w.startswith(SHADOW_PREFIX) for w in words):
            raise ValueError(f"a word of the language starts with the shadow prefix {SHADOW_PREFIX!r}")
        targets = [shadow_word(i) for i in range(len(words))]
        random.Random(f"shadow\0{self.seed}").shuffle(targets)
        return dict(zip(words, targets, strict=True))

    @cached_property
    def inverse(self) -> dict[str, str]:
        return {v: k for k, v in self.table.items()}

    def __call__(self, text: str) -> str:
        return " ".join(self.table[w] for w in text.split())

    def invert(self, text: str) -> str:
        return " ".join(self.inverse[w] for w in text.split())


def reorder(text: str, seed: int) -> str:
    """S2: the sentence's frame in another word order, the same voice and words."""
    frame, surface = lang.parse(text)
    others = [o for o in lang.ORDERS if o != surface.order]
    order = rng_for(text, seed, "S2").choice(others)
    return lang.realise(frame, lang.Surface(order, surface.voice, surface.synonyms))


def paraphrase(text: str, seed: int) -> str:
    """S3: the sentence's frame in the other voice, each content word's synonym drawn afresh; the
    same order."""
    frame, surface = lang.parse(text)
    rng = rng_for(text, seed, "S3")
    content = sorted(lang.content_lexemes(frame))
    synonyms = frozenset(c for c in content if rng.random() < 0.5)
    voice: lang.Voice = "passive" if surface.voice == "active" else "active"
    return lang.realise(frame, lang.Surface(surface.order, voice, synonyms))


def shuffle(text: str, seed: int) -> str:
    """The negative control: the words (the final `.` kept last) in a random order."""
    words = text.split()
    body = words[:-1]
    rng_for(text, seed, "shuffle").shuffle(body)
    return " ".join([*body, words[-1]])


RUNGS = ("S1", "S2", "S3")


def view(text: str, rung: str, seed: int, shadow: Shadow | None = None) -> str:
    """The rung's view of `text` (S1 through `shadow`, π by default)."""
    if rung == "S1":
        return (shadow or Shadow(0))(text)
    if rung == "S2":
        return reorder(text, seed)
    if rung == "S3":
        return paraphrase(text, seed)
    raise ValueError(f"unknown rung {rung!r}; rungs: {RUNGS} (S4 needs a model)")


def views(texts: Sequence[str], rung: str, seed: int) -> list[str]:
    return [view(t, rung, seed) for t in texts]
