"""Compositional synthetic tasks for Mission A (BEM_SPEC.md section 6): each example needs one to
three skills in order, and carries its gold plan.

- retrieve: look a fact up in the context table ("age: ada 12, bo 7, cy 19");
- reason: arithmetic or a comparison over values (retrieved, or given in the question);
- formalise: write the answer in a required format (`{"answer": ...}`).

The composite questions chain them (retrieve -> reason -> formalise); single-skill sets train one
expert each. Everything is short ASCII that a byte-level model learns on a CPU, drawn from one
`random.Random` per (seed, kind, split), with an `example_id` that is a digest of the content, so a
seed pins the data. The index-swap set re-renders an example's context table (shuffled, reversed,
partly or heavily corrupted, duplicated) to test that answers depend on the table the way they should.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from bem.core.draws import distinct

SKILLS: tuple[str, ...] = ("retrieve", "reason", "formalise")
NAMES = ("ada", "bo", "cy", "di", "ed", "flo", "gus", "hal", "ivy", "jo")
ATTRIBUTES = ("age", "score", "rank")
# Smoke values are small so that sums stay a fact table a tiny base can learn (400 of them; the full
# profile draws up to 99, for enough distinct sums, see recipe.Profile.value_max); a table holds
# one attribute, so each value sits right after the name that keys it (one hop, which a smoke base
# with a token shift learns in minutes; name -> attribute -> value was two hops, and stayed near
# chance).
VALUE_MAX = 20
# `format` draws from these and the names: enough distinct prompts for the full profile's 2,000.
FORMAT_MAX = 9999
# The cue ends without a space and the target starts with one: BPE writes " 12" as one token, and a
# base that has only ever seen values as " 12" cannot be asked for "12" after a lone " ".
ANSWER_CUE = "\nanswer:"

# Composite kinds and their gold plans; the single-skill kinds train one expert each.
PLANS: dict[str, tuple[str, ...]] = {
    "lookup": ("retrieve",),
    "lookup_sum": ("retrieve", "reason"),
    "lookup_compare": ("retrieve", "reason"),
    "lookup_format": ("retrieve", "formalise"),
    "lookup_sum_format": ("retrieve", "reason", "formalise"),
    "sum": ("reason",),
    "format": ("formalise",),
}
COMPOSITE = ("lookup", "lookup_sum", "lookup_compare", "lookup_format", "lookup_sum_format")
SINGLE_SKILL = {"retrieve": ("lookup",), "reason": ("sum",), "formalise": ("format",)}
SWAPS = ("clean", "shuffled", "reversed", "partial", "heavy", "duplicated")

Table = tuple[tuple[str, dict[str, int]], ...]


@dataclass(frozen=True)
class SkillExample:
    example_id: str
    kind: str
    split: str
    table: Table  # empty for the context-free kinds (sum, format)
    question: str
    golds: tuple[str, ...]
    plan: tuple[str, ...]

    @property
    def prompt(self) -> str:
        context = f"context: {render_table(self.table)}\n" if self.table else ""
        return f"{context}question: {self.question}{ANSWER_CUE}"

    @property
    def target(self) -> str:
        return " " + self.golds[0]


def render_table(table: Table) -> str:
    """`age: ada 12, bo 7`: the attribute once, then each name right before its value."""
    (attr,) = {a for _, attrs in table for a in attrs}
    return f"{attr}: " + ", ".join(f"{name} {attrs[attr]}" for name, attrs in table)


def _table(rng: random.Random, rows: int, top: int = VALUE_MAX) -> Table:
    attr = rng.choice(ATTRIBUTES[:2])
    return tuple((n, {attr: _value(rng, top)}) for n in rng.sample(NAMES, rows))


def _value(rng: random.Random, top: int = VALUE_MAX) -> int:
    return rng.randint(1, top)


def _corrupt(rng: random.Random, value: int) -> int:
    """Another value in range (for the index swaps' corrupted rows)."""
    return (value - 1 + rng.randint(1, VALUE_MAX - 1)) % VALUE_MAX + 1


def _as_json(answer: str | int) -> str:
    return json.dumps({"answer": answer}, separators=(", ", ": "))


def _lookup(rng: random.Random, top: int) -> tuple[Table, str, list[str]]:
    table = _table(rng, rng.randint(3, 4), top)
    name, attrs = rng.choice(table)
    attr = rng.choice(list(attrs))
    return table, f"what is {name}'s {attr}?", [str(attrs[attr])]


def _lookup_sum(rng: random.Random, top: int) -> tuple[Table, str, list[str]]:
    table = _table(rng, rng.randint(3, 4), top)
    (a, av), (b, bv) = rng.sample(table, 2)
    attr = rng.choice(list(av))
    return table, f"what is {a}'s {attr} plus {b}'s {attr}?", [str(av[attr] + bv[attr])]


def _lookup_compare(rng: random.Random, top: int) -> tuple[Table, str, list[str]]:
    table = _table(rng, rng.randint(3, 4), top)
    while True:
        (a, av), (b, bv) = rng.sample(table, 2)
        attr = rng.choice(list(av))
        if av[attr] != bv[attr]:
            break
        table = _table(rng, len(table), top)
    return table, f"who has the higher {attr}, {a} or {b}?", [a if av[attr] > bv[attr] else b]


def _lookup_format(rng: random.Random, top: int) -> tuple[Table, str, list[str]]:
    table, question, golds = _lookup(rng, top)
    return table, question[:-1] + " as json?", [_as_json(int(golds[0]))]


def _lookup_sum_format(rng: random.Random, top: int) -> tuple[Table, str, list[str]]:
    table, question, golds = _lookup_sum(rng, top)
    return table, question[:-1] + " as json?", [_as_json(int(golds[0]))]


def _sum(rng: random.Random, top: int) -> tuple[Table, str, list[str]]:
    x, y = _value(rng, top), _value(rng, top)
    return (), f"what is {x} plus {y}?", [str(x + y)]


def _format(rng: random.Random, top: int) -> tuple[Table, str, list[str]]:
    value: str | int = rng.randint(1, FORMAT_MAX) if rng.random() < 0.9 else rng.choice(NAMES)
    return (), f"write {value} as json.", [_as_json(value)]


_GENERATORS: dict[str, Callable[[random.Random, int], tuple[Table, str, list[str]]]] = {
    "lookup": _lookup,
    "lookup_sum": _lookup_sum,
    "lookup_compare": _lookup_compare,
    "lookup_format": _lookup_format,
    "lookup_sum_format": _lookup_sum_format,
    "sum": _sum,
    "format": _format,
}
# A fixed partition of question space, so train and test never share an example whatever the seed.
_SPLIT_BUCKETS = {"train": range(0, 16), "val": range(16, 18), "test": range(18, 20)}


def _bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 20


def make_examples(kind: str, split: str, n: int, seed: int, top: int = VALUE_MAX) -> list[SkillExample]:
    """`n` distinct examples of one kind, values in 1..`top`; the same arguments give the same list."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {sorted(_GENERATORS)}")
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; splits: {sorted(_SPLIT_BUCKETS)}")
    rng = random.Random(f"{seed}/{kind}/{split}")

    def draw() -> tuple[str, SkillExample] | None:
        table, question, golds = _GENERATORS[kind](rng, top)
        ex = SkillExample("", kind, split, table, question, tuple(golds), PLANS[kind])
        return (ex.prompt, ex) if _bucket(ex.prompt) in _SPLIT_BUCKETS[split] else None

    out = []
    for i, ex in enumerate(distinct(n, draw, f"{kind}/{split} examples")):
        digest = hashlib.sha1(f"{ex.prompt}\0{ex.target}".encode()).hexdigest()[:8]
        out.append(replace(ex, example_id=f"{kind}-{split}-{i:05d}-{digest}"))
    return out


def make_mixture(
    kinds: tuple[str, ...], split: str, n_per_kind: int, seed: int, top: int = VALUE_MAX
) -> list[SkillExample]:
    return [ex for kind in kinds for ex in make_examples(kind, split, n_per_kind, seed, top)]


def index_swaps(ex: SkillExample, seed: int) -> dict[str, SkillExample]:
    """The example under each index condition; golds stay those of the clean table.

    The table plays the retrieval index. shuffled / reversed / duplicated keep every fact; partial
    corruption changes the values of one row the question does not ask about; heavy corruption changes
    every such row and adds a distractor row. The asked rows never change, so the golds stay right: a
    model that reads the right row keeps its score, one that is distracted by the index loses some.
    """
    if not ex.table:
        raise ValueError(f"{ex.example_id} has no context table")
    rng = random.Random(f"{seed}/{ex.example_id}")
    asked = {name for name, _ in ex.table if re.search(rf"\b{name}\b", ex.question)}
    rows = list(ex.table)
    shuffled = rows[:]
    while len(rows) > 1 and shuffled == rows:
        rng.shuffle(shuffled)
    spare = [i for i, (name, _) in enumerate(rows) if name not in asked]
    partial = rows[:]
    if spare:
        i = rng.choice(spare)
        partial[i] = (rows[i][0], {k: _corrupt(rng, v) for k, v in rows[i][1].items()})
    heavy = [
        (name, attrs if name in asked else {k: _corrupt(rng, v) for k, v in attrs.items()})
        for name, attrs in rows
    ]
    extra = [n for n in NAMES if n not in {name for name, _ in rows}]
    heavy.insert(rng.randrange(len(heavy) + 1), (rng.choice(extra), {a: _value(rng) for a in rows[0][1]}))
    variants = {
        "clean": rows,
        "shuffled": shuffled,
        "reversed": rows[::-1],
        "partial": partial,
        "heavy": heavy,
        "duplicated": [*rows, rows[rng.randrange(len(rows))]],
    }
    return {
        name: replace(ex, example_id=f"{ex.example_id}-{name}", table=tuple(table))
        for name, table in variants.items()
    }


# ---- the smoke base's pretraining mixture (bem.core.smoke_base) -----------------------------------


# Cues the base corpus answers its questions after: never the prompts' `answer:`, so invoking a skill at
# that cue is what an expert learns. Several of them, so that the base learns "a question, a line, a
# word and a colon" rather than one word (measured with bench/mission_a_experts.py: without the
# questions the reason and formalise experts stayed near 0).
CONNECTORS = ("so", "reply", "result", "then", "out")


def smoke_mixture() -> Any:
    """Mission A's base corpus: context tables followed by lookups in plain text (the loss reads the
    lookups, not the random tables), sums and comparisons written out, values with their JSON, and
    the single-skill questions in the prompts' own words answered after other cues (`CONNECTORS`).
    The cues `question:` and `answer:` and the composite questions never appear: answering at the
    mission's cue is the experts' job, and composing skills the fused adapter's and the router's. A
    lookup starts with a space, as names do inside the prompts' questions, so the name is the same
    token in the table, the corpus's lookups and the question."""
    from bem.core.smoke_base import Mixture, Recipe, Source

    def statements(rng: random.Random) -> tuple[str, str]:
        table = _table(rng, rng.randint(2, 5))
        asked = rng.sample(table, rng.randint(1, min(3, len(table))))
        facts = [f" {name}'s {attr} is {value}" for name, attrs in asked for attr, value in attrs.items()]
        return f"{render_table(table)}\n", ".".join(facts) + "."

    def recall(rng: random.Random) -> tuple[str, str]:
        """The table's own `name value` pairs asked back (multi-query associative recall)."""
        table = _table(rng, rng.randint(2, 5))
        asked = rng.sample(table, rng.randint(1, len(table)))
        pairs = ", ".join(f"{name} {value}" for name, attrs in asked for value in attrs.values())
        return f"{render_table(table)}\n", f" {pairs}."

    def sums(rng: random.Random) -> str:
        x, y = _value(rng), _value(rng)
        return f"{x} plus {y} is {x + y}."

    def compare(rng: random.Random) -> str:
        (a, x), (b, y) = [(n, _value(rng)) for n in rng.sample(NAMES, 2)]
        return f"{a} has {x} and {b} has {y}, so {a if x >= y else b} has more."

    def as_json(rng: random.Random) -> str:
        value: str | int = rng.randint(1, FORMAT_MAX) if rng.random() < 0.9 else rng.choice(NAMES)
        return f"{value} in json is {_as_json(value)}"

    def questions(rng: random.Random) -> tuple[str, str]:
        """A single-skill question in the prompts' words, answered after a cue that is not `answer:`.
        Lookups and formats come from the training split only; a sum may be any: a sum is a fact the
        base should know, and the held-out split holds out prompts, not arithmetic."""
        kind = rng.choice(("lookup", "sum", "format"))
        while True:
            table, question, golds = _GENERATORS[kind](rng, VALUE_MAX)
            prompt = SkillExample("", kind, "train", table, question, tuple(golds), PLANS[kind]).prompt
            if kind == "sum" or _bucket(prompt) in _SPLIT_BUCKETS["train"]:
                break
        context = f"{render_table(table)}\n" if table else ""
        return f"{context}{question}\n{rng.choice(CONNECTORS)}:", f" {golds[0]}."

    recipe = Recipe(
        num_hidden_layers=2, intermediate_size=256, seq_len=64, batch_size=64, steps=1600, warmup=300
    )
    return Mixture(
        name="mission_a",
        sources=(
            Source("statements", 0.3, statements),
            Source("recall", 0.2, recall),
            Source("sums", 0.2, sums),
            Source("compare", 0.1, compare),
            Source("json", 0.2, as_json),
            Source("questions", 0.3, questions),
        ),
        recipe=recipe,
    )
