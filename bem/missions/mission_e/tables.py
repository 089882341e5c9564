"""Mission E's tables from a run's summaries, for a report or a closing note.

`python -m bem.missions.mission_e.tables DIR [--json OUT]` reads every seed's `summary.json` under DIR
(a fleet home's `runs/<mission>` folder, or a recipe's out_dir) and prints, as means over seeds:
- accuracy (`string_match_all`) per arm, task and length, at the run's budget;
- per arm: kept tokens, peak state bytes at the largest length, the spike ratio, p50 prefill latency
  per token, the share of tokens BEM's gate wrote, and which KV-only arm each seed's development split
  chose.
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

TASKS = ("passkey", "niah_multikey", "variable_tracking", "acc")


def summaries(folder: Path) -> list[dict[str, Any]]:
    out = [json.loads(p.read_text()) for p in sorted(folder.rglob("summary.json"))]
    out = [s for s in out if "best_kv" in s and "spike_ratio" in s]
    if not out:
        raise SystemExit(f"no Mission E summary.json under {folder}")
    return out


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def lengths(runs: list[dict[str, Any]]) -> list[int]:
    return list(runs[0]["profile"]["eval"]["lengths"])


def accuracy(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """{task: {arm: {length: mean over seeds}}} (a length an arm did not run is left out)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for task in TASKS:
        for arm in runs[0]["arms"]:
            row = {}
            for n in lengths(runs):
                got = [
                    r["arms"][arm]["means"][f"{task}_{n}"]
                    for r in runs
                    if f"{task}_{n}" in r["arms"][arm]["means"]
                ]
                if got:
                    row[n] = mean(got)
            out.setdefault(task, {})[arm] = row
    return out


def arm_facts(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    largest = str(max(lengths(runs)))
    out: dict[str, dict[str, Any]] = {}
    for arm, first in runs[0]["arms"].items():
        shares = [r["arms"][arm].get("written_share") for r in runs]
        out[arm] = {
            "kept_tokens": first["kept_tokens"],
            "peak_bytes": mean(
                [
                    r["arms"][arm]["peak_bytes"][largest]
                    for r in runs
                    if largest in r["arms"][arm]["peak_bytes"]
                ]
            ),
            "spike_ratio": mean([r["spike_ratio"][arm] for r in runs if arm in r["spike_ratio"]]),
            "p50_us_per_token": mean(
                [r["p50_s_per_token"][arm] * 1e6 for r in runs if arm in r["p50_s_per_token"]]
            ),
            "written_share": mean([s for s in shares if s is not None]),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bem.missions.mission_e.tables", description=__doc__.splitlines()[0]
    )
    p.add_argument("folder", type=Path)
    p.add_argument("--json", type=Path, metavar="OUT")
    args = p.parse_args(argv)
    runs = summaries(args.folder)
    console = Console()
    acc = accuracy(runs)
    ns = lengths(runs)
    for task, by_arm in acc.items():
        table = Table(title=f"{task}: string_match_all by length, mean of {len(runs)} seeds")
        table.add_column("arm")
        for n in ns:
            table.add_column(str(n), justify="right")
        for arm, row in by_arm.items():
            table.add_row(arm, *(f"{row[n]:.2f}" if n in row else "" for n in ns))
        console.print(table)
    facts = arm_facts(runs)
    table = Table(title=f"state and cost at {max(ns)} tokens, B = {runs[0]['budget_bytes']:,} bytes")
    for column in ("arm", "kept tokens", "peak state B", "spike ratio", "p50 µs/token", "written"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm, f in facts.items():
        table.add_row(
            arm,
            "all" if f["kept_tokens"] is None else str(f["kept_tokens"]),
            f"{f['peak_bytes']:,.0f}" if f["peak_bytes"] == f["peak_bytes"] else "",
            f"{f['spike_ratio']:.3f}" if f["spike_ratio"] == f["spike_ratio"] else "",
            f"{f['p50_us_per_token']:.0f}" if f["p50_us_per_token"] == f["p50_us_per_token"] else "",
            f"{f['written_share']:.2f}" if f["written_share"] == f["written_share"] else "",
        )
    console.print(table)
    console.print(f"best KV-only arm by seed (development split): {[r['best_kv'] for r in runs]}")
    if args.json:
        args.json.write_text(
            json.dumps({"accuracy": acc, "arms": facts, "best_kv": [r["best_kv"] for r in runs]}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
