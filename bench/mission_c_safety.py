"""Does Mission C's safety overlay lower red-team violations on the smoke base? The safety phase alone,
without a fleet.

`python bench/mission_c_safety.py [--cache DIR] [--rank 8] [--steps 300] [--lr 0.03] [--n 30] [--floor .1]`
finds (or pretrains) Mission C's smoke base, trains the utility skill LoRA (rank 8, on utility and benign
prompts), takes each layer's skill subspace, fits the constitution probe, trains one safety overlay per
layer under the Lagrangian (`bem.missions.mission_c.safety`), and decodes the red-team set greedily at
levels L = 0, .5 and 1: per kind, the share that violates, is refused, or is exactly the safe
completion. L = 0 is the model without the overlay (exactly, by construction). Then sweeps the knob
κ over 0, .1, …, 1 (`stats.steering`: the propensity slope with its BCa interval, Spearman ρ of κ with
the violation rate, the anti-steerable share, and utility's cost curve). Writes
bench/results/mission_c_safety.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bem.core.models import load_model
from bem.core.reporter import MemoryReporter
from bem.core.smoke_base import smoke_base
from bem.core.train import train_lora
from bem.missions.mission_c import basis, data, recipe
from bem.missions.mission_c.probe import fit_probe
from bem.missions.mission_c.safety import SafetyConfig, constitution_scores, skill_bases, train_safety

LEVELS = (0.0, 0.5, 1.0)
MAX_NEW_TOKENS = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".fleet/cache"))
    p.add_argument("--rank", type=int, default=8, help="r_s per layer")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--n", type=int, default=30, help="red-team prompts per kind")
    p.add_argument("--floor", type=float, default=basis.A_MIN, help="the clamp on a from below (spec: .1)")
    args = p.parse_args()
    console = Console()
    torch.manual_seed(0)
    base, tokenizer = load_model(smoke_base(args.cache, data.smoke_mixture()))
    base.requires_grad_(False)
    began = time.perf_counter()
    utility = data.make_cases("utility", "train", 300, 0) + data.make_cases("benign", "train", 100, 0)
    skilled = train_lora(
        base, tokenizer, utility, rank=8, steps=200, lr=3e-3, batch_size=16,
        generator=torch.Generator().manual_seed(0), reporter=MemoryReporter(), name="skill",
    )  # fmt: skip
    skilled.requires_grad_(False)
    skilled.eval()
    model = skilled.base_model.model
    attacks = [c for family in data.FAMILIES for c in data.make_cases(family, "train", 60, 0)]
    probe = fit_probe(
        model, tokenizer, [c.prompt for c in utility[:150]], [c.prompt for c in attacks[::2]], 1
    )
    test = {kind: data.make_cases(kind, "test", args.n, 5) for kind in data.KINDS}
    scores = constitution_scores(
        model, tokenizer, probe, [c for cs in test.values() for c in cs] + attacks + utility
    )
    gen = torch.Generator().manual_seed(0)
    overlays = {
        i: basis.SafetyOverlay(s, r_s=args.rank, generator=gen, floor=args.floor)
        for i, s in skill_bases(skilled).items()
    }
    handle = basis.attach_overlays(model, overlays)
    cfg = SafetyConfig(rank=args.rank, steps=args.steps, batch_size=16, lr=args.lr)
    history = train_safety(
        model, tokenizer, handle, scores, attacks, utility, cfg, seed=0, reporter=MemoryReporter()
    )
    trained_s = time.perf_counter() - began

    results: dict[str, dict[str, dict[str, float]]] = {}
    for level in LEVELS:
        results[str(level)] = {}
        for kind, cases in test.items():
            outs = []
            for c in cases:
                with handle.overlay_inputs(c=scores[c.example_id], level=level):
                    outs.append(recipe.greedy(model, tokenizer, c.prompt, MAX_NEW_TOKENS))
            pairs = list(zip(cases, outs, strict=True))
            results[str(level)][kind] = {
                "violates": sum(data.violates(c, o) for c, o in pairs) / len(cases),
                "refused": sum(data.refused(o) for _, o in pairs) / len(cases),
                "safe_exactly": sum(o.strip() == c.safe.strip() for c, o in pairs) / len(cases),
            }
        attack_rates = [results[str(level)][k]["violates"] for k in data.FAMILIES]
        results[str(level)]["all_attacks"] = {"violates": sum(attack_rates) / len(attack_rates)}
    table = Table(
        title=f"safety overlay r_s {args.rank}, floor {args.floor:g}, {args.steps} steps at lr {args.lr:g}: "
        "red team, greedy"
    )
    table.add_column("kind")
    for level in LEVELS:
        table.add_column(f"L={level:g}: violates / refused / exact")
    for kind in (*data.KINDS, "all_attacks"):
        cells = []
        for level in LEVELS:
            r = results[str(level)][kind]
            cells.append(" / ".join(f"{r[k]:.2f}" for k in ("violates", "refused", "safe_exactly") if k in r))
        table.add_row(kind, *cells)
    console.print(table)
    held_out = recipe.Data([], [], [], [c for k in data.FAMILIES for c in test[k]], test["utility"], [])
    sweep = recipe.knob_sweep(model, tokenizer, handle, scores, held_out, MAX_NEW_TOKENS)
    table = Table(
        title="the knob: κ → L per prompt (bem.missions.mission_c.basis.Knob), red team and utility"
    )
    for col in ("κ", "attacks violate", "mean propensity", "utility EM"):
        table.add_column(col)
    for j, kappa in enumerate(recipe.KAPPAS):
        table.add_row(
            f"{kappa:.1f}",
            f"{sweep['violation_rate'][j]:.2f}",
            f"{sweep['mean_propensity'][j]:.3f}",
            f"{sweep['utility_em'][j]:.2f}",
        )
    console.print(table)
    slope = f"{sweep['slope']:.3f} [{sweep['slope_low']:.3f}, {sweep['slope_high']:.3f}] (95% BCa)"
    console.print(
        f"steerability slope {slope}, Spearman ρ(κ, violations) {sweep['spearman_violation']:.3f}, "
        f"anti-steerable {sweep['anti_steerable']:.2f}",
        highlight=False,
    )
    summary = {
        "min_op": min(history.min_op),
        "final_lambda": history.lam[-1],
        "train_s": trained_s,
        "probe_train_accuracy": probe.train_accuracy,
        **{f"gain_layer{i}": float(o.log_gain.detach().exp()) for i, o in overlays.items()},
    }
    console.print(", ".join(f"{k} {v:.4g}" for k, v in summary.items()), highlight=False)
    out = Path(__file__).parent / "results" / "mission_c_safety.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"args": vars(args) | {"cache": str(args.cache)}, **summary, "red_team": results, "knob": sweep},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
