"""`make results`: the smoke missions on a fresh temporary fleet, each one's report into docs/results/.

`python -m fleetcli.results [--missions demo,mission_a,mission_b,mission_c,mission_d,mission_e]
[--profile smoke] [--out DIR]` starts `fleetd up --cpu-workers N` on a new home in a temporary
folder, submits the missions one after the other, and writes `fleetctl report` for each (stamped with
this checkout's commit, "dirty" when the tree has changes). Exits 1 when a mission did not succeed or
did not end in time (its report is still written when it ended); the temporary home is kept then, for
its logs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from rich.console import Console

from fleet import creds, render
from fleet import logs as log_setup
from fleet.client import FleetClient, FleetError
from fleet.natsserver import die_with_parent
from fleetcli import report as reporting


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fleetcli.results", description=__doc__.splitlines()[0])
    p.add_argument(
        "--missions",
        default="demo,mission_a,mission_b,mission_c,mission_d,mission_e",
        help="comma-separated mission names",
    )
    p.add_argument("--profile", default="smoke")
    p.add_argument("--out", type=Path, default=Path("docs/results"), metavar="DIR")
    p.add_argument("--cpu-workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per mission (default 4 h)")
    p.add_argument("--keep-home", action="store_true", help="keep the temporary fleet home")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log_setup.configure(level="error")  # the client's reconnect chatter is not for this output
    console = Console()
    home = Path(tempfile.mkdtemp(prefix="bem-fleet-results-"))
    log = (home / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "fleetd", "--home", str(home), "up",
         "--cpu-workers", str(args.cpu_workers), "--web-port", "0"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )  # fmt: skip
    ok = False
    try:
        console.print(f"results at commit {reporting.stamp()}; fleet home {home}", highlight=False)
        ok = anyio.run(_run, args, home, up, console)
    except FleetError as e:
        console.print(f"[red]results: {e}[/]", highlight=False)
    finally:
        up.terminate()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()
    if ok and not args.keep_home:
        shutil.rmtree(home, ignore_errors=True)
    else:
        console.print(f"the fleet's home and logs stay in {home}", highlight=False)
    return 0 if ok else 1


async def _run(args: argparse.Namespace, home: Path, up: subprocess.Popen[bytes], console: Console) -> bool:
    info = home / "fleetd.json"
    deadline = time.monotonic() + 120
    while not info.is_file():
        if up.poll() is not None or time.monotonic() > deadline:
            raise FleetError("no_fleet", f"fleetd up did not start (see {home / 'up.log'})")
        await anyio.sleep(0.2)
    client = await FleetClient.connect(
        json.loads(info.read_text())["nats_url"], creds.seed_path(home, "client")
    )
    try:
        while sum(w["alive"] for w in await client.call("workers")) < args.cpu_workers:
            if time.monotonic() > deadline:
                raise FleetError(
                    "no_fleet", f"{args.cpu_workers} workers did not start (see {home / 'logs'})"
                )
            await anyio.sleep(0.5)
        ok = True
        for name in [n.strip() for n in args.missions.split(",") if n.strip()]:
            sub = await client.submit(name, args.profile)
            mission_id = sub["mission_id"]
            console.print(f"submitted [bold]{mission_id}[/] ({args.profile}, {len(sub['tasks'])} tasks)")
            with anyio.move_on_after(args.timeout) as scope:
                st = await render.follow(client, mission_id, console, poll_s=2.0)
            if scope.cancelled_caught:
                console.print(f"[red]{mission_id} did not end within {args.timeout:g} s[/]")
                return False
            state = st["missions"][0]["state"]
            written = reporting.write(await reporting.fetch(client, mission_id), args.out)
            console.print(
                f"{mission_id}: {state}, verdict {st['missions'][0]['verdict'] or '-'}; "
                f"wrote {written['markdown']} and {written['html']}",
                highlight=False,
            )
            ok = ok and state == "succeeded"
        return ok
    finally:
        await client.close()


if __name__ == "__main__":
    sys.exit(main())
