"""What a mission's smoke base has learnt: greedy probes in its own plain pretraining formats.

`python bench/smoke_base.py --mixture mission_a [--cache DIR]` finds (or pretrains, at most 5 minutes)
the smoke base of that mission's `smoke_mixture()` and prints, over fresh seeded examples:
- lookup: a table, then `name's attr is` -> the bound value (the two-hop retrieval Missions A and B
  rest on);
- json copy: `V in json is` -> `{"answer": V}`;
- sum: `X plus Y is` -> `X+Y.`
Chance for lookup is about one in the table's values. Writes bench/results/smoke_base-<mixture>.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bem.core.models import load_model
from bem.core.smoke_base import smoke_base
from bem.missions.mission_a.data import FORMAT_MAX, VALUE_MAX, _table, render_table

Probe = Callable[[random.Random], tuple[str, str]]


def lookup(rng: random.Random) -> tuple[str, str]:
    table = _table(rng, rng.randint(2, 4))
    name, attrs = rng.choice(table)
    attr = rng.choice(list(attrs))
    return f"{render_table(table)}\n {name}'s {attr} is", f" {attrs[attr]}"


def json_copy(rng: random.Random) -> tuple[str, str]:
    v = rng.randint(1, FORMAT_MAX)
    return f"{v} in json is", f' {{"answer": {v}}}'


def sums(rng: random.Random) -> tuple[str, str]:
    x, y = rng.randint(1, VALUE_MAX), rng.randint(1, VALUE_MAX)
    return f"{x} plus {y} is", f" {x + y}."


PROBES: dict[str, Probe] = {"lookup": lookup, "json copy": json_copy, "sum": sums}


def accuracy(model: torch.nn.Module, tokenizer, probe: Probe, n: int, seed: int) -> float:  # type: ignore[no-untyped-def]
    rng, right = random.Random(seed), 0
    for _ in range(n):
        prompt, want = probe(rng)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # type: ignore[operator]
        right += tokenizer.decode(out[0, ids.shape[1] :]).startswith(want)
    return right / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixture", default="mission_a", choices=["validation", "mission_a", "mission_b"])
    p.add_argument("--cache", type=Path, default=Path(".fleet/cache"))
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    console = Console()
    mixture = importlib.import_module(f"bem.missions.{args.mixture}.data").smoke_mixture()
    path = smoke_base(args.cache, mixture, log=lambda m: console.print(f"  {m}", highlight=False))
    pretrain = json.loads((path / "pretrain.json").read_text())
    model, tokenizer = load_model(path)
    scores = {name: accuracy(model, tokenizer, probe, args.n, seed=5) for name, probe in PROBES.items()}
    table = Table(title=f"smoke base {path.name}: {pretrain['steps_run']} steps, {pretrain['seconds']} s")
    for col in ("probe", f"accuracy (n = {args.n})"):
        table.add_column(col)
    for name, acc in scores.items():
        table.add_row(name, f"{acc:.2f}")
    console.print(table)
    out = Path(__file__).parent / "results" / f"smoke_base-{args.mixture}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"base": path.name, "pretrain": pretrain, "accuracy": scores}, indent=2))


if __name__ == "__main__":
    main()
