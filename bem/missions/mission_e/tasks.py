"""Mission E's long-context tasks, generated offline (missions_cde.md E.2; BEM_SPEC.md section 10).

Each generator builds one sample of about `length` tokens (as `count` measures them: the model's
tokenizer in a run) with its needle(s) at a relative `depth` of the haystack, and the answers that
`string_match_all` looks for in the model's output:

- `passkey`: Landmark Attention's format (task line, repeated garbage unit, "The pass key is K.
  Remember it. K is the pass key.", the question), K in 1..50,000.
- `niah`: RULER's needle-in-a-haystack, "One of the special magic numbers for {key} is: {value}.",
  in its variants (`NIAH`): single, multikey (distractor needles with other keys), multivalue (several
  values for the key) and multiquery (several keys asked at once), over a `noise` haystack (the
  garbage unit) or an `essay` one (sentences from a small grammar; RULER uses Paul Graham's essays,
  which are not shipped). Keys are adjective-noun pairs as RULER draws them with `wonderwords`, from
  word lists here, values 7-digit numbers.
- `variable_tracking`: RULER's VT, one chain of `hops` assignments `VAR X0 = 12345`, `VAR X1 = VAR X0`,
  ... in order at random sorted positions among noise sentences; the answer is every name in the
  chain.
- `babi`: a bAbI qa1 (where is a person?) or qa2 (where is an object a person carried?) world
  simulator, its facts at random positions in noise.

The haystack is filled by bisection on the number of units, as RULER fits `max_seq_length`: the
sample is the longest that `count` keeps within `length`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Count = Callable[[str], int]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NIAH = {  # RULER's synthetic.yaml: keys per sample, values per key, queries, haystack
    "niah_single": (1, 1, 1, "noise"),
    "niah_single_essay": (1, 1, 1, "essay"),
    "niah_multikey": (4, 1, 1, "essay"),
    "niah_multivalue": (1, 4, 1, "essay"),
    "niah_multiquery": (4, 1, 4, "essay"),
}
_ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "eager", "fancy", "fierce",
    "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow", "misty",
    "noble", "odd", "pale", "proud", "quiet", "rapid", "rusty", "silent", "sleepy", "smooth", "sturdy",
    "swift", "tender", "tiny", "vivid", "wild", "wise", "witty", "young", "zealous",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "banjo", "beacon", "biscuit", "canyon", "castle", "cobra", "comet", "compass",
    "falcon", "fern", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern", "lemon",
    "meadow", "mirror", "needle", "orchard", "otter", "parrot", "pebble", "pepper", "quilt", "rocket",
    "saddle", "spruce", "thimble", "tiger", "tulip", "valley", "violin", "walrus", "willow", "zebra",
)  # fmt: skip
_ESSAY = (  # a small grammar of plain sentences: the essay haystack's units
    ("The", "A", "Every", "One"),
    ("founder", "writer", "student", "engineer", "investor", "painter", "teacher", "startup"),
    ("learns", "builds", "questions", "notices", "explains", "changes", "remembers", "ignores"),
    ("the", "a", "some", "every"),
    ("idea", "market", "problem", "habit", "answer", "city", "program", "essay", "rule", "story"),
    ("slowly.", "at first.", "in time.", "without help.", "for years.", "by accident.", "again."),
)
PEOPLE = ("Mary", "John", "Sandra", "Daniel")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("football", "apple", "milk")


@dataclass(frozen=True)
class Sample:
    example_id: str
    task: str
    prompt: str  # context and question: the model continues it
    answers: tuple[str, ...]  # what string_match_all looks for
    depth: float  # where the (first) needle sits, 0 = start of the haystack, 1 = end
    length: int  # the budget in tokens the sample was fitted to


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for one sample: the share of references contained, case-insensitive, in the
    prediction (RULER reports its mean over samples × 100)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


# ---- building a sample of a given length ------------------------------------------------------------


def _fit(build: Callable[[int], str], count: Count, length: int, what: str) -> tuple[str, int]:
    """The largest number of haystack units whose sample `count` keeps within `length` (bisection: the
    count grows with the units), and that sample."""
    if count(build(0)) > length:
        raise ValueError(f"{what}: even with no haystack the sample is over {length} tokens")
    lo, hi = 0, 1
    while count(build(hi)) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= length else (lo, mid)
    return build(lo), lo


def _insert(units: list[str], needles: Sequence[str], depth: float) -> list[str]:
    """The haystack units with the needles together at `depth` (a share of the units before them)."""
    at = round(depth * len(units))
    return [*units[:at], *needles, *units[at:]]


def _in_order(lines: Sequence[str], n: int, depth: float, later: Sequence[float]) -> list[str]:
    """`n` noise units with `lines` among them in order: the first at `depth`, each later one at its
    share (`later`, sorted, in [0, 1)) of the units between the first and the end."""
    first = round(depth * n)
    spots = [first + round(f * (n - first)) for f in later]
    body: list[str] = []
    j = 0
    for i in range(n + 1):
        if i == first:
            body.append(lines[0])
        while j < len(later) and spots[j] == i:
            body.append(lines[j + 1])
            j += 1
        if i < n:
            body.append(NOISE)
    return body


def _essay_units(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(slot) for slot in _ESSAY) for _ in range(n)]


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _id(task: str, length: int, depth: float, index: int) -> str:
    return f"{task}-{length}-d{round(depth * 100):03d}-{index:03d}"


def passkey(rng: random.Random, length: int, depth: float, count: Count, index: int = 0) -> Sample:
    key = str(rng.randint(1, 50_000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def build(n: int) -> str:
        body = _insert([NOISE] * n, [needle], depth)
        return " ".join([PASSKEY_TASK, *body, PASSKEY_QUESTION])

    prompt, _ = _fit(build, count, length, "passkey")
    return Sample(_id("passkey", length, depth, index), "passkey", prompt, (key,), depth, length)


def niah(task: str, rng: random.Random, length: int, depth: float, count: Count, index: int = 0) -> Sample:
    """One of RULER's NIAH variants (`NIAH`). The needles asked about sit together at `depth`; a
    multikey sample's distractors (needles with other keys) are spread at random depths."""
    if task not in NIAH:
        raise ValueError(f"unknown NIAH task {task!r}; tasks: {sorted(NIAH)}")
    n_keys, n_values, n_queries, haystack = NIAH[task]
    taken: set[str] = set()
    keys = [_key(rng, taken) for _ in range(n_keys)]
    values = {k: [str(rng.randint(10**6, 10**7 - 1)) for _ in range(n_values)] for k in keys}
    queried = keys[:n_queries]
    asked = [f"One of the special magic numbers for {k} is: {v}." for k in queried for v in values[k]]
    distractors = [f"One of the special magic numbers for {k} is: {values[k][0]}." for k in keys[n_queries:]]
    spots = [rng.random() for _ in distractors]
    pool_seed = rng.random()  # the essay's units: the same first n for every n, drawn as needed
    query = ", ".join(queried)
    header = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards."
    )
    question = (
        f"What are all the special magic numbers for {query} mentioned in the provided text? "
        f"The special magic numbers for {query} mentioned in the provided text are"
    )

    def build(n: int) -> str:
        units = _essay_units(random.Random(pool_seed), n) if haystack == "essay" else [NOISE] * n
        for needle, spot in sorted(zip(distractors, spots, strict=True), key=lambda p: -p[1]):
            units.insert(round(spot * len(units)), needle)
        return " ".join([header, *_insert(units, asked, depth), question])

    prompt, _ = _fit(build, count, length, task)
    answers = tuple(v for k in queried for v in values[k])
    return Sample(_id(task, length, depth, index), task, prompt, answers, depth, length)


def variable_tracking(
    rng: random.Random, length: int, depth: float, count: Count, index: int = 0, hops: int = 4
) -> Sample:
    """RULER's VT with one chain: its first assignment at `depth`, the rest after it in order at
    random positions (so every assignment is read before the question)."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    later = sorted(rng.random() for _ in range(hops))
    question = (
        f"Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
        f"variables are assigned the value {value}, they are:"
    )
    header = "Memorize and track the chain(s) of variable assignment hidden in the following text."

    def build(n: int) -> str:
        return " ".join([header, *_in_order([line + "." for line in lines], n, depth, later), question])

    prompt, _ = _fit(build, count, length, "variable_tracking")
    return Sample(_id("vt", length, depth, index), "variable_tracking", prompt, tuple(names), depth, length)


def babi(task: str, rng: random.Random, length: int, depth: float, count: Count, index: int = 0) -> Sample:
    """qa1: people move between places, "Where is P?"; qa2: a person picks up an object and moves,
    "Where is the O?". The facts keep their order, the first at `depth`, the rest spread after it."""
    if task not in ("qa1", "qa2"):
        raise ValueError(f"unknown bAbI task {task!r}; tasks: qa1, qa2")
    where: dict[str, str] = {}
    facts: list[str] = []
    for _ in range(4):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        facts.append(f"{person} went to the {place}.")
        where[person] = place
    if task == "qa1":
        subject = rng.choice(sorted(where))
        question, answer = f"Where is {subject}? Answer: {subject} is in the", where[subject]
    else:
        carrier, thing = rng.choice(sorted(where)), rng.choice(OBJECTS)
        destination = rng.choice([p for p in PLACES if p != where[carrier]])
        facts += [f"{carrier} picked up the {thing}.", f"{carrier} went to the {destination}."]
        question, answer = f"Where is the {thing}? Answer: The {thing} is in the", destination
    later = sorted(rng.random() for _ in facts[1:])

    def build(n: int) -> str:
        return " ".join([*_in_order(facts, n, depth, later), question])

    prompt, _ = _fit(build, count, length, task)
    return Sample(_id(task, length, depth, index), task, prompt, (answer,), depth, length)
