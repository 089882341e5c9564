"""Terminal output for fleetctl and `fleetd up`: rich tables, and following a mission with progress bars."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
from rich import box
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fleet.client import FleetClient, FleetError

DONE = ("succeeded", "failed", "cancelled", "stopped")


def _fmt(x: Any, spec: str = "+.4f") -> str:
    return "" if x is None else format(x, spec)


def _plain_table(title: str) -> Table:
    """A table without edges, its title on the left: numbers with sentences below it."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)


def sweep_table(out: dict[str, Any]) -> Group:
    """A sweep's trials best first: rank, the trial's values, the estimate and its interval, and why
    a trial was stopped or has no rank below the table."""
    sw = out["sweep"]
    t = _plain_table(f"{out['mission_id']}: sweep ranked by {sw['ranked_by']} ({sw['goal']}), never gated")
    keys = list(out["trials"][0]["params"]) if out["trials"] else []
    for col in ("rank", "trial", *keys, "n", "estimate", "interval", "note"):
        t.add_column(col, justify="left" if col == "note" else "right", no_wrap=col != "note")
    notes = []
    for r in out["trials"]:
        interval = "" if r["ci_low"] is None else f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        why = r["stopped"] or r["note"] or ""
        if why:
            notes.append(Text(f"t{r['trial']}: {why}", style="dim"))
        t.add_row(
            str(r["rank"] or "-"),
            f"t{r['trial']}",
            *(json.dumps(r["params"][k]) for k in keys),
            str(r["n"]),
            "-" if r["estimate"] is None else _fmt(r["estimate"]),
            interval,
            "stopped early" if r["stopped"] else ("see below" if why else ""),
        )
    return Group(t, *notes)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def gc_table(out: dict[str, Any]) -> Group:
    """What `fleetctl gc` removed (or, dry, would remove): each mission's run folders, the object
    store's artifacts, the homes that answered, and the total."""
    verb = "would free" if out["dry_run"] else "freed"
    t = _plain_table(f"gc: {len(out['missions'])} missions")
    for col in ("mission", "state", "ended", "run folders"):
        t.add_column(col, justify="right" if col == "run folders" else "left")
    for r in out["missions"]:
        ended = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["finished_at"])) if r["finished_at"] else "-"
        t.add_row(r["mission_id"], r["state"], ended, size(r["runs_bytes"]))
    a = out["artifacts"]
    lines = [
        Text(f"object store: {a['removed']} artifacts, {size(a['bytes'])}; "
             f"{len(a['kept_needed'])} kept for pending or running tasks"),
        Text(f"homes: {', '.join(h['where'] for h in out['homes'])}"),
        *(Text(f"{h['where']}: {h['error']}", style="red") for h in out["homes"] if h["error"]),
        *(Text(f"left for the next gc: {e}", style="red") for e in a.get("errors", [])),
        *(Text(f"no answer from {w}: its runs stay until the next gc", style="yellow")
          for w in out["unreachable"]),
    ]  # fmt: skip
    if out["earlier_runs_bytes"]:
        lines.append(Text(f"left over from earlier gc runs: {size(out['earlier_runs_bytes'])}"))
    lines.append(Text(f"{verb} {size(out['freed_bytes'])} ({out['freed_bytes']} bytes)", style="bold"))
    return Group(t, *lines)


def decisions_table(mission: dict[str, Any], decisions: list[dict[str, Any]]) -> Group:
    """One row per gate with its numbers, then each gate's reason on its own line below.

    The reasons are sentences; in a table column they fold into a thin strip at 80 columns."""
    t = _plain_table(f"{mission['mission_id']}: verdict {mission.get('verdict') or '-'}")
    t.add_column("gate", overflow="fold", ratio=1)
    for col in ("estimate", "interval", "p_adj"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("outcome", no_wrap=True)
    reasons = []
    kind = None
    for d in decisions:
        if d["kind"] == "verdict":
            continue
        if d["kind"] != kind:  # a heading row per kind (primary claims, guards) instead of a column
            kind = d["kind"]
            t.add_row(Text(f"{kind}:", style="dim italic"))
        style = {"pass": "green", "fail": "red"}.get(d["outcome"], "yellow")
        interval = ""
        if d["ci_low"] is not None or d["ci_high"] is not None:
            low = "-inf" if d["ci_low"] is None else _fmt(d["ci_low"])
            high = "+inf" if d["ci_high"] is None else _fmt(d["ci_high"])
            interval = f"[{low}, {high}]"
        t.add_row(
            d["gate"],
            _fmt(d["estimate"]),
            interval,
            _fmt(d["p_adj"], ".2g"),
            f"[{style}]{d['outcome']}[/]",
        )
        comparison = f" ({d['comparison']})" if d["comparison"] else ""
        reasons.append(Text.assemble((d["gate"], "bold"), comparison, ": ", d["reason"] or ""))
    verdict = next((d for d in decisions if d["kind"] == "verdict"), None)
    if verdict is not None:
        reasons.append(Text.assemble(("verdict", "bold"), ": ", verdict["reason"] or ""))
    return Group(t, Text(""), *reasons)


def status_tables(status: dict[str, Any]) -> list[Table]:
    out = []
    mt = Table(title="missions", title_justify="left")
    for col in ("mission", "profile", "state"):
        mt.add_column(col, no_wrap=True)
    mt.add_column("tasks", ratio=1)
    mt.add_column("verdict", no_wrap=True)
    mt.add_column("by", no_wrap=True)
    for ms in status["missions"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(ms["tasks"].items()))
        mt.add_row(
            ms["mission_id"], ms["profile"], ms["state"], counts, ms.get("verdict") or "",
            ms.get("submitted_by") or "",
        )  # fmt: skip
    out.append(mt)
    if status["tasks"]:
        # One mission's tasks go by their names, so the table fits 80 columns.
        single = len({t["mission_id"] for t in status["tasks"]}) == 1
        title = f"tasks of {status['tasks'][0]['mission_id']}" if single else "tasks"
        tt = Table(title=title, title_justify="left")
        for col in ("task", "state", "attempt", "worker"):
            tt.add_column(col, no_wrap=True)
        tt.add_column("pending reason / error", overflow="fold", ratio=1)
        for t in status["tasks"]:
            note = t["pending_reason"] if t["state"] == "pending" else (t["error"] or "")
            name = t["task_id"].removeprefix(t["mission_id"] + "/") if single else t["task_id"]
            tt.add_row(name, t["state"], str(t["attempt"]), t["worker"] or "", note or "")
        out.append(tt)
    if status.get("service_decisions"):
        st = Table(title="service decisions (newest first)", title_justify="left")
        for col in ("task", "service", "step", "decision", "acked"):
            st.add_column(col, no_wrap=True)
        st.add_column("reason / reply", overflow="fold", ratio=1)
        for d in status["service_decisions"]:
            acked = "pending" if d["acked"] is None else ("yes" if d["acked"] else "no")
            note = d["reason"] + (f"; {d['detail']}" if d["detail"] else "")
            st.add_row(
                d["task_id"].rsplit("/", 1)[-1], d["service"], str(d["step"]), d["decision"], acked, note
            )
        out.append(st)
    if status.get("audit"):
        at = Table(title="who asked (newest first)", title_justify="left")
        for col in ("time", "action", "target", "role", "credential"):
            at.add_column(col, no_wrap=True)
        at.add_column("detail", overflow="fold", ratio=1)
        for a in status["audit"]:
            when = time.strftime("%H:%M:%S", time.localtime(a["asked_at"]))
            target = a["target"].removeprefix(status["missions"][0]["mission_id"] + "/")
            at.add_row(when, a["action"], target, a["role"], a["credential"], a["detail"] or "")
        out.append(at)
    out.append(workers_table(status["workers"]))
    return out


def service_summary(counts: list[dict[str, Any]]) -> Table:
    """Per task, what the reactive services decided (Mission B): promotions and rollbacks by service,
    from `status`'s service_counts."""
    t = Table(title="service decisions", title_justify="left")
    for col in ("task", "promotions", "rollbacks (drift)", "rollbacks (canary)", "not acked"):
        t.add_column(col, no_wrap=True)
    per: dict[str, list[int]] = {}
    for c in counts:
        row = per.setdefault(c["task_id"].rsplit("/", 1)[-1], [0, 0, 0, 0])
        row[0 if c["decision"] == "promote" else 1 if c["service"] == "drift" else 2] += c["n"]
        row[3] += c["n"] - c["acked"]
    for task, row in sorted(per.items()):
        t.add_row(task, *map(str, row))
    return t


def workers_table(workers: list[dict[str, Any]]) -> Table:
    wt = Table(title="workers", title_justify="left")
    for col in ("worker", "alive", "gpu", "free / total GiB"):
        wt.add_column(col, no_wrap=True)
    wt.add_column("running", overflow="fold", ratio=1)
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
