"""Synthetic tasks for the validation experiment (BEM_SPEC.md section 5): JSON generation and summarisation.

The experiment asks whether a controller can tell two tasks apart from the prompt alone and route between
two frozen LoRAs, so the tasks need to be clearly different in kind yet learnable by a tiny byte-level model
in minutes on a CPU. Hence: short ASCII text, templated prose, small value pools, and targets that are
mostly copying (field values for JSON, the lead sentence for summaries). Nothing is downloaded and every
random choice comes from one `random.Random` per (seed, task, split), so a seed pins the data exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bem.core.draws import distinct

TASKS: tuple[str, ...] = ("json", "summary")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Budgets for the byte-level model; tests hold every generated example to them. The target budget is set
# by the worst case of an 8-field JSON record: with readable keys, JSON's quotes and commas alone take ~40
# bytes, so 8 fields cannot fit much under 110. Typical targets are far shorter (3-8 fields, mean ~70).
MAX_PROMPT_CHARS = 220
MAX_TARGET_CHARS = 110

JSON_CUE = "\nJSON: "
SUMMARY_PREFIX = "Summarize: "
SUMMARY_CUE = "\nSummary: "

# Splits are a fixed partition of prompt space, not just different RNG streams: a prompt belongs to the
# split its hash bucket names, whatever the seed. Different streams alone could still draw the same
# example into train and test by chance, which would leak the test set.
_BUCKETS = 20
_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 16), "val": range(16, 18), "test": range(18, 20)}

Value = str | int


@dataclass(frozen=True)
class Example:
    """One prompt/target pair; `fields` keeps the JSON gold as values so scoring needs no re-parse."""

    example_id: str
    task: str
    split: str
    prompt: str
    target: str
    fields: dict[str, Value] | None


@dataclass(frozen=True)
class _Field:
    key: str
    label: str  # how the prose names the field; differs from the key where the key would read badly
    pool: tuple[Value, ...]


def _ints(lo: int, hi: int, step: int = 1) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1, step))


# Canonical field order is the order listed here; targets always follow it.
SCHEMAS: dict[str, tuple[_Field, ...]] = {
    "person": (
        _Field("name", "name", ("Ann", "Bob", "Eve", "Max", "Ivy", "Zoe", "Sam", "Mia", "Leo", "Kim")),
        _Field("age", "age", _ints(18, 90)),
        _Field("city", "city", ("Rome", "Oslo", "Lima", "Bern", "Riga", "Doha", "Kyiv", "Nice")),
        _Field("job", "job", ("chef", "poet", "pilot", "nurse", "judge", "baker", "coder")),
        _Field("pet", "pet", ("cat", "dog", "fish", "owl", "hen", "frog")),
        _Field("kids", "number of kids", _ints(0, 5)),
        _Field("team", "team", ("Reds", "Jets", "Owls", "Suns", "Bees")),
        _Field("rank", "rank", _ints(1, 20)),
    ),
    "book": (
        _Field("title", "title", ("Dune", "Emma", "Heidi", "Walden", "Carrie", "Shogun", "Sula", "Kim")),
        _Field("author", "author", ("Eco", "Woolf", "Poe", "Wilde", "Twain", "Hugo", "Camus", "Kafka")),
        _Field("year", "year", _ints(1850, 2023)),
        _Field("pages", "page count", _ints(90, 900, 10)),
        _Field("genre", "genre", ("drama", "verse", "horror", "crime", "farce", "myth")),
        _Field("lang", "language", ("en", "fr", "de", "es", "it", "pt")),
        _Field("price", "price", _ints(5, 60)),
        _Field("stars", "rating", _ints(1, 5)),
    ),
    "product": (
        _Field("name", "name", ("lamp", "desk", "sofa", "mug", "kettle", "chair", "clock", "rug")),
        _Field("brand", "brand", ("Acme", "Zeno", "Nova", "Orbo", "Lumo", "Vega")),
        _Field("price", "price", _ints(1, 999)),
        _Field("color", "color", ("red", "blue", "green", "black", "white", "grey")),
        _Field("stock", "stock", _ints(0, 500)),
        _Field("kg", "weight in kg", _ints(1, 50)),
        _Field("size", "size", ("S", "M", "L", "XL")),
        _Field("stars", "rating", _ints(1, 5)),
    ),
    "flight": (
        _Field("code", "code", ("BA12", "LH400", "AF77", "KL9", "IB31", "SK88", "AZ610", "TP5")),
        _Field("from", "origin", ("Oslo", "Rome", "Lima", "Paris", "Cairo", "Delhi")),
        _Field("to", "destination", ("Tokyo", "Quito", "Accra", "Seoul", "Perth", "Miami")),
        _Field("day", "day", ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")),
        _Field("gate", "gate", _ints(1, 60)),
        _Field("seats", "seat count", _ints(50, 300)),
        _Field("hours", "duration in hours", _ints(1, 14)),
        _Field("price", "price", _ints(90, 999)),
    ),
    "forecast": (
        _Field("city", "city", ("Oslo", "Rome", "Lima", "Cairo", "Delhi", "Perth", "Quito", "Riga")),
        _Field("day", "day", ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")),
        _Field("sky", "sky", ("clear", "cloudy", "foggy", "sunny", "stormy", "hazy")),
        _Field("temp", "temperature", _ints(-10, 40)),
        _Field("wind", "wind speed", _ints(0, 90)),
        _Field("rain", "rain chance", _ints(0, 100, 5)),
        _Field("uv", "UV index", _ints(0, 11)),
        _Field("alert", "alert", ("none", "storm", "flood", "heat", "frost")),
    ),
}

# Several phrasings so the controller has to read the prompt's content, not memorise one template.
# Each takes the schema noun and the (label, value) pairs in canonical order.
_Clauses = Sequence[tuple[str, str]]


def _and_list(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _possessive(noun: str, clauses: _Clauses) -> str:
    first, *rest = (f"{label} is {value}" for label, value in clauses)
    return f"The {noun}'s " + _and_list([first, *(f"its {c}" for c in rest)]) + "."


def _with(noun: str, clauses: _Clauses) -> str:
    return f"A {noun} with " + _and_list([f"{label} {value}" for label, value in clauses]) + "."


def _sentences(noun: str, clauses: _Clauses) -> str:
    body = " ".join(f"{label[0].upper()}{label[1:]}: {value}." for label, value in clauses)
    return f"Record a {noun}. {body}"


def _whose(noun: str, clauses: _Clauses) -> str:
    return f"Describe a {noun} whose " + _and_list([f"{label} is {value}" for label, value in clauses]) + "."


_JSON_TEMPLATES: tuple[Callable[[str, _Clauses], str], ...] = (_possessive, _with, _sentences, _whose)


def _json_example(rng: random.Random) -> tuple[str, str, dict[str, Value]]:
    noun = rng.choice(sorted(SCHEMAS))
    schema = SCHEMAS[noun]
    chosen = sorted(rng.sample(range(len(schema)), rng.randint(3, 8)))  # sorted keeps canonical order
    fields = {schema[i].key: rng.choice(schema[i].pool) for i in chosen}
    clauses = [(schema[i].label, str(fields[schema[i].key])) for i in chosen]
    prompt = rng.choice(_JSON_TEMPLATES)(noun, clauses) + JSON_CUE
    target = json.dumps(fields, separators=(",", ":"))
    return prompt, target, fields


# Summaries: each topic has lead sentences (the main event, always first, always the target) and shorter
# detail sentences. Slots are filled from _SLOTS; a slot name ending in "2" draws a value distinct from
# the slot without it, so "Reds beat Reds" cannot happen. No decimals, so ". " only ever ends a sentence.
_SLOTS: dict[str, tuple[str, ...]] = {
    "city": ("Oslo", "Rome", "Lima", "Bern", "Cairo", "Delhi", "Perth", "Quito", "Riga", "Nice"),
    "day": ("Monday", "Tuesday", "Friday", "Sunday"),
    "month": ("May", "June", "July", "March", "April"),
    "team": ("the Reds", "the Jets", "the Owls", "the Suns", "the Bees"),
    "player": ("Ortiz", "Mensah", "Kowal", "Ito", "Berg", "Silva"),
    "company": ("Acme", "Zeno", "Nova", "Orbo", "Lumo", "Vega"),
    "thing": ("frog", "beetle", "moss", "spider", "orchid"),
    "n": tuple(str(i) for i in range(2, 100)),
    "score": tuple(str(i) for i in range(0, 6)),
}

_LEADS: dict[str, tuple[str, ...]] = {
    "weather": (
        "Heavy rain hit {city} on {day}, closing {n} roads.",
        "{city} saw {n} mm of rain on {day}.",
        "A heatwave pushed {city} to {n} C on {day}.",
    ),
    "sports": (
        "{Team} beat {team2} {score}-{score2} in {city} on {day}.",
        "{player} scored twice as {team} won the cup.",
        "{Team} signed {player} for {n} million.",
    ),
    "science": (
        "Researchers in {city} found a new {thing} species.",
        "A {city} lab built a battery that lasts {n} years.",
        "Scientists saw a comet {n} times brighter than usual.",
    ),
    "business": (
        "{company} shares rose {n}% after strong sales.",
        "{company} will cut {n} jobs in {city}.",
        "{company} bought {company2} for {n} million.",
    ),
    "travel": (
        "{city} airport will add {n} flights in {month}.",
        "A new train links {city} and {city2} in {n} hours.",
        "Hotels in {city} are {n}% full for {month}.",
    ),
}

_DETAILS: dict[str, tuple[str, ...]] = {
    "weather": (
        "Winds reached {n} km/h.",
        "Trains ran {n} minutes late.",
        "Officials urged care.",
        "More rain is due {day}.",
        "Schools stayed open.",
        "Power failed in {n} homes.",
    ),
    "sports": (
        "The crowd was {n} thousand.",
        "{player} was hurt late on.",
        "The coach praised the defence.",
        "The next game is {day}.",
        "Fans sang to the end.",
    ),
    "science": (
        "The study took {n} years.",
        "It appears in a journal.",
        "More tests are planned.",
        "The team has {n} members.",
        "Peers called it a surprise.",
    ),
    "business": (
        "Analysts expected less.",
        "The CEO spoke on {day}.",
        "Profit hit {n} million.",
        "Rivals fell {n}%.",
        "Staff learned by email.",
    ),
    "travel": (
        "Tickets go on sale {day}.",
        "Fares start at {n} euros.",
        "Tourism rose {n}% last year.",
        "Locals welcomed the news.",
        "Taxis are scarce.",
    ),
}

TOPICS: tuple[str, ...] = tuple(_LEADS)


def _fill(template: str, rng: random.Random) -> str:
    """Fill `{slot}` markers; `{Slot}` is the capitalised value, `{slot2}` differs from `{slot}`."""
    values: dict[str, str] = {}
    out = template
    while "{" in out:
        start = out.index("{")
        name = out[start + 1 : out.index("}", start)]
        base = name.lower()
        if base not in values:
            pool = _SLOTS[base.rstrip("2")]
            taken = values.get(base[:-1]) if base.endswith("2") else None
            values[base] = rng.choice([v for v in pool if v != taken])
        value = values[base]
        out = out.replace("{" + name + "}", value[0].upper() + value[1:] if name[0].isupper() else value, 1)
    return out


def _summary_example(rng: random.Random) -> tuple[str, str, None]:
    topic = rng.choice(TOPICS)
    lead = _fill(rng.choice(_LEADS[topic]), rng)
    details = [_fill(t, rng) for t in rng.sample(_DETAILS[topic], rng.randint(2, 4))]
    paragraph = " ".join([lead, *details])
    return SUMMARY_PREFIX + paragraph + SUMMARY_CUE, lead, None


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, dict[str, Value] | None]]] = {
    "json": _json_example,
    "summary": _summary_example,
}


def _check_name(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")


def _digest(prompt: str, target: str) -> str:
    return hashlib.sha1(f"{prompt}\x00{target}".encode()).hexdigest()


def _bucket(prompt: str) -> int:
    return int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % _BUCKETS


def make_split(task: str, split: str, n: int, seed: int) -> list[Example]:
    """`n` distinct examples of `task` for `split`; the same arguments always give the same list."""
    _check_name("task", task, TASKS)
    _check_name("split", split, SPLITS)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed goes through SHA-512 inside random, so it is stable across runs (hash() is salted).
    rng = random.Random(f"{seed}/{task}/{split}")
    generate, buckets = _GENERATORS[task], _SPLIT_BUCKETS[split]

    def draw() -> tuple[str, tuple[str, str, dict[str, Value] | None]] | None:
        prompt, target, fields = generate(rng)
        return (prompt, (prompt, target, fields)) if _bucket(prompt) in buckets else None

    drawn = distinct(n, draw, f"{task}/{split} examples")
    return [
        Example(f"{task}-{split}-{i:05d}-{_digest(prompt, target)[:8]}", task, split, prompt, target, fields)
        for i, (prompt, target, fields) in enumerate(drawn)
    ]


def make_dataset(seed: int, sizes: dict[str, int]) -> dict[str, list[Example]]:
    """Each requested split holds `sizes[split]` examples of every task, JSON first, then summary."""
    for split in sizes:
        _check_name("split", split, SPLITS)
    return {
        split: [ex for task in TASKS for ex in make_split(task, split, n, seed)] for split, n in sizes.items()
    }


# ---- the smoke base's pretraining mixture (bem.core.smoke_base) -----------------------------------


def _train_prompt(task: str, rng: random.Random) -> tuple[str, str]:
    """A training-split prompt's body (no cue) and its target: the base never reads a val or test input."""
    while True:
        prompt, target, _ = _GENERATORS[task](rng)
        if _bucket(prompt) in _SPLIT_BUCKETS["train"]:
            cue = JSON_CUE if task == "json" else SUMMARY_CUE
            return prompt.removeprefix(SUMMARY_PREFIX).removesuffix(cue), target


def smoke_mixture() -> Any:
    """The validation experiment's base corpus: its two formats in plain text (a record described, then
    its JSON; a news paragraph, then its lead repeated), the prose alone, and associative recall in
    the same words. The cues `JSON:` and `Summarize:`/`Summary:` never appear: mapping a cue to a
    skill is the adapters' job."""
    from bem.core.smoke_base import Mixture, Source, recall_source

    def record(rng: random.Random) -> str:
        prose, target = _train_prompt("json", rng)
        return f"{prose}\n{target}"

    def news(rng: random.Random) -> str:
        prose, lead = _train_prompt("summary", rng)
        return f"{prose}\n{lead}"

    def prose(rng: random.Random) -> str:
        return _train_prompt(rng.choice(TASKS), rng)[0]

    labels = sorted({f.label for schema in SCHEMAS.values() for f in schema})
    values = sorted({str(v) for schema in SCHEMAS.values() for f in schema for v in f.pool})
    return Mixture(
        name="validation",
        sources=(
            Source("record", 0.3, record),
            Source("news", 0.3, news),
            Source("prose", 0.2, prose),
            recall_source(labels, values, 0.2),
        ),
    )
