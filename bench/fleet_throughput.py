"""Fleet throughput on this machine: metric ingest into DuckDB, and the scheduler's dispatch latency.

Everything is real: a nats-server with JetStream on a temp store (fleet.natsserver), a DuckDB file
in a temp dir (fleetd.store), the Coordinator in this process, and separate OS processes for the
publishers and the workers. Each part gets a fresh server, home and database. The server requires
credentials as under `fleetd up`: `creds.ensure(home)` and the home's authorization file; the
coordinator connects with the coordinator seed, the publishers (which stand in for workers) and the
workers with the worker seed, the control calls with the client seed.

(a) Metric ingest. N publisher processes (default 4) publish `Metrics` events of 1,000 points each
    (columnar `Series`, 4 metrics x 250 steps, as a worker's child batches them) to
    `fleet.evt.<mission>.<task>.metrics` with `Nats-Msg-Id`, via `js.publish_async` (NATS_NOTES §5).
    The path measured is JetStream -> Coordinator.recorder_loop -> record -> Store.apply -> commit.
    - saturated: a fixed number of messages per publisher, sent as fast as they go; the committed
      rate is the points found in DuckDB / (last commit - first publish). Target >= 200,000 points/s.
    - paced: the publishers offer 200,000 points/s together for a fixed time; publish-to-queryable
      latency is time.time() in a `Coordinator.listeners` hook (called after each commit) - ev.ts,
      ev.ts being the publish time. Target p99 <= 1 s.
    Both phases check the metrics table against what the server acknowledged: nothing lost, nothing
    doubled. The baseline is MLflow's `MlflowClient.log_batch` (1,000 metrics per call, the same 4 x
    250 shape) into a local sqlite tracking store, from the same number of processes, each logging
    to its own run; the ratio printed is our saturated rate / MLflow's rate. MLflow writes directly
    from the client into its database; ours goes through the bus first (it is end to end).

(b) Scheduler. Two real workers (`python -m workers --cpu`) and the Coordinator; a 1,000-task
    mission of kind `noop` (one stage, foreach seed) and then 50 one-task missions submitted one at
    a time to the idle fleet. All times are read back from DuckDB afterwards: missions.submitted_at,
    task_attempts.assigned_at, and the worker-side `ts` of each task's started / finished events.
    - submit-to-start (idle fleet): started.ts - submitted_at for the 50 one-task missions, p50/p99
      (the fit rule places every one of them on benchw0). Target p50 <= 20 ms.
    - idle gap: per worker, during the 1,000-task mission, started.ts of task i+1 - finished.ts of
      task i, p50/p99, split into finished -> assigned (recorder + scheduler) and assigned ->
      started (dispatch, the worker's ack of task i and its fetch). Target p50 <= 50 ms.
    The 1,000-task mission's own submit-to-start is reported for its first task on each worker only:
    later tasks queue behind the others, so their submit-to-start measures the queue, not dispatch.

Runtime on a quiet 2-core box is about 2 minutes (each noop task is a fork of the worker's
preloaded template process), and more when the box is shared; --tasks 200 makes it shorter.
The load average before and after is printed and saved.

    .venv/bin/python bench/fleet_throughput.py [--publishers 4] [--tasks 1000] [--out PATH]

Writes bench/results/fleet_throughput-cpu.json. Needs no network (MLflow's telemetry is switched off
and its tracking URI is the local sqlite file); MLflow is optional (pip install -e '.[bench]'), its
row is skipped when it is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import anyio  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from fleet import bus, creds, tls  # noqa: E402
from fleet.client import FleetClient  # noqa: E402
from fleet.cluster import Cluster  # noqa: E402
from fleet.config import FleetConfig  # noqa: E402
from fleet.natsserver import NatsServer, die_with_parent  # noqa: E402
from fleet.view import Commit  # noqa: E402
from fleetcli import fleetd as cli  # noqa: E402
from fleetd.coordinator import Coordinator  # noqa: E402
from schemas import messages as m  # noqa: E402

POINTS_PER_MSG = 1000
METRIC_NAMES = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")  # 4 x 250 = 1,000
INGEST_RATE_TARGET = 200_000.0  # points/s committed
INGEST_P99_TARGET = 1.0  # s, publish -> queryable
SUBMIT_P50_TARGET = 0.020  # s, submit -> started on an idle fleet
GAP_P50_TARGET = 0.050  # s, a worker's finished -> its next started
MLFLOW_MISSING = "mlflow not installed (pip install -e '.[bench]')"
MLFLOW_OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


# ---- helper processes: publishers and MLflow loggers -------------------------------------------------------


def _series(seq: int, ts: float) -> dict[str, m.Series]:
    per = POINTS_PER_MSG // len(METRIC_NAMES)
    steps = list(range(seq * per, (seq + 1) * per))
    times = [ts - 0.25 + 0.001 * i for i in range(per)]
    return {
        name: m.Series(steps, [1.0 / (s + 1) + k for s in steps], times)
        for k, name in enumerate(METRIC_NAMES)
    }


def _handshake() -> float:
    """Say ready on stdout, block until the parent writes 'go' (so every helper starts together)."""
    print("ready", flush=True)
    sys.stdin.readline()
    return time.time()


async def _publish(job: dict[str, Any]) -> dict[str, Any]:
    ca = Path(job["ca"]) if job.get("ca") else None  # the cluster's CA (its URLs are tls://)
    nc = await bus.connect(job["url"], f"bench-pub{job['index']}", Path(job["creds"]), ca)  # as a worker
    js = nc.jetstream(timeout=30, publish_async_max_pending=256)
    counts = {"acked": 0, "duplicates": 0, "errors": 0}
    errors: list[str] = []

    def done(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            counts["errors"] += 1
            errors.append(repr(fut.exception()) if not fut.cancelled() else "cancelled")
        elif fut.result().duplicate:
            counts["duplicates"] += 1
        else:
            counts["acked"] += 1

    task_id = f"{job['prefix']}/p{job['index']}"  # <mission>/<stage>, as schemas.messages.TaskId wants
    messages, rate, seconds = job.get("messages"), job.get("rate_msgs"), job.get("seconds")
    t0 = await anyio.to_thread.run_sync(_handshake)
    seq = 0
    while True:
        if messages is not None and seq >= messages:
            break
        if rate is not None:
            due = t0 + seq / rate
            if seconds is not None and due >= t0 + seconds:
                break
            if (wait := due - time.time()) > 0:
                await asyncio.sleep(wait)
        now = time.time()
        ev = m.Metrics(
            mission_id=job["prefix"], task_id=task_id, attempt=1, seq=seq, worker=f"pub{job['index']}",
            ts=now, series=_series(seq, now),
        )  # fmt: skip
        fut = await js.publish_async(
            m.event_subject(ev), m.encode(ev), headers={"Nats-Msg-Id": m.event_msg_id(ev)}
        )
        fut.add_done_callback(done)
        seq += 1
    await js.publish_async_completed()
    t_end = time.time()
    await nc.drain()
    return {"t0": t0, "t_end": t_end, "messages": seq, **counts, "error_samples": errors[:3]}


def publisher_main(job: dict[str, Any]) -> None:
    from fleet import logs

    logs.configure(level="warning")
    print(json.dumps(anyio.run(_publish, job)), flush=True)


def mlflow_main(job: dict[str, Any]) -> None:
    os.environ.update({"MLFLOW_TRACKING_URI": job["uri"], **MLFLOW_OFFLINE})
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=job["uri"])
    per = POINTS_PER_MSG // len(METRIC_NAMES)
    t0 = _handshake()
    batches, errors, samples = 0, 0, []
    while time.time() < t0 + job["seconds"]:
        now = time.time()
        ms = int(now * 1000)
        metrics = [
            Metric(name, 1.0 / (s + 1) + k, ms, s)
            for k, name in enumerate(METRIC_NAMES)
            for s in range(batches * per, (batches + 1) * per)
        ]
        try:
            client.log_batch(job["run_id"], metrics=metrics)
        except Exception as e:  # e.g. sqlite "database is locked" under concurrent writers
            errors += 1
            samples.append(repr(e)[:200])
            continue
        batches += 1
    print(json.dumps({"t0": t0, "t_end": time.time(), "batches": batches, "errors": errors,
                      "error_samples": samples[:3]}), flush=True)  # fmt: skip


# ---- process handling --------------------------------------------------------------------------------------


class Procs:
    """Every child process this benchmark starts; `stop()` ends them all (called from finally blocks)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
        p = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, preexec_fn=die_with_parent, **kw)
        self.procs.append(p)
        return p

    def helpers(self, role: str, jobs: list[dict[str, Any]], env: dict[str, str] | None = None) -> list[Any]:
        """Start one helper per job, wait for all to say ready, release them together, collect JSON."""
        procs = [
            self.spawn(
                [__file__, "--role", role, "--job", json.dumps(job)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env or {},
            )
            for job in jobs
        ]
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{role} helper did not start (rc {p.wait()})")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        out = []
        for p in procs:
            stdout, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"{role} helper exited with {p.returncode}")
            out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        return out

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None, grace: float = 5.0) -> dict[str, Any]:
        """SIGTERM, then SIGKILL what is still running after `grace` seconds; says how that went."""
        procs = self.procs if procs is None else procs
        t0 = time.monotonic()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        killed = 0
        for p in procs:
            try:
                p.wait(max(0.0, t0 + grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                killed += 1
        return {"seconds": time.monotonic() - t0, "killed_after_grace": killed, "grace_s": grace}


@contextmanager
def nats_server(root: Path, home: Path, nodes: int = 1) -> Iterator[NatsServer | Cluster]:
    """An authenticated server, as `fleetd up` starts one: the home's credentials, its authorization;
    with `nodes` > 1, a cluster as `fleetd up --cluster` starts it (routes, TLS, a store per node)."""
    creds.ensure(home)
    server = NatsServer(root / "nats", auth=creds.auth_conf(home)) if nodes == 1 else Cluster(home, nodes)
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await anyio.sleep(every)


def pct(xs: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def summary(xs: list[float] | np.ndarray) -> dict[str, float]:
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99), "max": pct(xs, 100)}


# ---- (a) metric ingest -------------------------------------------------------------------------------------


@dataclass
class Ingest:
    """What the commit hook saw for one phase (events with this task-id prefix)."""

    prefix: str
    points: int = 0
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    last_commit: float = 0.0


def _on_commit(phases: dict[str, Ingest]) -> Callable[[Commit], None]:
    def hook(commit: Commit) -> None:
        now = time.time()
        for ev in commit.events:
            if isinstance(ev, m.Metrics):
                ph = phases.get(ev.mission_id)
                if ph is None:
                    continue
                ph.latencies.append(now - ev.ts)
                ph.points += sum(len(s.values) for s in ev.series.values())
                ph.events += 1
                ph.last_commit = now

    return hook


async def ingest_phase(
    coord: Coordinator, procs: Procs, url: str, seed: Path, ph: Ingest, n: int, **job: Any
) -> dict[str, Any]:
    ca = tls.find_ca(seed.parent.parent)  # the home's CA, if it runs a cluster
    jobs = [
        {"url": url, "creds": str(seed), "ca": str(ca or ""), "index": i, "prefix": ph.prefix, **job}
        for i in range(n)
    ]
    pubs = await anyio.to_thread.run_sync(procs.helpers, "publisher", jobs)
    published = sum(p["acked"] for p in pubs) * POINTS_PER_MSG
    t0, t_pub_end = min(p["t0"] for p in pubs), max(p["t_end"] for p in pubs)
    with suppress(TimeoutError):
        await wait_until(lambda: ph.points >= published, 180, f"{ph.prefix}: every point committed", 0.05)
    await anyio.sleep(0.5)  # anything arriving late (a double) would show now
    rows = await coord.read(
        coord.store.query,
        "SELECT count(*) AS n, count(DISTINCT (task_id, name, step)) AS distinct_n FROM metrics "
        "WHERE task_id LIKE ?",
        [f"{ph.prefix}/%"],
    )
    in_db, distinct = int(rows[0]["n"]), int(rows[0]["distinct_n"])
    span = ph.last_commit - t0
    return {
        "phase": ph.prefix,
        "publishers": n,
        "messages_acked": sum(p["acked"] for p in pubs),
        "publish_duplicates": sum(p["duplicates"] for p in pubs),
        "publish_errors": sum(p["errors"] for p in pubs),
        "publish_error_samples": [s for p in pubs for s in p["error_samples"]][:3],
        "points_published": published,
        "points_in_duckdb": in_db,
        "points_distinct": distinct,
        "lost": published - distinct,
        "doubled": in_db - distinct,
        "publish_s": t_pub_end - t0,
        "offered_points_per_s": published / (t_pub_end - t0),
        "commit_span_s": span,
        "committed_points_per_s": in_db / span if span > 0 else float("nan"),
        "latency_s": summary(ph.latencies),
    }


def mlflow_baseline(procs: Procs, root: Path, n: int, seconds: float) -> dict[str, Any]:
    os.environ.update(MLFLOW_OFFLINE)  # before the import: MLflow 3 sends usage telemetry otherwise
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError:
        return {"skipped": MLFLOW_MISSING}
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    db = root / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    uri = f"sqlite:///{db}"
    env = {"MLFLOW_TRACKING_URI": uri, **MLFLOW_OFFLINE}
    os.environ.update(env)  # explicit: nothing is looked up, nothing leaves the machine
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment("fleet_throughput")
        runs = [client.create_run(exp).info.run_id for _ in range(n)]
    except Exception as e:  # e.g. mlflow-skinny without sqlalchemy/alembic: no sqlite store
        return {"skipped": f"MLflow sqlite store unavailable ({type(e).__name__}); {MLFLOW_MISSING}"}
    try:
        out = procs.helpers("mlflow", [{"uri": uri, "run_id": r, "seconds": seconds} for r in runs], env)
    except RuntimeError as e:
        return {"skipped": f"mlflow helpers failed: {e}"}
    t0, t_end = min(o["t0"] for o in out), max(o["t_end"] for o in out)
    logged = sum(o["batches"] for o in out) * POINTS_PER_MSG
    with sqlite3.connect(db) as con:
        in_db = con.execute("SELECT count(*) FROM metrics").fetchone()[0]
    import mlflow as mlf

    return {
        "mlflow": mlf.__version__,
        "store": "sqlite (local file)",
        "processes": n,
        "seconds": t_end - t0,
        "points_logged": logged,
        "points_in_db": in_db,
        "errors": sum(o["errors"] for o in out),
        "error_samples": [s for o in out for s in o["error_samples"]][:3],
        "points_per_s": in_db / (t_end - t0),
    }


async def part_a(args: argparse.Namespace, root: Path, procs: Procs, console: Console) -> dict[str, Any]:
    home = root / "home"
    cfg = FleetConfig(home=str(home))  # the coordinator finds <home>/creds/coordinator.nk
    with nats_server(root, home, args.nodes) as server:
        seed = creds.seed_path(home, "worker")  # the publishers publish events as a worker would
        async with cli.coordinator(cfg, server.url) as coord, anyio.create_task_group() as tg:
            sat, paced = Ingest("sat"), Ingest("paced")
            coord.listeners.append(_on_commit({"sat": sat, "paced": paced}))
            await tg.start(coord.run)
            n = args.publishers
            console.print(
                f"(a) saturated: {n} publishers x {args.sat_messages} messages x {POINTS_PER_MSG} points"
            )
            saturated = await ingest_phase(coord, procs, server.url, seed, sat, n, messages=args.sat_messages)
            rate = args.paced_rate / n / POINTS_PER_MSG
            console.print(f"(a) paced: {args.paced_rate:,.0f} points/s offered for {args.paced_seconds:g} s")
            paced_out = await ingest_phase(
                coord, procs, server.url, seed, paced, n, rate_msgs=rate, seconds=args.paced_seconds
            )
            tg.cancel_scope.cancel()
    mlf: dict[str, Any] = {"skipped": "--no-mlflow"}
    if not args.no_mlflow:
        console.print(
            f"(a) MLflow baseline: {n} processes x {args.mlflow_seconds:g} s of log_batch(1,000 metrics)"
        )
        mlf = await anyio.to_thread.run_sync(mlflow_baseline, procs, root, n, args.mlflow_seconds)
    return {"saturated": saturated, "paced": paced_out, "mlflow": mlf}


# ---- (b) scheduler -----------------------------------------------------------------------------------------


def write_missions(directory: Path, tasks: int) -> None:
    directory.mkdir(parents=True)
    for name, seeds in (("noopbench", list(range(1, tasks + 1))), ("nooponce", [1])):
        (directory / f"{name}.toml").write_text(
            f'name = "{name}"\ndescription = "fleet_throughput: no-op tasks"\nseeds = {seeds}\n\n'
            "[defaults]\ntimeout_s = 60\nmax_attempts = 1\nmax_infra_attempts = 3\n\n"
            '[[stages]]\nname = "noop"\nkind = "noop"\nforeach = ["seed"]\n'
        )


TIMES_SQL = """
SELECT t.task_id, t.mission_id, t.state, t.attempt, mi.name AS mission, mi.submitted_at,
       a.worker, a.assigned_at, s.ts AS started, f.ts AS finished
FROM tasks t
JOIN missions mi USING (mission_id)
LEFT JOIN task_attempts a ON a.task_id = t.task_id AND a.attempt = t.attempt
LEFT JOIN events s ON s.task_id = t.task_id AND s.attempt = t.attempt AND s.kind = 'started'
LEFT JOIN events f ON f.task_id = t.task_id AND f.attempt = t.attempt AND f.kind = 'finished'
"""


async def part_b(args: argparse.Namespace, root: Path, procs: Procs, console: Console) -> dict[str, Any]:
    home = root / "home"
    write_missions(root / "missions", args.tasks)
    cfg = FleetConfig(home=str(home), missions_dir=str(root / "missions"))
    workers = ["benchw0", "benchw1"]
    (home / "logs").mkdir(parents=True)
    with nats_server(root, home, args.nodes) as server:
        async with cli.coordinator(cfg, server.url) as coord:
            async with anyio.create_task_group() as tg:
                await tg.start(coord.run)
                worker_procs = []
                for w in workers:
                    log = (home / "logs" / f"{w}.out").open("ab")
                    # as `fleetd up` starts it: --home, so it finds <home>/creds/worker.nk
                    worker_procs.append(procs.spawn(
                        cli.worker_args(w, server.url, home, threads=1,
                                        log_file=home / "logs" / f"worker-{w}.log"),
                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    ))  # fmt: skip
                    log.close()  # the child holds its own descriptor
                await wait_until(
                    lambda: all(coord.sched.alive(w) for w in workers), 60, "2 workers alive", 0.05
                )
                await anyio.sleep(1.0)  # both spares warm, both fetches waiting
                client = await FleetClient.connect(
                    server.url, creds.seed_path(home, "client"), tls.find_ca(home)
                )

                def ended(mid: str) -> bool:
                    return coord.sched.missions[mid].state in ("succeeded", "failed", "cancelled")

                try:
                    console.print(f"(b) {args.tasks} noop tasks on {len(workers)} workers")
                    t_submit = time.time()
                    big = (await client.submit("noopbench"))["mission_id"]
                    await wait_until(lambda: ended(big), 900, "the noopbench mission", 0.05)
                    t_big = time.time() - t_submit
                    console.print(f"(b) {args.single} one-task missions, one at a time")
                    singles = []
                    for _ in range(args.single):
                        await anyio.sleep(args.idle_s)  # the worker acked, warmed its spare and waits
                        mid = (await client.submit("nooponce"))["mission_id"]
                        singles.append(mid)
                        await wait_until(lambda mid=mid: ended(mid), 60, f"mission {mid}")
                finally:
                    await client.close()
                    stopped = await anyio.to_thread.run_sync(procs.stop, worker_procs, args.worker_grace)
                tg.cancel_scope.cancel()
            rows = coord.store.query(TIMES_SQL)
    out = analyse_b(rows, big, singles, t_big, workers, args.tasks)
    out["worker_shutdown"] = stopped
    return out


def analyse_b(
    rows: list[dict[str, Any]], big: str, singles: list[str], t_big: float, workers: list[str], n: int
) -> dict[str, Any]:
    bad = [r for r in rows if r["state"] != "succeeded" or r["attempt"] != 1 or r["started"] is None]
    big_rows = [r for r in rows if r["mission_id"] == big and r["started"] is not None]
    single_rows = [r for r in rows if r["mission_id"] in singles and r["started"] is not None]
    s2s = [r["started"] - r["submitted_at"] for r in single_rows]
    s2a = [r["assigned_at"] - r["submitted_at"] for r in single_rows]
    a2s = [r["started"] - r["assigned_at"] for r in single_rows]
    per_worker: dict[str, Any] = {}
    first: dict[str, float] = {}
    first_assigned: dict[str, float] = {}
    all_gaps: list[float] = []
    for w in workers:
        mine = sorted((r for r in big_rows if r["worker"] == w), key=lambda r: r["started"])
        if not mine:
            per_worker[w] = {"tasks": 0}
            continue
        first[w] = mine[0]["started"] - mine[0]["submitted_at"]
        first_assigned[w] = mine[0]["assigned_at"] - mine[0]["submitted_at"]
        gaps, f2a, a2st = [], [], []
        for prev, nxt in itertools.pairwise(mine):
            gaps.append(nxt["started"] - prev["finished"])
            f2a.append(nxt["assigned_at"] - prev["finished"])
            a2st.append(nxt["started"] - nxt["assigned_at"])
        runs = [r["finished"] - r["started"] for r in mine if r["finished"] is not None]
        all_gaps += gaps
        per_worker[w] = {
            "tasks": len(mine),
            "idle_gap_s": summary(gaps),
            "finished_to_assigned_s": summary(f2a),
            "assigned_to_started_s": summary(a2st),
            "started_to_finished_s": summary(runs),
        }
    return {
        "tasks": n,
        "not_clean": len(bad),
        "mission_wall_s": t_big,
        "tasks_per_s": len(big_rows) / t_big,
        "first_task_submit_to_start_s": first,
        "first_task_submit_to_assigned_s": first_assigned,
        "single_missions": len(singles),
        "submit_to_start_s": summary(s2s),
        "submit_to_assigned_s": summary(s2a),
        "assigned_to_started_s": summary(a2s),
        "per_worker": per_worker,
        "idle_gap_all_s": summary(all_gaps),
    }


# ---- report ------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def report(a: dict[str, Any] | None, b: dict[str, Any] | None, console: Console) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    if a is not None:
        sat, paced, mlf = a["saturated"], a["paced"], a["mlflow"]
        t = Table(
            title=f"(a) metric ingest: {sat['publishers']} publishers -> JetStream -> recorder -> DuckDB"
        )
        for col in ("phase", "points", "in DuckDB", "lost / doubled", "offered pts/s", "committed pts/s",
                    "latency p50 / p99 ms", "target"):  # fmt: skip
            t.add_column(col, justify="left" if col in ("phase", "target") else "right")
        ok_rate = sat["committed_points_per_s"] >= INGEST_RATE_TARGET and sat["lost"] == sat["doubled"] == 0
        ok_lat = (
            paced["latency_s"]["p99"] <= INGEST_P99_TARGET
            and paced["lost"] == paced["doubled"] == 0
            and paced["points_in_duckdb"] == paced["points_published"]
        )
        checks += [
            {"check": "ingest committed points/s (saturated)", "value": sat["committed_points_per_s"],
             "target": f">= {INGEST_RATE_TARGET:,.0f}", "met": ok_rate},
            {"check": f"ingest latency p99 at {paced['offered_points_per_s']:,.0f} pts/s",
             "value": paced["latency_s"]["p99"], "target": f"<= {INGEST_P99_TARGET:g} s", "met": ok_lat},
        ]  # fmt: skip
        for row, target in (
            (sat, f">= {INGEST_RATE_TARGET:,.0f} pts/s: {verdict(ok_rate)}"),
            (paced, f"p99 <= {INGEST_P99_TARGET:g} s: {verdict(ok_lat)}"),
        ):
            lat = row["latency_s"]
            t.add_row(
                row["phase"],
                f"{row['points_published']:,}",
                f"{row['points_in_duckdb']:,}",
                f"{row['lost']} / {row['doubled']}",
                f"{row['offered_points_per_s']:,.0f}",
                f"{row['committed_points_per_s']:,.0f}",
                f"{ms(lat['p50'])} / {ms(lat['p99'])}",
                target,
            )
        if "skipped" in mlf:
            t.add_row("MLflow log_batch", "", "", "", "", "skipped", "", escape(mlf["skipped"]))
        else:
            ratio = sat["committed_points_per_s"] / mlf["points_per_s"]
            mlf["ratio_ours_over_mlflow"] = ratio
            t.add_row(
                f"MLflow {mlf['mlflow']} log_batch, sqlite, {mlf['processes']} proc",
                f"{mlf['points_logged']:,}",
                f"{mlf['points_in_db']:,}",
                f"errors {mlf['errors']}",
                "",
                f"{mlf['points_per_s']:,.0f}",
                "",
                f"ours / MLflow = {ratio:.1f}x",
            )
        console.print(t)
        if sat["publish_errors"] or paced["publish_errors"]:
            samples = sat["publish_error_samples"] + paced["publish_error_samples"]
            console.print(escape(f"publish errors: {samples}"))
        if "skipped" not in mlf:
            console.print(
                "ours / MLflow: our saturated committed rate over MLflow's; MLflow writes from the client "
                "straight into sqlite, ours crosses JetStream first and is checked row for row"
            )
        if mlf.get("error_samples"):
            console.print(escape(f"MLflow errors: {mlf['error_samples']}"))
    if b is not None:
        t = Table(
            title=f"(b) scheduler: {b['tasks']} noop tasks on 2 CPU workers, then "
            f"{b['single_missions']} one-task missions on the idle fleet (ms)"
        )
        for col in ("measure", "n", "p50", "p90", "p99", "max", "target"):
            t.add_column(col, justify="left" if col in ("measure", "target") else "right")

        def add(name: str, s: dict[str, float], target: str = "") -> None:
            t.add_row(name, str(s["n"]), ms(s["p50"]), ms(s["p90"]), ms(s["p99"]), ms(s["max"]), target)

        ok_s2s = b["submit_to_start_s"]["p50"] <= SUBMIT_P50_TARGET
        add("submit -> started (idle fleet)", b["submit_to_start_s"],
            f"p50 <= {SUBMIT_P50_TARGET * 1e3:g}: {verdict(ok_s2s)}")  # fmt: skip
        add("  submit -> assigned", b["submit_to_assigned_s"])
        add("  assigned -> started", b["assigned_to_started_s"])
        checks.append({"check": "submit-to-start p50 (idle fleet)", "value": b["submit_to_start_s"]["p50"],
                       "target": f"<= {SUBMIT_P50_TARGET * 1e3:g} ms", "met": ok_s2s})  # fmt: skip
        for w, pw in b["per_worker"].items():
            if not pw["tasks"]:
                t.add_row(f"{w}: no tasks", "", "", "", "", "", verdict(False))
                checks.append({"check": f"{w} idle gap p50", "value": None, "target": "", "met": False})
                continue
            ok_gap = pw["idle_gap_s"]["p50"] <= GAP_P50_TARGET
            add(f"{w} idle gap (finished -> next started)", pw["idle_gap_s"],
                f"p50 <= {GAP_P50_TARGET * 1e3:g}: {verdict(ok_gap)}")  # fmt: skip
            add("  finished -> next assigned", pw["finished_to_assigned_s"])
            add("  assigned -> started", pw["assigned_to_started_s"])
            add("  task started -> finished", pw["started_to_finished_s"])
            checks.append({"check": f"{w} idle gap p50", "value": pw["idle_gap_s"]["p50"],
                           "target": f"<= {GAP_P50_TARGET * 1e3:g} ms", "met": ok_gap})  # fmt: skip
        console.print(t)
        first = ", ".join(
            f"{w} {ms(v)} ms (assigned after {ms(b['first_task_submit_to_assigned_s'][w])})"
            for w, v in b["first_task_submit_to_start_s"].items()
        )
        sd = b["worker_shutdown"]
        console.print(
            f"{b['tasks']}-task mission: {b['mission_wall_s']:.1f} s, {b['tasks_per_s']:.1f} tasks/s; "
            f"first task's submit -> started: {first}; tasks not clean (failed, retried, no start): "
            f"{b['not_clean']}; workers' exit on SIGTERM: {sd['seconds']:.1f} s, "
            f"{sd['killed_after_grace']} killed after {sd['grace_s']:g} s"
        )
    return checks


# ---- main --------------------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from fleet import logs

    base = Path(tempfile.mkdtemp(prefix="fleet_throughput-"))
    logs.configure(path=base / "fleetd.log")  # the coordinator's log lines go to a file, not the table
    procs = Procs()
    out: dict[str, Any] = {"a": None, "b": None}
    try:
        if not args.skip_a:
            out["a"] = await part_a(args, base / "a", procs, console)
        if not args.skip_b:
            out["b"] = await part_b(args, base / "b", procs, console)
    finally:
        procs.stop()
        if args.keep:
            console.print(f"kept {base}", style="dim")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return out


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["publisher", "mlflow"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--publishers", type=int, default=4, help="publisher (and MLflow) processes")
    parser.add_argument("--sat-messages", type=int, default=500, help="saturated: messages per publisher")
    parser.add_argument(
        "--paced-rate", type=float, default=INGEST_RATE_TARGET, help="paced: points/s offered"
    )
    parser.add_argument("--paced-seconds", type=float, default=8.0)
    parser.add_argument("--mlflow-seconds", type=float, default=5.0)
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--tasks", type=int, default=1000, help="noop tasks in the big mission")
    parser.add_argument("--single", type=int, default=50, help="one-task missions on the idle fleet")
    parser.add_argument("--idle-s", type=float, default=0.25, help="pause before each one-task mission")
    parser.add_argument("--worker-grace", type=float, default=5.0, help="SIGTERM -> SIGKILL wait")
    parser.add_argument("--nodes", type=int, default=1, help="NATS nodes: 1, or a cluster (bench/cluster.py)")
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, databases)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fleet_throughput-cpu.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.role == "publisher":
        publisher_main(json.loads(args.job))
        return 0
    if args.role == "mlflow":
        mlflow_main(json.loads(args.job))
        return 0

    console = Console(width=None if sys.stdout.isatty() else 140)
    started = time.perf_counter()
    load_before = os.getloadavg()
    out = anyio.run(run_all, args, console)
    load_after = os.getloadavg()
    checks = report(out["a"], out["b"], console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "fleet_throughput",
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "points_per_message": POINTS_PER_MSG,
        "args": {k: v for k, v in vars(args).items() if k not in ("role", "job", "out")},
        "checks": checks,
        "ingest": out["a"],
        "scheduler": out["b"],
        "seconds": time.perf_counter() - started,
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": load_after,
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    console.print(
        f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on "
        f"{os.cpu_count()} CPUs; wrote {args.out} in {time.perf_counter() - started:.0f}s",
        style="dim",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
