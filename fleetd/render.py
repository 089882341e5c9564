"""Terminal output for fleetctl and `fleetd up`: rich tables, and following a mission with progress bars."""

from __future__ import annotations

import time
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetd.client import FleetClient, FleetError

DONE = ("succeeded", "failed", "cancelled")


def _fmt(x: Any, spec: str = "+.4f") -> str:
    return "" if x is None else format(x, spec)


def decisions_table(mission: dict[str, Any], decisions: list[dict[str, Any]]) -> Table:
    t = Table(title=f"{mission['mission_id']}: verdict {mission.get('verdict') or '-'}", title_justify="left")
    for col, kw in (
        ("gate", {}),
        ("kind", {}),
        ("comparison", {}),
        ("estimate", {"justify": "right"}),
        ("interval", {"justify": "right"}),
        ("p_adj", {"justify": "right"}),
        ("outcome", {}),
        ("reason", {"overflow": "fold"}),
    ):
        t.add_column(col, **kw)
    for d in decisions:
        if d["kind"] == "verdict":
            continue
        style = {"pass": "green", "fail": "red"}.get(d["outcome"], "yellow")
        interval = "" if d["ci_low"] is None else f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]"
        t.add_row(
            d["gate"],
            d["kind"],
            d["comparison"] or "",
            _fmt(d["estimate"]),
            interval,
            _fmt(d["p_adj"], ".4f"),
            f"[{style}]{d['outcome']}[/]",
            d["reason"] or "",
        )
    return t


def status_tables(status: dict[str, Any]) -> list[Table]:
    out = []
    mt = Table(title="missions", title_justify="left")
    for col in ("mission", "profile", "state", "tasks", "verdict"):
        mt.add_column(col)
    for ms in status["missions"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(ms["tasks"].items()))
        mt.add_row(ms["mission_id"], ms["profile"], ms["state"], counts, ms.get("verdict") or "")
    out.append(mt)
    if status["tasks"]:
        tt = Table(title="tasks", title_justify="left")
        for col in ("task", "state", "attempt", "worker", "pending reason / error"):
            tt.add_column(col, overflow="fold")
        for t in status["tasks"]:
            note = t["pending_reason"] if t["state"] == "pending" else (t["error"] or "")
            tt.add_row(t["task_id"], t["state"], str(t["attempt"]), t["worker"] or "", note or "")
        out.append(tt)
    out.append(workers_table(status["workers"]))
    return out


def workers_table(workers: list[dict[str, Any]]) -> Table:
    wt = Table(title="workers", title_justify="left")
    for col in ("worker", "alive", "gpu", "free / total GiB", "running"):
        wt.add_column(col)
    for w in workers:
        mem = f"{w['free_bytes'] / 2**30:.1f} / {w['total_bytes'] / 2**30:.1f}" if w["total_bytes"] else "-"
        wt.add_row(
            w["worker"],
            "yes" if w["alive"] else f"no ({w['age_s']} s)",
            w["gpu_name"],
            mem,
            w["running"] or "",
        )
    return wt


async def follow(
    client: FleetClient, mission_id: str, console: Console, poll_s: float = 0.5
) -> dict[str, Any]:
    """Progress bars per stage until the mission ends; returns its final status."""
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:
        ids: dict[str, Any] = {}
        while True:
            try:
                st = await client.status(mission_id)
            except FleetError as e:  # fleetd or nats-server restarting: keep following
                if e.code not in ("timeout", "no_fleet"):
                    raise
                await anyio.sleep(1)
                continue
            stages: dict[str, list[dict[str, Any]]] = {}
            for t in st["tasks"]:
                stages.setdefault(t["stage"], []).append(t)
            for stage, tasks in stages.items():
                done = sum(t["state"] in DONE for t in tasks)
                running = sum(t["state"] == "running" for t in tasks)
                failed = sum(t["state"] == "failed" for t in tasks)
                note = f"{running} running" + (f", {failed} failed" if failed else "")
                if stage not in ids:
                    ids[stage] = bars.add_task(stage, total=len(tasks), note=note)
                bars.update(ids[stage], completed=done, note=note)
            mission = st["missions"][0]
            if mission["state"] in DONE:
                break
            await anyio.sleep(poll_s)
    console.print(f"{mission_id}: {mission['state']} in {time.monotonic() - started:.0f} s")
    return st
