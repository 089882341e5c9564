"""`fleetctl`: the researcher's CLI. Every verb takes --json; errors exit 2 with the coordinator's reason."""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

from fleet import logs as log_setup
from fleet import render
from fleet.client import FleetClient, FleetError, find_ca, find_creds, find_url
from schemas import messages as m
from schemas import missions as specs


def _override(text: str) -> tuple[str, Any]:
    """`key.path=VALUE`, VALUE read as a TOML value (numbers, booleans, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants key.path=VALUE, got {text!r}")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def _kappa(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"κ must be in [0, 1]; got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _duration(text: str) -> float:
    from fleetd.gc import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fleetctl", description="submit and watch BEM missions")
    top.add_argument("--home", type=Path, help="fleet home (default $FLEET_HOME or ./.fleet)")
    top.add_argument("--nats", help="NATS URL of the fleet (default: read from the home)")
    top.add_argument(
        "--creds",
        help="your NKEY seed file (default $FLEET_NATS_CREDENTIALS_FILE, else <home>/creds/client.nk)",
    )
    top.add_argument(
        "--tls-ca",
        help="the CA for tls:// servers (default $FLEET_NATS_TLS_CA_FILE, else <home>/tls/ca.pem)",
    )
    sub = top.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = verb("submit", "submit a mission and follow it")
    p.add_argument("mission")
    p.add_argument("--profile")
    p.add_argument(
        "--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE"
    )
    p.add_argument(
        "--overrides",
        dest="overrides_file",
        type=Path,
        metavar="FILE",
        help="a TOML file of KEY = VALUE overrides (what `fleetctl sweep --write` writes); --set wins",
    )
    p.add_argument(
        "--sweep", action="store_true", help="run the mission's [sweep]: trials ranked, never gated"
    )
    p.add_argument("--detach", action="store_true", help="return after submitting")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="submit nothing: build each task's model and adapters from params.base's config.json on the "
        "meta device and estimate its peak memory against vram_gb (no fleet, no GPU; exit 1 if one "
        "does not fit)",
    )
    p.add_argument(
        "--missions-dir",
        type=Path,
        help="with --dry-run: read the mission here (default $FLEET_MISSIONS_DIR, else the shipped ones)",
    )
    p = verb("status", "missions, tasks with pending reasons, workers")
    p.add_argument("mission", nargs="?")
    p = verb("cancel", "cancel a mission or a task")
    p.add_argument("id")
    p = verb("knob", "set a running task's safety-overlay knob κ (0 turns the overlay off, 1 is the most)")
    p.add_argument("task")
    p.add_argument("value", type=_kappa)
    p = verb("logs", "a task's log lines")
    p.add_argument("task")
    p.add_argument("-f", "--follow", action="store_true")
    p = verb("sql", "read-only SQL on the fleet's DuckDB")
    p.add_argument("query")
    p = verb("export", "write every table as Parquet into DIR")
    p.add_argument("directory", type=Path)
    p = verb(
        "report", "a mission's report: DIR/<id>.md (figures beside it) and a self-contained DIR/<id>.html"
    )
    p.add_argument("mission")
    p.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR", help="default ./reports")
    p = verb(
        "compare",
        "mission B against mission A: B - A per shared arm and metric, and what differs in their inputs",
    )
    p.add_argument("a", metavar="MISSION_A")
    p.add_argument("b", metavar="MISSION_B")
    p.add_argument("--metric", help="one metric only")
    p = verb("sweep", "a sweep's trials ranked, and its winner as overrides for a gated run")
    p.add_argument("mission")
    p.add_argument("--write", type=Path, metavar="FILE", help="write the winner's overrides here (TOML)")
    p = verb("rejudge", "judge an ended mission's stored scores again with the gates frozen at submit")
    p.add_argument("mission")
    p = verb("retry", "run an ended mission's failed tasks again (and what was cancelled because of them)")
    p.add_argument("mission")
    p.add_argument("--failed", action="store_true", required=True, help="the failed tasks (required)")
    p = verb("gc", "remove the files of ended missions beyond a policy (their rows stay); say what to keep")
    p.add_argument(
        "--keep-last", type=_count, metavar="N", help="keep the N newest ended runs of each mission"
    )
    p.add_argument(
        "--older-than", type=_duration, metavar="D", help="remove only runs ended over D ago: 7d, 12h"
    )
    p.add_argument("--dry-run", action="store_true", help="measure what would go; remove nothing")
    verb("missions", "available missions and past runs")
    verb("workers", "workers and their GPUs")
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.verb == "submit" and (args.dry_run or args.missions_dir):
        if not args.dry_run:
            top.error("--missions-dir reads the mission here: only with --dry-run (fleetd reads its own)")
        from fleetcli import dryrun  # here: torch and the recipes are for the dry run only

        return dryrun.submit(args, Console())
    log_setup.configure(level="error")  # reconnect chatter is not for a CLI's user; errors go to stderr
    console = Console()
    try:
        return anyio.run(_main, args, console)
    except FleetError as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": {"code": e.code, "message": str(e)}}))
        else:
            Console(stderr=True).print(f"[red]fleetctl {args.verb}: {e}[/]", highlight=False)
        return 2


async def _main(args: argparse.Namespace, console: Console) -> int:
    client = await FleetClient.connect(
        find_url(args.home, args.nats), find_creds(args.home, args.creds), find_ca(args.home, args.tls_ca)
    )
    try:
        return await VERBS[args.verb](client, args, console)
    finally:
        await client.close()


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


async def submit(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    try:
        overrides = {**specs.load_overrides(args.overrides_file), **dict(args.overrides)}
    except specs.SpecError as e:
        raise FleetError("invalid_spec", f"--overrides {e}") from None
    sub = await client.submit(args.mission, args.profile, overrides, sweep=args.sweep)
    mission_id = sub["mission_id"]
    if args.detach:
        _json(sub) if args.json else console.print(f"submitted {mission_id} ({len(sub['tasks'])} tasks)")
        return 0
    if args.json:
        while (st := await client.status(mission_id))["missions"][0]["state"] not in render.DONE:
            await anyio.sleep(0.5)
        _json(st)
        return 0
    console.print(f"submitted [bold]{mission_id}[/] ({sub['profile']} profile, {len(sub['tasks'])} tasks)")
    st = await render.follow(client, mission_id, console)
    if st.get("service_counts"):
        console.print(render.service_summary(st["service_counts"]))
    if st.get("decisions"):
        console.print(render.decisions_table(st["missions"][0], st["decisions"]))
    if args.sweep:
        console.print(render.sweep_table(await client.sweep(mission_id)))
    return 0  # the mission finished; its verdict is data, not an exit status


async def sweep(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.sweep(args.mission)
    if args.write is not None and out["best"] is None:
        raise FleetError(
            "refused", f"sweep {args.mission} has no winner (it is {out['state']}): nothing written"
        )
    if args.write is not None:
        write_overrides(args.write, out)
    if args.json:
        _json(out)
        return 0
    console.print(render.sweep_table(out))
    if out["best"] is None:
        console.print(f"no winner yet: the sweep is {out['state']}" if out["state"] == "running" else
                      "no trial ran to its end with scores to rank")  # fmt: skip
        return 1
    if args.write is not None:
        console.print(f"wrote {args.write}; run the winner gated on fresh seeds:")
        console.print(f"  {out['best']['command'].replace('best.toml', str(args.write))}", highlight=False)
    else:
        console.print("the winner's overrides (--write FILE saves them):")
        for key, value in out["best"]["overrides"].items():
            console.print(f"  --set {key}={json.dumps(value)}", highlight=False)
    return 0


def write_overrides(path: Path, out: dict[str, Any]) -> None:
    """The winner as an overrides file `fleetctl submit --overrides` reads, saying where it came from."""
    import tomli_w

    best, metric = out["best"], out["sweep"]["metric"]
    head = (
        f"# The winner of sweep {out['mission_id']}: trial {best['trial']}, ranked by {metric}.\n"
        f"# {best['command'].replace('best.toml', str(path))}\n"
    )
    path.write_text(head + tomli_w.dumps(best["overrides"]))


async def status(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    st = await client.status(args.mission)
    if args.json:
        _json(st)
        return 0
    for table in render.status_tables(st):
        console.print(table)
    if st.get("decisions"):
        console.print(render.decisions_table(st["missions"][0], st["decisions"]))
    return 0


async def cancel(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.call("cancel", m.IdRequest(id=args.id))
    _json(out) if args.json else console.print(f"cancelled {len(out['cancelled'])} task(s)")
    return 0


async def knob(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    """The reply waits for the task to apply κ at its next check; exit 1 if it did not."""
    # Longer than fleetd waits for the task (35 s): a client timeout would send the request again.
    out = await client.call("knob", m.KnobRequest(task_id=args.task, value=args.value), timeout=90)
    if args.json:
        _json(out)
    else:
        state = "[green]applied[/]" if out["acked"] else "[red]not applied[/]"
        console.print(
            f"κ {out['value']:g} on {out['task_id']} (attempt {out['attempt']}): {state}: {out['detail']}"
        )
    return 0 if out["acked"] else 1


async def logs(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    after = -1
    while True:
        out = await client.call("logs", m.LogsRequest(task_id=args.task, after_seq=after))
        for row in out["lines"]:
            print(json.dumps(row) if args.json else row["line"], flush=True)
            after = max(after, row["seq"])
        if not args.follow or out["state"] in render.DONE:
            return 0
        await anyio.sleep(0.5)


async def sql(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.call("sql", m.SqlRequest(query=args.query))
    if args.json:
        _json([dict(zip(out["columns"], row, strict=True)) for row in out["rows"]])
        return 0
    table = Table(*out["columns"])
    for row in out["rows"]:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)
    if out["truncated"]:
        console.print(f"(first {len(out['rows'])} rows)")
    return 0


async def export(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    """Every table as DIR/<table>.parquet, received over the bus in chunks and written here, so it
    works from any host that reaches the fleet's NATS."""
    args.directory.mkdir(parents=True, exist_ok=True)
    sizes = (await client.call("export", m.ExportRequest()))["tables"]
    written = {}
    for table in sizes:
        path = args.directory / f"{table}.parquet"
        written[table] = {"file": str(path), "rows": await _export_table(client, table, path)}
    if args.json:
        _json(written)
    else:
        for w in written.values():
            console.print(f"{w['file']}  {w['rows']:,} rows", highlight=False)
    return 0


async def _export_table(client: FleetClient, table: str, path: Path) -> int:
    """Append each chunk's rows to one Parquet file, written to a temporary name and then renamed, so
    a file that exists is whole."""
    import pyarrow.parquet as pq  # here: the other verbs need not pay for pyarrow's import

    partial = path.with_suffix(".parquet.partial")
    after, rows = -1, 0
    writer = None
    try:
        while True:
            chunk = await client.call("export", m.ExportRequest(table=table, after=after))
            data = pq.read_table(io.BytesIO(base64.b64decode(chunk["parquet"])))
            if writer is None:
                writer = pq.ParquetWriter(partial, data.schema)
            if chunk["rows"] == 0:
                break
            writer.write_table(data)
            rows, after = rows + chunk["rows"], chunk["last"]
    finally:
        if writer is not None:
            writer.close()
    partial.replace(path)
    return rows


async def report(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    from fleetcli import report as reporting  # here: matplotlib is for this verb only

    written = reporting.write(await reporting.fetch(client, args.mission), args.out)
    if args.json:
        _json({k: str(v) for k, v in written.items()})
    else:
        console.print(f"wrote {written['markdown']} and {written['html']}", highlight=False)
    return 0


async def compare(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.call("compare", m.CompareRequest(a=args.a, b=args.b, metric=args.metric), timeout=300)
    if args.json:
        _json(out)
        return 0
    a, b = out["a"], out["b"]
    scores = Table(title=f"B {b['mission_id']} ({b['verdict']}) - A {a['mission_id']} ({a['verdict']})")
    for col in ("arm", "metric", "mean A", "mean B", "B - A", "95% interval", "pairs", "paired by / why not"):
        scores.add_column(col, justify="left" if col in ("arm", "metric", "paired by / why not") else "right")

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:+.4g}"

    for c in out["scores"]:
        interval = f"[{num(c['low'])}, {num(c['high'])}]" if c["paired_by"] else "-"
        scores.add_row(
            c["arm"], c["metric"], f"{c['mean_a']:.4g}", f"{c['mean_b']:.4g}", num(c["estimate"]) if
            c["paired_by"] else "-", interval, str(c["n_pairs"]), c["note"] or c["paired_by"],
        )  # fmt: skip
    console.print(scores if out["scores"] else "no arm and metric scored in both missions")
    inputs = Table(title="inputs that differ")
    for col in ("what", "key", "A", "B"):
        inputs.add_column(col)
    for row in out["inputs"]:
        inputs.add_row(row["what"], row["key"], json.dumps(row["a"]), json.dumps(row["b"]))
    console.print(inputs if out["inputs"] else "the inputs are the same: spec, overrides, code and packages")
    return 0


async def gc(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    if args.keep_last is None and args.older_than is None:
        raise FleetError("bad_request", "say what to keep: --keep-last N, --older-than D, or both")
    req = m.GcRequest(keep_last=args.keep_last, older_than_s=args.older_than, dry_run=args.dry_run)
    out = await client.call("gc", req, timeout=600)
    if args.json:
        _json(out)
        return 0
    console.print(render.gc_table(out))
    partial = out["unreachable"] or out["artifacts"]["errors"] or any(h["error"] for h in out["homes"])
    return 1 if partial else 0  # something is left for the next gc


async def rejudge(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.call("rejudge", m.IdRequest(id=args.mission), timeout=300)
    if args.json:
        _json(out)
        return 0
    console.print(render.decisions_table({"mission_id": out["mission_id"], **out}, out["decisions"]))
    console.print(f"rejudged {out['mission_id']}: {out['verdict']} (was {out['previous'] or '-'})")
    return 0


async def retry(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.call("retry", m.IdRequest(id=args.mission))
    if args.json:
        _json(out)
        return 0
    names = [t.removeprefix(out["mission_id"] + "/") for t in out["retried"]]
    console.print(
        f"retrying {len(names)} failed task(s) of {out['mission_id']}: {', '.join(names)}; "
        f"{len(out['dependents'])} dependent(s) waiting again; `fleetctl status {out['mission_id']}` "
        "follows it",
        highlight=False,
    )
    return 0


async def missions(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.call("missions")
    if args.json:
        _json(out)
        return 0
    t = Table("mission", "profiles", "description", title="available", title_justify="left")
    for spec in out["available"]:
        t.add_row(spec["name"], ", ".join(spec["profiles"]), spec["description"])
    console.print(t)
    r = Table("run", "profile", "state", "verdict", title="runs", title_justify="left")
    for run in out["runs"]:
        r.add_row(run["mission_id"], run["profile"], run["state"], run["verdict"] or "")
    console.print(r)
    return 0


async def workers(client: FleetClient, args: argparse.Namespace, console: Console) -> int:
    out = await client.call("workers")
    _json(out) if args.json else console.print(render.workers_table(out))
    return 0


VERBS = {
    f.__name__: f
    for f in (
        submit,
        status,
        cancel,
        knob,
        logs,
        sql,
        export,
        report,
        compare,
        sweep,
        gc,
        rejudge,
        retry,
        missions,
        workers,
    )
}

if __name__ == "__main__":
    sys.exit(main())
