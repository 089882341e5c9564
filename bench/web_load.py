"""Web page load with a big fleet history: 10,000 tasks and 1,000,000 metric points in DuckDB.

Everything is real: the DuckDB file is built through fleetd.store (one mission of 10,000 tasks made
by the real spec expansion, 1,000,000 points: one task with 500,000, a hundred with 5,000 each), then
a real nats-server (requiring credentials, as under `fleetd up`: `creds.ensure(home)`, the home's
authorization file) and `fleetd --home <home> run` (the coordinator seed of that home) serve it, and
this process times sequential HTTP requests over a keep-alive connection (100 per endpoint after 5
untimed):

- the mission JSON (`/api/missions/{id}`: 10,000 tasks, the grid and the gates);
- a task's curves (`/api/tasks/{big}/curves?points=500`: 500,000 points downsampled in DuckDB);
- the mission's curves (`/api/missions/{id}/curves`: 40 tasks' lines of one metric);
- the fleet page's JSON (`/api/fleet`).

Target: the mission JSON and a curve endpoint answer in at most 300 ms p50. The baseline, timed in
this process on the same file before fleetd opens it, is what a page would cost without server-side
downsampling: reading all of the big task's points and encoding them as JSON. The ratio printed is
baseline / ours.

    .venv/bin/python bench/web_load.py [--tasks 10000] [--points 1000000] [--requests 100] [--out PATH]

Writes bench/results/web_load-cpu.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import duckdb  # noqa: E402
import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fleet import creds  # noqa: E402
from fleet.natsserver import NatsServer, die_with_parent  # noqa: E402
from fleetcli.fleetd import stop_all  # noqa: E402
from fleetd.store import Store, task_row  # noqa: E402
from schemas import missions as specs  # noqa: E402

TARGET_P50_S = 0.300
BIG_SHARE = 0.5  # of the points, in one task
SPREAD_TASKS = 100


def build(home: Path, n_tasks: int, n_points: int) -> tuple[str, str]:
    """The mission (real spec expansion, states as after a long run) and its metrics; returns ids."""
    arms = [f"arm{i}" for i in range(10)]
    seeds = list(range(1, n_tasks // len(arms) + 1))
    spec = msgspec.convert(
        {
            "name": "webload",
            "arms": arms,
            "seeds": seeds,
            "stages": [{"name": "train", "kind": "noop", "foreach": ["arm", "seed"]}],
        },
        specs.MissionSpec,
    )
    mission_id = "webload-20261122-000000-0000"
    tasks = specs.expand(spec, None, mission_id)
    now = time.time()
    rows = []
    for i, t in enumerate(tasks):
        t.created_at = now + i * 1e-6
        row = task_row(t)
        done = i < len(tasks) - 40
        row.update(
            state="succeeded" if done else "pending",
            pending_reason=None if done else "waiting_for_free_worker",
        )
        row.update(
            started_at=now - 3600 + i * 0.3 if done else None,
            finished_at=now - 3000 + i * 0.3 if done else None,
        )
        rows.append(row)
    mission = {
        "mission_id": mission_id, "name": "webload", "profile": "default", "state": "running",
        "verdict": None, "reason": None, "spec": msgspec.json.encode(spec).decode(), "overrides": "{}",
        "submitted_at": now - 3600, "finished_at": None,
    }  # fmt: skip
    store = Store(home / "fleet.duckdb")
    store.apply(new_mission=(mission, rows))
    big = tasks[0].task_id
    per_spread = int(n_points * (1 - BIG_SHARE)) // SPREAD_TASKS
    parts = [(big, n_points - per_spread * SPREAD_TASKS)] + [
        (t.task_id, per_spread) for t in tasks[1 : SPREAD_TASKS + 1]
    ]
    for task_id, n in parts:
        steps = np.arange(n // 2)
        for name, values in (("loss", 2.0 / np.sqrt(steps + 1)), ("accuracy", 1 - 1.0 / np.sqrt(steps + 1))):
            table = pa.table({
                "task_id": [task_id] * len(steps), "attempt": pa.array(np.ones(len(steps)), pa.int32()),
                "name": [name] * len(steps), "step": pa.array(steps, pa.int64()),
                "value": pa.array(values, pa.float64()),
                "time": pa.array(np.full(len(steps), now), pa.float64()),
            })  # fmt: skip
            store.con.register("_pts", table)
            store.con.execute("INSERT INTO metrics SELECT * FROM _pts")
            store.con.unregister("_pts")
    store.close()
    return mission_id, big


def baseline(db: Path, task_id: str, n: int) -> list[float]:
    """Without downsampling: every point of the big task, read and encoded as the page would get it."""
    con = duckdb.connect(str(db), read_only=True)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            rows = con.execute(
                "SELECT name, step, value FROM metrics WHERE task_id = ? AND attempt = 1 ORDER BY name, step",
                [task_id],
            ).fetchall()
            msgspec.json.encode(rows)
            times.append(time.perf_counter() - t)
    finally:
        con.close()
    return times


def timed(
    conn: http.client.HTTPConnection, path: str, n: int, token: str, warmup: int = 5
) -> tuple[list[float], int]:
    times, size = [], 0
    for i in range(warmup + n):
        t = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - t
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}: {body[:200]!r}")
        if i >= warmup:
            times.append(elapsed)
            size = len(body)
    return times, size


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "web_load-cpu.json")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 130)
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="web_load-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        t = time.perf_counter()
        mission_id, big = build(home, args.tasks, args.points)
        console.print(
            f"built {args.tasks:,} tasks and {args.points:,} points in {time.perf_counter() - t:.1f} s"
        )
        base = baseline(home / "fleet.duckdb", big, args.requests)
        creds.ensure(home)  # as `fleetd up`: a seed per role, and the server's authorization
        server = NatsServer(Path(tmp) / "nats", auth=creds.auth_conf(home))
        server.start()
        env = {**os.environ, "FLEET_HOME": str(home), "FLEET_WEB_PORT": "0", "FLEET_WORKER_PRELOAD": ""}
        log = (Path(tmp) / "fleetd.out").open("wb")
        fleetd = subprocess.Popen(
            [sys.executable, "-m", "fleetd", "--home", str(home), "run", "--nats", server.url],
            cwd=REPO, env=env, stdout=log, stderr=log, preexec_fn=die_with_parent,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                found = home / "fleetd.json"
                if found.exists() and json.loads(found.read_text()).get("pid") == fleetd.pid:
                    break
                if time.monotonic() > deadline or fleetd.poll() is not None:
                    raise RuntimeError("fleetd did not start; see " + str(Path(tmp) / "fleetd.out"))
                time.sleep(0.1)
            url = urlsplit(json.loads(found.read_text())["web_url"])
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            token = (home / "web-token").read_text().strip()  # the API needs it (web.guard)
            endpoints = {
                "mission JSON": f"/api/missions/{mission_id}",
                "task curves (500k points -> 500/metric)": f"/api/tasks/{big}/curves?points=500",
                "mission curves (40 tasks, 1 metric)": f"/api/missions/{mission_id}/curves?points=300",
                "fleet page JSON": "/api/fleet",
            }
            results = {name: timed(conn, path, args.requests, token) for name, path in endpoints.items()}
            conn.close()
        finally:
            stop_all([fleetd])
            server.stop()
    table = Table(
        title=f"web load: {args.tasks:,} tasks, {args.points:,} points in DuckDB "
        f"(ms, {args.requests} requests each)"
    )
    for col in ("endpoint", "bytes", "p50", "p90", "p99", "max", "target"):
        table.add_column(col, justify="left" if col in ("endpoint", "target") else "right")
    out: dict[str, Any] = {}
    for name, (times, size) in results.items():
        p50 = pct(times, 50)
        target = (
            "" if name.startswith("fleet") else f"p50 <= 300: {'met' if p50 <= TARGET_P50_S else 'NOT MET'}"
        )
        table.add_row(name, f"{size:,}", *(f"{pct(times, q) * 1e3:.1f}" for q in (50, 90, 99, 100)), target)
        out[name] = {
            "bytes": size,
            **{f"p{q}": pct(times, q) for q in (50, 90, 99, 100)},
            "met": p50 <= TARGET_P50_S,
        }
    table.add_row(
        "baseline: all 500k points, read + JSON (in process)", "",
        *(f"{pct(base, q) * 1e3:.1f}" for q in (50, 90, 99, 100)), "",
    )  # fmt: skip
    console.print(table)
    ratio = pct(base, 50) / pct(results["task curves (500k points -> 500/metric)"][0], 50)
    console.print(f"baseline / task curves (p50): {ratio:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "web_load", "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "args": {k: v for k, v in vars(args).items() if k != "out"}, "endpoints": out,
        "baseline_all_points_s": {f"p{q}": pct(base, q) for q in (50, 90, 99, 100)},
        "baseline_over_task_curves_p50": ratio, "seconds": time.perf_counter() - started,
        "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(
        f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; wrote {args.out}",
        style="dim",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
