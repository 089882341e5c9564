"""Mission B's prompt stream (BEM_SPEC.md section 7): the traffic an online learner serves, with
failures injected on a schedule.

Each prompt is a small table of one attribute (`age: ada 12, bo 7`: each value right after its name,
one hop for the smoke base to look up) and a question; the answer is JSON holding the tool call that
fetches the fact and its value, `{"call": "lookup(ada, age)", "answer": 12}`, with the tool's signature
named in the prompt. From its prompt index on, an injected scenario changes what a right answer is,
as production traffic does:
- format_change: the answer key is renamed (`"answer"` becomes `"result"`), with no cue in the prompt;
- domain_shift: a new topic and vocabulary (other names, other attributes);
- new_api_signature: the tool's name and argument order change (`fetch(age, ada)`), announced in the
  prompt's tools line.
Targets come as kinded pieces (structure, call, value), so a scorer can tell a wrong key from a wrong
tool call from a wrong value.
Scenarios stack in schedule order; every item says which are active, so time-to-fix is measured from
each injection. Everything is seeded: the same arguments give the same stream.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from bem.core.train import IGNORE, LMBatch

SCENARIOS = ("format_change", "domain_shift", "new_api_signature")
NAMES = ("ada", "bo", "cy", "di", "ed", "flo", "gus", "hal", "ivy", "jo")
SHIFTED_NAMES = ("kai", "lu", "mo", "ned", "oz", "pia", "quin", "rex", "sol", "tess")
ATTRIBUTES = ("age", "score")
SHIFTED_ATTRIBUTES = ("height", "weight")


@dataclass(frozen=True)
class Fact:
    """What a prompt asks: a table, and the row and attribute whose value answers it."""

    table: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]
    name: str
    attr: str
    value: int


@dataclass(frozen=True)
class StreamItem:
    index: int
    example_id: str
    fact: Fact
    prompt: str
    pieces: tuple[tuple[str, str], ...]  # (kind, text): kinds "structure", "call", "value"
    active: tuple[str, ...]  # the injected scenarios in force at this prompt

    @property
    def target(self) -> str:
        return "".join(text for _, text in self.pieces)


def _render(
    fact: Fact, active: set[str] | tuple[str, ...], key: str | None = None
) -> tuple[str, tuple[tuple[str, str], ...]]:
    name, attr, value = fact.name, fact.attr, fact.value
    context = render_table(fact.table)
    new_api = "new_api_signature" in active
    tool = "fetch(attr, name)" if new_api else "lookup(name, attr)"
    call = f"fetch({attr}, {name})" if new_api else f"lookup({name}, {attr})"
    key = key or ("result" if "format_change" in active else "answer")
    # No space after the cue: the answer's first token is ' {"', as in the base's corpus (BPE).
    prompt = f"tools: {tool}\ncontext: {context}\nquestion: what is {name}'s {attr}?\njson:"
    pieces = (
        ("structure", ' {"call": "'),
        ("call", call),
        ("structure", f'", "{key}": '),
        ("value", str(value)),
        ("structure", "}"),
    )
    return prompt, pieces


INSTRUCTED_KEYS = ("result", "value", "output")


def instructed(item: StreamItem, key: str) -> StreamItem:
    """The same fact with the answer key named in the prompt ("reply key: value"). Deployment trains on
    some of these, so the model can write other keys when told; the stream never tells it."""
    prompt, pieces = _render(item.fact, item.active, key)
    return replace(
        item, example_id=f"{item.example_id}-{key}", prompt=f"reply key: {key}\n{prompt}", pieces=pieces
    )


def render_table(table: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]) -> str:
    """`age: ada 12, bo 7`: the table's one attribute, then each name right before its value."""
    (attr,) = {a for _, values in table for a, _ in values}
    return f"{attr}: " + ", ".join(f"{n} {dict(values)[attr]}" for n, values in table)


def _draw(rng: random.Random, shifted: bool, rows: int) -> Fact:
    names = SHIFTED_NAMES if shifted else NAMES
    attr = rng.choice(SHIFTED_ATTRIBUTES if shifted else ATTRIBUTES)
    table = tuple((n, ((attr, rng.randint(1, 60)),)) for n in rng.sample(names, rows))
    name, values = rng.choice(table)
    return Fact(table, name, attr, dict(values)[attr])


def rerender(item: StreamItem, active: tuple[str, ...]) -> StreamItem:
    """The same fact asked under other scenarios (a canary kept in step with the current contract)."""
    prompt, pieces = _render(item.fact, active)
    return StreamItem(item.index, f"{item.example_id}-{'-'.join(active)}", item.fact, prompt, pieces, active)


def prompt_stream(
    n: int, seed: int, schedule: Sequence[tuple[int, str]] = (), rows: int = 3
) -> Iterator[StreamItem]:
    """`n` prompts over tables of `rows` rows; `schedule` is [(prompt index, scenario)], each scenario
    injected once."""
    for at, scenario in schedule:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; scenarios: {SCENARIOS}")
        if not 0 <= at < n:
            raise ValueError(f"injection {scenario!r} at prompt {at} is outside the stream (0..{n - 1})")
    rng = random.Random(f"online/{seed}")
    active: set[str] = set()
    starts = dict((at, s) for at, s in schedule)
    for i in range(n):
        if i in starts:
            active.add(starts[i])
        fact = _draw(rng, "domain_shift" in active, rows)
        prompt, pieces = _render(fact, active)
        target = "".join(text for _, text in pieces)
        digest = hashlib.sha1(f"{prompt}\0{target}".encode()).hexdigest()[:8]
        yield StreamItem(i, f"stream-{seed}-{i:06d}-{digest}", fact, prompt, pieces, tuple(sorted(active)))


def probe_set(n: int = 256, seed: int = 0, rows: int = 3) -> list[StreamItem]:
    """The fixed probes drift is measured on: clean traffic, never trained on (its own seed space)."""
    return list(prompt_stream(n, seed=10_000 + seed, rows=rows))


PIECE_KINDS = {"structure": 0, "call": 1, "value": 2}


@dataclass
class Encoded:
    batch: LMBatch
    kinds: Tensor  # [B, T]: the piece kind of each labelled position (EOS counts as structure), -1 elsewhere


def target_tokens(
    tokenizer: PreTrainedTokenizerBase, pieces: Sequence[tuple[str, str]]
) -> tuple[list[int], list[int]]:
    """The target's token ids and each token's piece kind.

    A BPE tokenizer merges across piece boundaries (`)",` closes a call and opens the structure), so
    the target is tokenised whole, as the base saw such text in pretraining, and a token takes the kind
    of its first non-space character (` 11` is a value). A slow tokenizer (the byte tokenizer: one
    token per byte, nothing to merge) is tokenised piece by piece, which is then the same thing."""
    if not tokenizer.is_fast:
        ids: list[int] = []
        kinds: list[int] = []
        for kind, text in pieces:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            kinds += [PIECE_KINDS[kind]] * len(piece)
        return ids, kinds
    text = "".join(t for _, t in pieces)
    owner = [PIECE_KINDS[kind] for kind, t in pieces for _ in t]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    kinds = []
    for start, end in enc["offset_mapping"]:
        chars = [i for i in range(start, end) if not text[i].isspace()] or [start]
        kinds.append(owner[min(chars[0], len(owner) - 1)])
    return list(enc["input_ids"]), kinds


def encode_items(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[StreamItem], device: torch.device | str = "cpu"
) -> Encoded:
    """prompt + target + EOS per row, right-padded, on `device`, with each target token's piece kind
    (`target_tokens`). Padding is masked out, so tokenisers without a pad token pad with EOS."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for it in items:
        prompt = tokenizer(it.prompt, add_special_tokens=False)["input_ids"]
        target, kind_ids = target_tokens(tokenizer, it.pieces)
        rows.append((prompt, [*target, tokenizer.eos_token_id], [*kind_ids, PIECE_KINDS["structure"]]))
    width = max(len(p) + len(t) for p, t, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels, kinds = torch.full_like(ids, IGNORE), torch.full_like(ids, -1)
    mask, prompt_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, t, k) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p) : n] = torch.tensor(t)
        kinds[i, len(p) : n] = torch.tensor(k)
        mask[i, :n] = 1
        prompt_mask[i, : len(p)] = 1
    return Encoded(LMBatch(ids, mask, labels, prompt_mask).to(device), kinds.to(device))


# ---- the smoke base's pretraining mixture (bem.core.smoke_base) -----------------------------------


# Cues the base corpus answers prompts after: never the served `json:`, so serving at that cue is
# what deployment teaches (as in Mission A's corpus, docs/decisions.md).
CONNECTORS = ("so", "reply", "then", "out", "now")  # not "result": format_change's new key


def smoke_mixture() -> Any:
    """Mission B's base corpus: tables with lookups written out, and the JSON tool-call answers in the
    deployed contract (`lookup(name, attr)`, key "answer"). Nothing of the injected scenarios (other
    names and attributes, `fetch`, other keys) appears: an injection must cost the live model
    something for the learner to fix. Lookups start with a space, as names do in the prompts."""
    from bem.core.smoke_base import Mixture, Source

    def table(rng: random.Random) -> tuple[Fact, str]:
        fact = _draw(rng, False, rng.randint(2, 4))
        return fact, render_table(fact.table)

    def lookups(rng: random.Random) -> tuple[str, str]:
        fact, context = table(rng)
        calls = []
        for name, values in rng.sample(fact.table, rng.randint(1, len(fact.table))):
            attr, value = values[0]
            calls.append(f" lookup({name}, {attr}) = {value}")
        return f"{context}\n", ";".join(calls) + "."

    def recall(rng: random.Random) -> tuple[str, str]:
        """The table's own `name value` pairs asked back (multi-query associative recall)."""
        fact, context = table(rng)
        asked = rng.sample(fact.table, rng.randint(1, len(fact.table)))
        return f"{context}\n", " " + ", ".join(f"{n} {values[0][1]}" for n, values in asked) + "."

    def answers(rng: random.Random) -> tuple[str, str]:
        fact, context = table(rng)
        call = f"lookup({fact.name}, {fact.attr})"
        return f"{context}\n", f' {fact.name}\'s {fact.attr}: {{"call": "{call}", "answer": {fact.value}}}'

    def questions(rng: random.Random) -> tuple[str, str]:
        """A deployed-contract prompt answered after a cue that is not `json:` (see `CONNECTORS`)."""
        fact = _draw(rng, False, rng.randint(1, 4))
        prompt, pieces = _render(fact, ())
        return prompt.removesuffix("json:") + f"{rng.choice(CONNECTORS)}:", "".join(t for _, t in pieces)

    return Mixture(
        name="mission_b",
        sources=(
            Source("lookups", 0.2, lookups),
            Source("answers", 0.3, answers),
            Source("recall", 0.2, recall),
            Source("questions", 0.3, questions),
        ),
    )
