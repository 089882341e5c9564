"""The v1.3 suite's table from a run's summaries, for a report or a closing note.

`python -m bem.missions.v13.tables DIR [--bench JSON] [--json OUT]` reads every task's `summary.json`
under DIR (a fleet home's `runs/<mission>` folder) and prints one row per arm, as means over seeds: its
scores (corpus chrF and BLEU from each seed's statistics), the medians over seeds of its parity,
memory and latency ratios, and, given `bench/bem_overhead.py`'s JSON, its added forward time over
LoRA's at equal rank. The claims' intervals are in the mission's report (`fleetctl report`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SCORES = ("qa_em", "em", "f1", "chrf", "bleu", "json_valid", "json_fields", "vqa_em", "vqa_em_conflict")
VALUES = ("param_ratio", "flops_ratio", "memory_ratio", "latency_ratio")


def summaries(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """{arm: its seeds' summaries} (the latest attempt of each task)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(folder.rglob("summary.json")):
        s = json.loads(path.read_text())
        if "knobs" in s and "arm" in s:
            out.setdefault(s["arm"], {})[int(s["seed"])] = s
    if not out:
        raise SystemExit(f"no v13 summary.json under {folder}")
    return {arm: list(by_seed.values()) for arm, by_seed in out.items()}


def rows(runs: dict[str, list[dict[str, Any]]], bench: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    order = ("anchor", "V1", "V2", "V3", "V4", "MM", "MM_prefix")
    out = []
    for arm in sorted(runs, key=lambda a: order.index(a) if a in order else len(order)):
        seeds = runs[arm]
        row: dict[str, Any] = {"arm": arm, "seeds": len(seeds)}
        for metric in SCORES:
            got = [s["means"][metric] for s in seeds if metric in s["means"]]
            if got:
                row[metric] = statistics.fmean(got)
        for value in VALUES:
            got = [s["values"][f"{value}_{arm}"] for s in seeds if f"{value}_{arm}" in s["values"]]
            if got:
                row[value] = statistics.median(got)
        arm_bench = (bench or {}).get("arms", {}).get(f"v13_{arm}", {})
        if "added_over_lora_added" in arm_bench:
            row["added_over_lora"] = arm_bench["added_over_lora_added"]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--bench", type=Path, help="bench/bem_overhead.py's JSON: added time over LoRA's")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    bench = json.loads(args.bench.read_text()) if args.bench else None
    table_rows = rows(summaries(args.folder), bench)
    columns = ["arm", "seeds", *SCORES, *VALUES, "added_over_lora"]
    columns = [c for c in columns if any(c in r for r in table_rows)]
    table = Table(title="v1.3 suite: means over seeds (ratios: medians)")
    for c in columns:
        table.add_column(c, justify="left" if c == "arm" else "right")
    for r in table_rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps(table_rows, indent=2) + "\n")
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
