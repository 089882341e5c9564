"""Has Mission E's smoke base learnt the tasks with full KV? Its precondition, without a fleet.

`python bench/mission_e_base.py [--cache DIR] [--n 4]` finds (or pretrains, about 9 minutes on 2 cores)
the smoke base of Mission E's mixture and decodes greedily, full KV, `n` samples at each of five
depths per task and length: passkey, multikey NIAH and variable tracking at 160 and 256 tokens (the
training lengths) and 512 (twice the longest). Scored with `string_match_all` on the answer's first
sentence. The mission's precondition wants passkey ≥ 0.9 at the training length. Writes
bench/results/mission_e_base.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bem.core.generate import greedy_generate
from bem.missions.mission_e import data, tasks

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
LENGTHS = (160, 256, 512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".fleet/cache"))
    p.add_argument("--n", type=int, default=4)
    args = p.parse_args()
    console = Console()

    def log(message: str) -> None:
        console.print(f"  {message}", highlight=False)

    path, model, tok, count = data.smoke_model(args.cache, log)

    makers = {
        "passkey": lambda r, n, d: tasks.passkey(r, n, d, count),
        "niah_multikey": lambda r, n, d: tasks.niah("niah_multikey", r, n, d, count),
        "variable_tracking": lambda r, n, d: tasks.variable_tracking(r, n, d * 0.5, count),
    }
    table = Table(title=f"{path.name}: full KV, greedy, string_match_all")
    table.add_column("task")
    for n in LENGTHS:
        table.add_column(f"{n} tokens", justify="right")
    results: dict[str, dict[str, float]] = {}
    for name, make in makers.items():
        row = {}
        for n in LENGTHS:
            rng = random.Random(f"bench/{name}/{n}")
            samples = [make(rng, n, d) for d in DEPTHS for _ in range(args.n)]
            outs = greedy_generate(model, tok, [s.prompt for s in samples], max_new_tokens=24, batch_size=10)
            scores = [
                tasks.string_match_all(o.split(".")[0], s.answers) for o, s in zip(outs, samples, strict=True)
            ]
            row[str(n)] = sum(scores) / len(scores)
        results[name] = row
        table.add_row(name, *(f"{row[str(n)]:.2f}" for n in LENGTHS))
    console.print(table)
    out = Path("bench/results/mission_e_base.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"base": str(path), "n_per_depth": args.n, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
