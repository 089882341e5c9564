"""`python -m bem validate`: the validation experiment from the command line.

Runs each seed into DIR/seed-N/, then aggregates into DIR/summary.json and DIR/scores.parquet and
prints the result table. bem − equal is the stats engine's decision on the pooled scores, the same
one `python -m stats compare DIR/scores.parquet --baseline equal --variant bem --metric score` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bem.core.models import demo_base, pick_device
from bem.core.reporter import MemoryReporter, ScoreRow
from bem.missions.validation.recipe import bem_minus_equal, run_validation, write_scores

ROUTING_TARGET = 0.90


class ConsoleReporter(MemoryReporter):
    """Keeps everything like MemoryReporter and prints each stage's progress as it goes."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self._last: tuple[str, float] = ("", 0.0)

    def progress(self, stage: str, done: int, total: int) -> None:
        super().progress(stage, done, total)
        now = time.monotonic()
        if stage != self._last[0] or done == total or now - self._last[1] > 5:
            self.console.print(f"  {stage}: {done}/{total}", highlight=False)
            self._last = (stage, now)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bem")
    sub = parser.add_subparsers(dest="command", required=True)
    val = sub.add_parser("validate", help="run the validation experiment (BEM_SPEC section 5)")
    val.add_argument("--profile", choices=["smoke", "full"], default="smoke")
    val.add_argument("--seed", type=int, nargs="+", default=[1], help="one or more seeds, e.g. --seed 1 2 3")
    val.add_argument("--out", type=Path, required=True, help="output folder")
    val.add_argument("--base", type=Path, help="a local Hugging Face model folder (default: the demo base)")
    val.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("BEM_CACHE", ".fleet/cache")),
        help="where the demo base is cached (default $BEM_CACHE or .fleet/cache)",
    )
    val.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    args = parser.parse_args(argv)
    return validate(args)


def validate(args: argparse.Namespace) -> int:
    console = Console()
    device = pick_device(args.device)
    started = time.perf_counter()
    if args.base is not None:
        base = args.base
    else:
        console.print(f"[bold]demo base[/] (cached under {args.cache})")
        base = demo_base(args.cache, log=lambda msg: console.print(f"  {msg}", highlight=False))
    summaries, rows = [], []
    for seed in args.seed:
        console.print(f"[bold]seed {seed}[/] ({args.profile} profile, {device})")
        reporter = ConsoleReporter(console)
        summaries.append(
            run_validation(
                base,
                profile=args.profile,
                seed=seed,
                out_dir=args.out / f"seed-{seed}",
                reporter=reporter,
                device=device,
            )
        )
        rows.extend(reporter.rows)

    summary = aggregate(summaries, rows)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_scores(rows, args.out / "scores.parquet")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(console, summary, args.out)
    return 0


def aggregate(summaries: list[dict], rows: list[ScoreRow]) -> dict:
    """Means over seeds per arm; bem − equal judged by the stats engine on every seed's rows at once."""
    arms = summaries[0]["arms"]
    return {
        "seeds": [s["seed"] for s in summaries],
        "routing_accuracy": float(np.mean([s["routing_accuracy"] for s in summaries])),
        "routing_accuracy_per_seed": [s["routing_accuracy"] for s in summaries],
        "arms": {
            arm: {key: float(np.mean([s["arms"][arm][key] for s in summaries])) for key in arms[arm]}
            for arm in arms
        },
        "bem_minus_equal": bem_minus_equal(rows),
        "per_seed": summaries,
    }


def print_summary(console: Console, summary: dict, out: Path) -> None:
    table = Table(title=f"Validation experiment, seeds {summary['seeds']}")
    table.add_column("arm")
    table.add_column("task score", justify="right")
    for task in ("json", "summary"):
        table.add_column(task, justify="right")
    for arm, s in summary["arms"].items():
        table.add_row(arm, f"{s['score']:.3f}", f"{s['json']:.3f}", f"{s['summary']:.3f}")
    console.print(table)
    acc = summary["routing_accuracy"]
    mark = "[green]ok[/]" if acc >= ROUTING_TARGET else "[red]below target[/]"
    console.print(f"routing accuracy (held-out prompts): {acc:.3f}  target >= {ROUTING_TARGET}  {mark}")
    console.print(
        f"bem - equal (score): {describe_bem_minus_equal(summary['bem_minus_equal'])}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"wrote {out}/summary.json and {out}/scores.parquet in {summary['wall_seconds']} s")


def describe_bem_minus_equal(d: dict) -> str:
    """The estimate, the interval the stats engine judged on (+inf above a one-sided bound), p_adj, n
    and the outcome; below them the method, so a reader knows what the interval is."""
    if d["estimate"] is None:  # no paired examples: nothing to estimate
        return f"{d['outcome']} ({d['method']})"
    high = "+inf" if d["high"] is None else f"{d['high']:+.3f}"
    outcome = f"[green]{d['outcome']}[/]" if d["outcome"] == "pass" else f"[yellow]{d['outcome']}[/]"
    return (
        f"{d['estimate']:+.3f}  [{d['low']:+.3f}, {high}]  p_adj {d['p_adj']:.3g}  n={d['n']}  {outcome}\n"
        f"  {d['method']}"
    )


if __name__ == "__main__":
    sys.exit(main())
