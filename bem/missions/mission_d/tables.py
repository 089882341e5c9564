"""Mission D's tables from a run's summaries, for a report or a closing note.

`python -m bem.missions.mission_d.tables DIR [--json OUT]` reads every seed's `summary.json` under DIR
(a fleet home's `runs/<mission>` folder, or a recipe's out_dir) and prints, as means over seeds:
- per arm: clean chrF, BLEU and EM, chrF on each rung's view, the OOD sets, steps and training FLOPs;
- per rung and layer (0 = embeddings): RRS, Ret@1 and LDC of the view id, for each main arm.
The gates' intervals are in the mission's report (`fleetctl report`); these are the point values.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

TASK = ("chrf", "bleu", "em", "chrf_s1", "chrf_s2", "chrf_s3", "chrf_s4", "em_s4", "eqe")
OOD = ("chrf_pi_prime", "chrf_ood_template", "em_ood_template", "chrf_long2", "chrf_long4")
LAYER_METRICS = ("rrs", "ret1", "ldc")


def summaries(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.rglob("summary.json")):
        summary = json.loads(path.read_text())
        if "sep" in summary.get("arms", {}) or "no_pairing" in summary.get("arms", {}):
            out.append(summary)
    if not out:
        raise SystemExit(f"no Mission D summary.json under {folder}")
    return out


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def arm_table(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    arms = list(runs[0]["arms"])
    out: dict[str, dict[str, float]] = {}
    for arm in arms:
        row: dict[str, float] = {}
        for key in (*TASK, *OOD):
            row[key] = mean([r["arms"][arm]["means"][key] for r in runs if key in r["arms"][arm]["means"]])
        row["steps"] = mean([sum(s["steps"] for s in r["arms"][arm]["stages"]) for r in runs])
        row["tflops"] = mean([r["arms"][arm]["flops"] / 1e12 for r in runs])
        out[arm] = row
    return out


def layer_table(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{arm: {rung: {layer: {metric: mean over seeds}}}} for the arms scored on views."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for arm, detail in runs[0]["arms"].items():
        if "layers" not in detail:
            continue
        out[arm] = {
            rung: {
                layer: {
                    m: mean([r["arms"][arm]["layers"][rung][layer][m] for r in runs]) for m in LAYER_METRICS
                }
                for layer in layers
            }
            for rung, layers in detail["layers"].items()
        }
    return out


def fmt(x: float) -> str:
    return "—" if x != x else f"{x:.3g}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bem.missions.mission_d.tables", description=__doc__.splitlines()[0]
    )
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path, help="also write the tables as JSON here")
    args = p.parse_args(argv)
    runs = summaries(args.folder)
    console = Console(width=240)  # wide tables: one column per rung and layer
    arms, layers = arm_table(runs), layer_table(runs)
    for title, keys in (("task", (*TASK, "steps", "tflops")), ("OOD", OOD)):
        t = Table(title=f"Mission D, {title} (mean of {len(runs)} seeds)")
        t.add_column("arm")
        for k in keys:
            t.add_column(k, justify="right")
        for arm, row in arms.items():
            t.add_row(arm, *(fmt(row[k]) for k in keys))
        console.print(t)
    for metric in LAYER_METRICS:
        t = Table(title=f"{metric} per rung and layer (mean of {len(runs)} seeds)")
        t.add_column("arm")
        rungs = next(iter(layers.values()))
        cols = [(rung, layer) for rung, per in rungs.items() for layer in per]
        for rung, layer in cols:
            t.add_column(f"{rung} {layer.removeprefix('layer')}", justify="right")
        for arm, per_rung in layers.items():
            t.add_row(arm, *(fmt(per_rung[r][layer][metric]) for r, layer in cols))
        console.print(t)
    if args.json:
        args.json.write_text(
            json.dumps({"seeds": len(runs), "arms": arms, "layers": layers}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
