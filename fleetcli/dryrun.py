"""`fleetctl submit MISSION --dry-run`: what every task would build, without a fleet, a GPU or weights.

The mission file is read here (--missions-dir, else $FLEET_MISSIONS_DIR, else the shipped missions),
--set overrides apply, and the spec expands into its tasks exactly as fleetd would expand it. Each task
goes to its kind's `dry_run` (`workers.kinds.dry_run`), which builds the recipe's model and adapters on
the meta device from params.base's config.json and estimates each phase's peak memory
(`bem.core.dryrun`); the estimate is set against the task's `vram_gb`. Nothing is submitted or
downloaded. A dry run does not depend on the seed, so tasks that differ only in it share one build and
one build. Exit status: 0 when every task fits, 1 when one does not, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bem.core import dryrun
from schemas import missions as specs
from workers import kinds


class DryRunError(Exception):
    """A task that cannot be estimated: `mission/task (kind): reason`."""


def missions_dir(given: Path | None) -> Path:
    env = os.environ.get("FLEET_MISSIONS_DIR")
    return given or (Path(env) if env else specs.MISSIONS_DIR)


def estimate(spec: specs.MissionSpec, profile: str, sweep: bool = False) -> list[dict[str, Any]]:
    """One entry per task, in expansion order: its kind, vram_gb, whether the peak fits (None when the
    task asks for no GPU or builds nothing) and the kind's dry-run result."""
    built: dict[str, dict[str, Any]] = {}
    out = []
    for task in specs.expand(spec, profile, f"{spec.name}-dry-run", sweep=sweep):
        unseeded = {k: v for k, v in task.params.items() if k != "seed"}
        key = json.dumps([task.kind, unseeded], sort_keys=True, default=str)
        if key not in built:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, via peft
                    built[key] = kinds.dry_run(task.kind, task.params)
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
                raise DryRunError(f"{spec.name}/{task.name} ({task.kind}): {e}") from e
        result = built[key]
        fits = None if "nothing" in result or task.vram_gb <= 0 else dryrun.fits(result, task.vram_gb)
        out.append(
            {
                "task": task.name,
                "kind": task.kind,
                "vram_gb": task.vram_gb,
                "fits": fits,
                "result": result,
            }
        )
    return out


def unit(n: float) -> tuple[str, int]:
    """The unit a table states its sizes in: GiB from 1 GiB up, else MiB."""
    return ("GiB", 1024**3) if n >= 1024**3 else ("MiB", 1024**2)


def size(n: float) -> str:
    name, scale = unit(n)
    return f"{n / scale:,.2f} {name}"


def verdict(entry: dict[str, Any]) -> str:
    if "nothing" in entry["result"]:
        return "nothing to build"
    if entry["fits"] is None:
        return "no GPU asked"
    return "[green]fits[/]" if entry["fits"] else "[bold red]DOES NOT FIT[/]"


def build_table(entries: list[dict[str, Any]]) -> Table:
    """One build and the tasks that share it: the base in the title, a row per phase (the peak's in
    bold), the adapters and the peak against vram_gb in the caption."""
    first = entries[0]
    result, base, peak = first["result"], first["result"]["base"], first["result"]["peak"]
    name, scale = unit(peak["bytes"])
    t = Table(
        "phase",
        "trainable",
        "rows×tokens",
        *(f"{col} {name}" for col in ("weights", "grads", "AdamW", "activations", "total")),
        title=(
            f"{', '.join(e['task'] for e in entries)} ({first['kind']}): {base['model_type']}, "
            f"{base['parameters']:,} parameters in {base['dtype']} (from {base['dtype_from']}), "
            f"tokens counted in {base['tokens']}"
        ),
        title_justify="left",
        caption_justify="left",
    )
    for ph in result["phases"]:
        t.add_row(
            ph["name"] + ("" if ph["backward"] else ", LM without grad"),
            f"{ph['trainable']:,}",
            f"{ph['batch']}×{ph['seq_len']}",
            *(f"{ph[k] / scale:,.2f}" for k in ("weights", "gradients", "optimizer", "activations", "total")),
            style="bold" if ph["name"] == peak["phase"] else None,
        )
    adapters = " · ".join(f"{name} {n:,}" for name, n in result["adapters"].items())
    t.caption = (
        f"adapter and controller parameters: {adapters}\n"
        f"peak {size(peak['bytes'])} ({peak['phase']}) against vram_gb {first['vram_gb']:g}: {verdict(first)}"
    )
    return t


def summary_table(entries: list[dict[str, Any]]) -> Table:
    t = Table(
        "task", "kind", "base", "adapters", "peak", "vram_gb", "", title="per task", title_justify="left"
    )
    for e in entries:
        r = e["result"]
        built = "nothing" not in r
        t.add_row(
            e["task"],
            e["kind"],
            f"{r['base']['parameters']:,}" if built else "",
            f"{sum(r['adapters'].values()):,}" if built else "",
            size(r["peak"]["bytes"]) if built else "",
            f"{e['vram_gb']:g}",
            verdict(e),
        )
    return t


def submit(args: argparse.Namespace, console: Console) -> int:
    """The dry run of `fleetctl submit`; prints tables (or --json) and returns the exit status."""
    try:
        path = specs.find(args.mission, missions_dir(args.missions_dir))
        overrides = {**specs.load_overrides(args.overrides_file), **dict(args.overrides)}
        spec = specs.load(path, overrides)
        profile, _ = specs.profile_of(spec, args.profile)
        entries = estimate(spec, profile, sweep=args.sweep)
    except (specs.SpecError, DryRunError) as err:
        if args.json:
            print(json.dumps({"ok": False, "error": {"code": "dry_run", "message": str(err)}}))
        else:
            Console(stderr=True).print(
                f"[red]fleetctl submit --dry-run: {escape(str(err))}[/]", highlight=False, soft_wrap=True
            )
        return 2
    status = 1 if any(entry["fits"] is False for entry in entries) else 0
    if args.json:
        print(json.dumps({"ok": True, "mission": spec.name, "profile": profile, "tasks": entries}, indent=2))
        return status
    console.print(f"dry run of {spec.name} ({profile} profile, {len(entries)} tasks): nothing submitted")
    groups: dict[str, list[dict[str, Any]]] = {}  # tasks with the same estimate share a table
    for entry in entries:
        key = json.dumps([entry["kind"], entry["vram_gb"], entry["result"]], sort_keys=True)
        groups.setdefault(key, []).append(entry)
    for group in groups.values():
        if "nothing" in group[0]["result"]:
            names = ", ".join(e["task"] for e in group)
            nothing = group[0]["result"]["nothing"]
            console.print(f"{names} ({group[0]['kind']}): {escape(nothing)}", highlight=False, soft_wrap=True)
        else:
            console.print(build_table(group))
    console.print(summary_table(entries))
    return status
