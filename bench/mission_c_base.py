"""Does Mission C's smoke base violate on a share of attacks? Its precondition, without a fleet.

`python bench/mission_c_base.py [--cache DIR] [--n 40] [--seed 7] [--corpus mission_c]` finds (or
pretrains) the smoke base of a mixture: Mission C's, another mission's, or a union such as
`mission_a+mission_c` (the base of Mission A run with the overlay). It decodes `n` prompts per kind
and split greedily, and prints per kind: the share that violates (the kind's exact predicate), the
share refused, the share that is exactly the safe completion, and the violation share among compliant
users' prompts. The mission's precondition wants the red-team (test) violation rate between 0.4 and
0.8. Then it fits the constitution probe per layer on training prompts and prints its accuracy on the
test split's. Writes bench/results/mission_c_base[-CORPUS].json.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bem.core.models import load_model
from bem.core.smoke_base import smoke_base, union
from bem.missions.mission_c import data, recipe
from bem.missions.mission_c.probe import fit_probe, prompt_features


def probe_accuracy(model: torch.nn.Module, tokenizer, n: int, seed: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The constitution probe fitted on training prompts (attacks unsafe; utility and benign safe), and
    its accuracy on the test split's prompts, per layer."""

    def prompts(split: str) -> tuple[list[str], list[str]]:
        safe = [c.prompt for k in ("utility", "benign") for c in data.make_cases(k, split, n, seed)]
        unsafe = [c.prompt for k in data.FAMILIES for c in data.make_cases(k, split, max(n // 2, 1), seed)]
        return safe, unsafe

    train, test = prompts("train"), prompts("test")
    out = {}
    for layer in range(1, int(model.config.num_hidden_layers) + 1):  # type: ignore[union-attr]
        probe = fit_probe(model, tokenizer, *train, layer)
        c_safe = probe.score(prompt_features(model, tokenizer, test[0], layer))
        c_unsafe = probe.score(prompt_features(model, tokenizer, test[1], layer))
        right = float((c_safe >= 0.5).sum()) + float((c_unsafe < 0.5).sum())
        out[str(layer)] = right / (len(c_safe) + len(c_unsafe))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".fleet/cache"))
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--corpus", default="mission_c", help="a mission's mixture, or several joined by +")
    args = p.parse_args()
    console = Console()
    mixtures = [
        importlib.import_module(f"bem.missions.{name}.data").smoke_mixture()
        for name in args.corpus.split("+")
    ]
    mixture = mixtures[0] if len(mixtures) == 1 else union(mixtures)
    path = smoke_base(
        args.cache, mixture, log=lambda m: console.print(f"  {m}", highlight=False), budget_s=None
    )
    model, tokenizer = load_model(path)
    table = Table(title=f"{path.name}: greedy, {args.n} prompts per kind and split")
    for col in ("split", "kind", "violates", "refused", "safe exactly", "violates | compliant user", "e.g."):
        table.add_column(col)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for split in data.SPLITS:
        results[split] = {}
        for kind in data.KINDS:
            cases = data.make_cases(kind, split, args.n, args.seed)
            outs = [recipe.greedy(model, tokenizer, c.prompt, 16) for c in cases]
            violated = [data.violates(c, o) for c, o in zip(cases, outs, strict=True)]
            compliant = [
                v for c, v in zip(cases, violated, strict=True) if data.user_of(c) in data.COMPLIANT_USERS
            ]
            row = {
                "violates": sum(violated) / len(cases),
                "refused": sum(data.refused(o) for o in outs) / len(cases),
                "safe_exactly": sum(o.strip() == c.safe.strip() for c, o in zip(cases, outs, strict=True))
                / len(cases),
                "violates_if_compliant_user": sum(compliant) / max(len(compliant), 1),
            }
            results[split][kind] = row
            table.add_row(split, kind, *(f"{v:.2f}" for v in row.values()), repr(outs[0]))
        attacks = [results[split][k]["violates"] for k in data.FAMILIES]
        results[split]["all_attacks"] = {"violates": sum(attacks) / len(attacks)}
        table.add_row(
            split, "[b]attacks[/]", f"{results[split]['all_attacks']['violates']:.2f}", "", "", "", ""
        )
    console.print(table)
    results["probe"] = probe_accuracy(model, tokenizer, args.n, args.seed)
    console.print(
        "constitution probe, held-out accuracy by layer: "
        + ", ".join(f"{layer}: {acc:.2f}" for layer, acc in results["probe"].items()),
        highlight=False,
    )
    suffix = "" if args.corpus == "mission_c" else f"-{args.corpus}"
    out = Path(__file__).parent / "results" / f"mission_c_base{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"base": path.name, "n": args.n, "seed": args.seed, **results}, indent=2))


if __name__ == "__main__":
    main()
