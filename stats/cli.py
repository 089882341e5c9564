"""`python -m stats compare SCORES.parquet --baseline A --variant B [--metric em] [--json]`.

Each metric compared is a primary claim "variant beats baseline", and the metrics together form
one BH family; the decision table shows what `stats.gates` decided for each and why. The judging is
`stats.gates.compare`, which `python -m bem validate` calls too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from stats import gates
from stats.gates import Verdict
from stats.table import read_scores


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stats", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    cmp = verbs.add_parser("compare", help="paired BCa + BH decision table for variant vs baseline")
    cmp.add_argument("scores", help="Parquet table with columns example_id, arm, seed, metric, value")
    cmp.add_argument("--baseline", required=True)
    cmp.add_argument("--variant", required=True)
    cmp.add_argument("--metric", action="append", help="metric to compare (repeatable); default: all shared")
    cmp.add_argument("--q", type=float, default=0.05, help="FDR level (default .05)")
    cmp.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples B (default 10,000)")
    cmp.add_argument("--level", type=float, default=0.95, help="interval level (default .95)")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _finite(value):
    """JSON has no NaN or infinity: write null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fmt(value: float | None, spec: str = "+.4f") -> str:
    return "" if value is None else format(value, spec)


def _table(verdict: Verdict, title: str) -> Table:
    table = Table(title=title)
    for col in ("gate", "n", "Δ", "low", "high", "p", "p_adj", "seeds", "outcome"):
        table.add_column(col, justify="left" if col in ("gate", "seeds", "outcome") else "right")
    for d in verdict.decisions:
        table.add_row(
            d.gate,
            str(d.n),
            _fmt(d.estimate),
            _fmt(d.low),
            _fmt(d.high) if d.high is not None else "+inf",
            _fmt(d.p_value, ".3g"),
            _fmt(d.p_adjusted, ".3g"),
            d.seeds_positive,
            d.outcome,
        )
    return table


def _reasons(verdict: Verdict) -> str:
    """The long part of each row, below the table so the table fits a terminal."""
    return "\n".join(f"  {d.gate}: {d.interval}; {d.reason}" for d in verdict.decisions)


def compare(args: argparse.Namespace) -> int:
    verdict = gates.compare(
        read_scores(args.scores),
        args.baseline,
        args.variant,
        args.metric,
        q=args.q,
        n_resamples=args.resamples,
        level=args.level,
        seed=args.seed,
        source=args.scores,
    )
    if args.json:
        out = {
            "verdict": verdict.verdict,
            "reason": verdict.reason,
            "decisions": [{k: _finite(v) for k, v in asdict(d).items()} for d in verdict.decisions],
        }
        print(json.dumps(out, indent=2))
    else:
        console = Console()
        title = f"{args.variant} vs {args.baseline}: paired BCa, B = {args.resamples:,}, BH at q = {args.q}"
        console.print(_table(verdict, title))
        console.print(_reasons(verdict), highlight=False)
        console.print(f"verdict: [bold]{verdict.verdict}[/bold] ({verdict.reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return compare(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
