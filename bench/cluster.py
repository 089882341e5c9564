"""The fleet on a three-node NATS cluster against one node: metric ingest and dispatch, as ratios.

Both rows run bench/fleet_throughput.py's parts in this process, one after the other, on fresh
servers, homes and databases: (a) metric ingest (saturated rate, and publish-to-queryable latency at a
paced rate) and (b) the scheduler (submit-to-start on an idle fleet, and a worker's idle gap between
tasks). The single node is `fleetd up`'s; the cluster is `fleetd up --cluster 3`'s: streams and the
heartbeat bucket at 3 replicas, so every publish waits for a second node's write, and every client
speaks TLS. The ratio is cluster / single (for a rate, below 1 is slower; for a latency, above 1).

    .venv/bin/python bench/cluster.py [--tasks 200] [--out PATH]

Writes bench/results/cluster-cpu.json. Runtime on a quiet 2-core box is a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import anyio  # noqa: E402
import fleet_throughput as ft  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROWS = (  # (what, path into the results, higher is better)
    ("ingest, saturated (points/s)", ("a", "saturated", "committed_points_per_s"), True),
    ("ingest latency p50 (s)", ("a", "paced", "latency_s", "p50"), False),
    ("ingest latency p99 (s)", ("a", "paced", "latency_s", "p99"), False),
    ("submit to start p50 (s)", ("b", "submit_to_start_s", "p50"), False),
    ("submit to start p99 (s)", ("b", "submit_to_start_s", "p99"), False),
    ("idle gap between tasks p50 (s)", ("b", "idle_gap_all_s", "p50"), False),
)


def dig(found: Any, path: tuple[str, ...]) -> float:
    for key in path:
        found = found[key]
    return float(found)


def num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=200, help="noop tasks in (b)'s big mission")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cluster-cpu.json")
    args = parser.parse_args(argv)
    common = [
        "--no-mlflow", "--publishers", "2", "--sat-messages", "300", "--paced-rate", "50000",
        "--paced-seconds", "5", "--tasks", str(args.tasks), "--single", "20",
    ]  # fmt: skip
    console = Console(width=None if sys.stdout.isatty() else 140)
    started, load_before = time.perf_counter(), os.getloadavg()
    runs: dict[str, Any] = {}
    for label, nodes in (("single", 1), (f"cluster of {args.nodes}", args.nodes)):
        console.print(f"== {label}")
        parsed = ft.arguments().parse_args([*common, "--nodes", str(nodes)])  # its defaults otherwise
        runs[label] = anyio.run(ft.run_all, parsed, console)
    single, cluster = runs["single"], runs[f"cluster of {args.nodes}"]
    table = Table(title=f"NATS cluster of {args.nodes} vs one node (fleetd in this process, 2 workers)")
    for col in ("measure", "one node", f"{args.nodes} nodes", "cluster / one"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    rows = []
    for what, path, _ in ROWS:
        one, many = dig(single, path), dig(cluster, path)
        rows.append({"measure": what, "single": one, "cluster": many, "ratio": many / one if one else None})
        table.add_row(what, num(one), num(many), f"{many / one:.2f}" if one else "-")
    console.print(table)
    checks = [
        {"run": label, "lost": out["a"]["saturated"]["lost"] + out["a"]["paced"]["lost"],
         "doubled": out["a"]["saturated"]["doubled"] + out["a"]["paced"]["doubled"],
         "tasks_not_clean": out["b"]["not_clean"]}
        for label, out in runs.items()
    ]  # fmt: skip
    console.print(f"nothing lost, doubled or retried: {checks}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "cluster",
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "args": common,
        "rows": rows,
        "checks": checks,
        "runs": runs,
        "seconds": time.perf_counter() - started,
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": os.getloadavg(),
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out} in {time.perf_counter() - started:.0f}s", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
