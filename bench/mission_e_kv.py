"""KV-only arms on Mission E's smoke base: passkey far past the training length at a fixed budget.

`python bench/mission_e_kv.py [--cache DIR] [--budget 256] [--n 4]` finds (or pretrains) the smoke base
and answers passkey samples (`n` at each of five depths) at 512, 1k and 2k tokens with full KV and with
each eviction policy holding `budget` tokens per layer, fed in 64-token chunks (`driver.answer`).
Scored with `string_match_all`. Full KV runs positions the base never trained on (its sequences were
384 tokens); the evicting arms never pass budget + chunk. Writes bench/results/mission_e_kv.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bem.missions.mission_e import data, driver, kv, tasks

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
LENGTHS = (512, 1024, 2048)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".fleet/cache"))
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--n", type=int, default=4)
    args = p.parse_args()
    console = Console()

    def log(message: str) -> None:
        console.print(f"  {message}", highlight=False)

    path, model, tok, count = data.smoke_model(args.cache, log)
    driver.eager(model)

    arms: dict[str, tuple[kv.Policy, int]] = {
        "full KV": (kv.Window(), 10**9),
        "window": (kv.Window(), args.budget),
        "StreamingLLM": (kv.StreamingLLM(), args.budget),
        "H2O": (kv.H2O(), args.budget),
        "SnapKV": (kv.SnapKV(), args.budget),
    }
    table = Table(title=f"passkey, {path.name}, budget {args.budget} tokens/layer, string_match_all")
    table.add_column("arm")
    for n in LENGTHS:
        table.add_column(f"{n} tokens", justify="right")
    table.add_column("s / sample", justify="right")
    results: dict[str, dict[str, float]] = {}
    samples = {n: [tasks.passkey(random.Random(f"kv/{n}/{d}/{i}"), n, d, count) for d in DEPTHS
                   for i in range(args.n)] for n in LENGTHS}  # fmt: skip
    for arm, (policy, budget) in arms.items():
        row: dict[str, float] = {}
        began, runs = time.perf_counter(), 0
        for n in LENGTHS:
            scores = []
            for s in samples[n]:
                arm = driver.Arm(model, policy, budget)
                out = driver.answer(arm, tok, s.prompt, chunk=64, max_new_tokens=12).text
                scores.append(tasks.string_match_all(out.split(".")[0], s.answers))
                runs += 1
            row[str(n)] = sum(scores) / len(scores)
        row["seconds_per_sample"] = (time.perf_counter() - began) / runs
        results[arm] = row
        table.add_row(arm, *(f"{row[str(n)]:.2f}" for n in LENGTHS), f"{row['seconds_per_sample']:.2f}")
    console.print(table)
    out = Path("bench/results/mission_e_kv.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"base": str(path), "budget": args.budget, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
