"""`fleetd up | run | creds | config show`.

`up` is the all-in-one local mode: embedded nats-server, coordinator, and worker processes (one per
GPU, or --cpu-workers N), all children that die with it. `run` is the coordinator alone (systemd).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import structlog
from rich.console import Console
from rich.table import Table

from fleet import artifacts, bus, config, creds, logs, render, sdnotify, tls
from fleet.client import FleetClient, FleetError
from fleet.cluster import Cluster
from fleet.natsserver import NatsServer, NatsServerError, die_with_parent, reload_servers
from fleetd.coordinator import Coordinator
from fleetd.store import SchemaMismatch, Store
from web import app as web_app
from web import guard
from workers import gpus
from workers.worker import default_id

log = structlog.get_logger("fleetd")


class HomeBusy(RuntimeError):
    pass


def lock_home(home: Path) -> IO[str]:
    """One fleet per home: an exclusive flock for the process's life (the kernel releases it on kill -9)."""
    home.mkdir(parents=True, exist_ok=True)
    f = (home / "fleetd.lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        raise HomeBusy(f"another fleet is running on {home} (pid {holder}); stop it or use --home") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


@asynccontextmanager
async def coordinator(cfg: config.FleetConfig, url: str) -> AsyncIterator[Coordinator]:
    home = cfg.home_path
    store = Store(home / "fleet.duckdb")
    ca = tls.find_ca(home, cfg.nats.tls_ca_file)
    nc = await bus.connect(url, "fleetd", creds.find(home, "coordinator", cfg.nats.credentials_file), ca)
    try:
        js = nc.jetstream(timeout=5)
        replicas = bus.replicas(nc)
        await bus.ensure_streams(js, replicas=replicas)
        kv = await bus.workers_kv(js, replicas=replicas)
        await artifacts.ensure_bucket(js, replicas=replicas, max_bytes=cfg.artifacts.max_bytes)
        log.info("bus_ready", url=nc.connected_url.geturl() if nc.connected_url else url, replicas=replicas)
        yield Coordinator(cfg, store, nc, js, kv)
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
            store.close()


async def _serve(coord: Coordinator, home: Path, url: str, console: Console | None = None) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(coord.run)
        token = guard.web_token(coord.cfg.web, home)
        web_url = await tg.start(web_app.serve, coord, coord.cfg.web, token)
        coord.notifier.page = web_url  # the link in each notification
        found = {"nats_url": url, "web_url": web_url, "pid": os.getpid()}
        (home / "fleetd.json").write_text(json.dumps(found))
        # Bus, store and web are up: systemd's Type=notify start completes here.
        sdnotify.notify("READY=1", f"STATUS=serving {web_url}, NATS {url}")
        tg.start_soon(sdnotify.watchdog_loop)
        log.info("fleetd_ready", web=web_url, nats=url)
        if console is not None:  # the link signs this browser in (a cookie), as Jupyter's does
            console.print(f"status page: [bold]{web_url}/?token={token}[/]", soft_wrap=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                log.info("shutting_down", signal=signal.Signals(sig).name)
                sdnotify.notify("STOPPING=1")
                tg.cancel_scope.cancel()
                break


async def run_cmd(cfg: config.FleetConfig) -> int:
    if not cfg.nats.url:
        raise SystemExit(
            "fleetd run: set nats.url in fleetd.toml, FLEET_NATS_URL or --nats (or use `fleetd up`)"
        )
    lock = lock_home(cfg.home_path)
    try:
        async with coordinator(cfg, cfg.nats.url) as coord:
            await _serve(coord, cfg.home_path, cfg.nats.url)
    finally:
        lock.close()
    return 0


def worker_args(
    worker_id: str,
    url: str,
    home: Path,
    gpu: str | None = None,
    threads: int | None = None,
    log_file: Path | None = None,
    own_home: bool = False,
) -> list[str]:
    """`python` arguments that start one worker (`fleet-worker` as a module) on `gpu`, or a CPU worker.

    `own_home`: the worker keeps its runs and cache in `<home>/hosts/<worker_id>`, sharing no files with
    the others, as a worker on another box would (it still reads the fleet's credential and CA)."""
    args = ["-m", "workers", "--id", worker_id, "--nats", url, "--home", str(home)]
    if own_home:
        args[-1] = str(home / "hosts" / worker_id)
        args += ["--creds", str(creds.seed_path(home, "worker")), "--tls-ca", str(tls.files(home).ca)]
    args += ["--gpu", gpu] if gpu else ["--cpu"]
    if threads:
        args += ["--threads", str(threads)]
    if log_file is not None:
        args += ["--log-file", str(log_file)]
    return args


class WorkerProcs:
    """The worker children of `fleetd up`, restarted when they exit (as Restart=on-failure would)."""

    def __init__(
        self,
        home: Path,
        url: str,
        specs: list[tuple[str, str | None]],
        threads: int | None,
        settings: config.WorkerConfig,
        own_homes: bool = False,
    ) -> None:
        self.home, self.url, self.specs, self.threads = home, url, specs, threads
        self.own_homes = own_homes
        self.env = {**os.environ, **settings.env()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, worker_id: str, gpu: str | None) -> None:
        log_file = self.home / "logs" / f"worker-{worker_id}.log"
        args = worker_args(worker_id, self.url, self.home, gpu, self.threads, log_file, self.own_homes)
        cmd = [sys.executable, *args]
        self.procs[worker_id] = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, env=self.env, preexec_fn=die_with_parent
        )

    async def supervise(self) -> None:
        for wid, gpu in self.specs:
            self.start(wid, gpu)
        while True:
            await anyio.sleep(1)
            for wid, gpu in self.specs:
                rc = self.procs[wid].poll()
                if rc is not None:
                    log.warning("worker_exited", worker=wid, returncode=rc)
                    self.start(wid, gpu)

    def stop(self) -> None:
        stop_all(list(self.procs.values()))


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM to all at once, then wait for each; SIGKILL whatever outlives the timeout."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def _supervise_nats(servers: list[NatsServer]) -> None:
    """Restart an embedded server on its port if it dies; clients reconnect by themselves."""
    while True:
        await anyio.sleep(0.5)
        for server in servers:
            if server.running():
                continue
            log.warning("nats_server_exited", returncode=server.proc.returncode if server.proc else None)
            try:
                await anyio.to_thread.run_sync(server.start, 30.0)
                log.info("nats_server_restarted", url=server.url)
            except NatsServerError as e:
                log.error("nats_server_restart_failed", error=str(e))


def embedded_nats(cfg: config.FleetConfig, home: Path, size: int | None) -> tuple[list[NatsServer], str]:
    """`fleetd up`'s servers and the URL its processes are given: one nats-server, or `size` nodes of
    a cluster (`fleet.cluster`, TLS and routes on) whose URLs are listed together."""
    if size is None:
        server = NatsServer(home / "nats", host=cfg.nats.host, auth=creds.auth_conf(home))
        server.start()
        return [server], server.url
    found = Cluster(home, size)
    found.start()
    return [n.server for n in found.nodes], found.url


async def up_cmd(cfg: config.FleetConfig, args: argparse.Namespace) -> int:
    home = cfg.home_path.resolve()
    console = Console()
    lock = lock_home(home)
    creds.ensure(home)  # first start: a credential per role; later starts keep them
    servers: list[NatsServer] = []
    try:
        servers, url = await anyio.to_thread.run_sync(embedded_nats, cfg, home, args.cluster)
        found = gpus.discover()
        if args.cpu_workers is not None or not found:
            n = args.cpu_workers if args.cpu_workers is not None else 1
            specs: list[tuple[str, str | None]] = [(default_id(None, i), None) for i in range(n)]
            threads = max(1, (os.cpu_count() or 1) // max(n, 1))
        else:
            specs, threads = [(default_id(g), g.uuid) for g in found], None
        workers = WorkerProcs(home, url, specs, threads, cfg.worker, own_homes=args.cluster is not None)
        console.print(f"fleet on {home}: nats {url}, {len(specs)} worker(s), logs in {home / 'logs'}")
        try:
            async with coordinator(cfg, url) as coord, anyio.create_task_group() as tg:
                tg.start_soon(_supervise_nats, servers)
                tg.start_soon(workers.supervise)
                tg.start_soon(_serve_then_cancel, coord, home, url, console, tg)
                if args.demo:
                    tg.start_soon(_demo, url, home, console, args.exit_when_done, tg)
        finally:
            workers.stop()
    finally:
        for server in servers:
            server.stop()
        lock.close()
    return 0


async def _serve_then_cancel(
    coord: Coordinator, home: Path, url: str, console: Console, tg: anyio.abc.TaskGroup
) -> None:
    await _serve(coord, home, url, console)
    tg.cancel_scope.cancel()


async def _demo(
    url: str, home: Path, console: Console, exit_when_done: bool, tg: anyio.abc.TaskGroup
) -> None:
    await anyio.sleep(0.5)  # let the coordinator subscribe
    try:
        await _demo_once(url, home, console)
    except FleetError as e:  # the fleet keeps serving; the user can follow with fleetctl
        console.print(f"[red]following the demo failed: {e}[/]; `fleetctl status` shows it")
    if exit_when_done:
        tg.cancel_scope.cancel()
    else:
        console.print("serving; Ctrl-C to stop")


async def _demo_once(url: str, home: Path, console: Console) -> None:
    client = await FleetClient.connect(url, creds.seed_path(home, "client"), tls.find_ca(home))
    try:
        sub = await client.submit("demo", "smoke")
        console.print(
            f"submitted [bold]{sub['mission_id']}[/] (demo, smoke profile, {len(sub['tasks'])} tasks)"
        )
        st = await render.follow(client, sub["mission_id"], console)
        mission = st["missions"][0]
        if st.get("decisions"):
            console.print(render.decisions_table(mission, st["decisions"]))
        else:
            console.print(f"verdict: [bold]{mission['verdict']}[/]: {mission['reason']}")
    finally:
        await client.close()


def creds_cmd(home: Path, args: argparse.Namespace) -> int:
    """Generate, list, add, rotate or remove credentials; a running embedded nats-server reloads."""
    console = Console()
    if args.action in ("add", "rotate", "remove") and not args.name:
        raise creds.CredsError(f"{args.action} needs a credential name")
    if args.action == "list":
        table = Table(title=f"credentials in {creds.creds_dir(home)}", title_justify="left")
        for col in ("name", "role", "public key", "seed file"):
            table.add_column(col, no_wrap=True)
        for e in creds.load_roster(home).values():
            table.add_row(e.name, e.role, e.public_key, str(creds.seed_path(home, e.name)))
        console.print(table)
        return 0
    if args.action == "ensure":
        creds.ensure(home)
    elif args.action == "add":
        console.print(f"wrote {creds.add(home, args.name, args.role)}")
    elif args.action == "rotate":
        console.print(f"wrote a new seed to {creds.rotate(home, args.name)}; the old one no longer works")
    else:
        creds.remove(home, args.name)
        console.print(f"removed {args.name}")
    if args.action != "ensure":
        stores = [home / "nats", *sorted((home / "cluster").glob("n*"))]  # fleetd up's, alone or a cluster
        pids = [pid for store in stores for pid in reload_servers(store)]
        console.print(
            f"nats-server {', '.join(map(str, pids))} reloaded"
            if pids
            else "no embedded nats-server runs on this home: reload yours (systemctl reload fleetd-nats)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(prog="fleetd", description="the bem-fleet coordinator")
    top.add_argument("--home", help="fleet home (default $FLEET_HOME or ./.fleet)")
    top.add_argument("--config", type=Path, help="fleetd.toml (default <home>/fleetd.toml if present)")
    sub = top.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="nats-server, coordinator and workers on this machine")
    up.add_argument("--home", dest="home_", help=argparse.SUPPRESS)
    up.add_argument("--cpu-workers", type=int, help="CPU workers (default: one per GPU, or 1 without GPUs)")
    up.add_argument(
        "--demo", action="store_true", help="submit the demo mission (smoke profile) and follow it"
    )
    up.add_argument("--exit-when-done", action="store_true", help="stop once the demo mission finished")
    up.add_argument("--web-port", type=int, help="web page port (default 8080)")
    up.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="N nats-server nodes with routes, TLS and separate stores, and a home per worker: two boxes' "
        "fleet on one (docs/operations.md)",
    )
    run = sub.add_parser("run", help="the coordinator alone, for systemd (needs nats.url)")
    run.add_argument("--home", dest="home_", help=argparse.SUPPRESS)
    run.add_argument("--nats", help="NATS URL")
    cr = sub.add_parser("creds", help="the bus credentials: ensure, list, add, rotate, remove")
    cr.add_argument("--home", dest="home_", help=argparse.SUPPRESS)
    cr.add_argument("action", choices=["ensure", "list", "add", "rotate", "remove"])
    cr.add_argument("name", nargs="?", help="the credential (add, rotate, remove)")
    cr.add_argument("--role", choices=creds.ROLES, default="client", help="for add (default client)")
    tl = sub.add_parser("tls", help="the NATS TLS files in <home>/tls: a CA and the servers' certificate")
    tl.add_argument("--home", dest="home_", help=argparse.SUPPRESS)
    tl.add_argument("action", choices=["ensure"])
    tl.add_argument(
        "--name",
        action="append",
        default=[],
        help="a host name or address the certificate is for, besides loopback (repeat for each box)",
    )
    show = sub.add_parser("config", help="print the effective configuration")
    show.add_argument("action", choices=["show"])
    args = top.parse_args(argv)
    home = getattr(args, "home_", None) or args.home
    flags: dict[str, Any] = {"home": home}
    if getattr(args, "nats", None):
        flags["nats__url"] = args.nats
    if getattr(args, "web_port", None) is not None:
        flags["web__port"] = args.web_port
    try:
        cfg = config.load(args.config, **flags)
        if args.command not in ("config", "creds", "tls"):
            guard.configured_token(cfg.web)  # refuse a page beyond loopback without a token, up front
    except config.ConfigError as e:
        print(f"fleetd: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config.show(cfg))
        return 0
    if args.command == "creds":
        try:
            return creds_cmd(cfg.home_path, args)
        except creds.CredsError as e:
            print(f"fleetd creds: {e}", file=sys.stderr)
            return 2
    if args.command == "tls":
        found = tls.ensure(cfg.home_path, tuple(args.name))
        missing = set(args.name) - tls.names(found.cert)
        if missing:
            print(
                f"fleetd tls: {found.cert} exists and does not cover {', '.join(sorted(missing))}; move "
                f"{found.ca.parent} away and run this again with every name",
                file=sys.stderr,
            )
            return 2
        print(f"CA {found.ca} (give it to every client); certificate {found.cert}, key {found.key}")
        return 0
    if args.command == "up":
        logs.configure(path=cfg.home_path / "logs" / "fleetd.log")
    else:
        logs.configure()
    try:
        return anyio.run(up_cmd, cfg, args) if args.command == "up" else anyio.run(run_cmd, cfg)
    except (HomeBusy, NatsServerError, FleetError, config.ConfigError, SchemaMismatch, creds.CredsError) as e:
        print(f"fleetd: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
