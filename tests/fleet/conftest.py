"""Real parts for fleet tests: nats-server processes (random ports, temp stores), fleetd and workers as
subprocesses exactly as systemd would run them, and a control-API client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import pytest

from fleet import creds, tls
from fleet.client import FleetClient
from fleet.cluster import Cluster
from fleet.natsserver import NatsServer
from fleetcli.fleetd import stop_all, worker_args
from schemas import messages as m

REPO = Path(__file__).resolve().parents[2]
FAST = {  # short leases so a lost worker is noticed in seconds, not the production 10 s
    "FLEET_SCHEDULER_LEASE_S": "3",
    "FLEET_SCHEDULER_ASSIGN_GRACE_S": "3",
    "FLEET_SCHEDULER_HEARTBEAT_POLL_S": "0.2",
    "FLEET_WORKER_HEARTBEAT_S": "0.5",
    "FLEET_WEB_PORT": "0",  # a free port: tests run side by side
    # Workers preload nothing: most fleet tests run torch-free selftest kinds, and a torch import per
    # worker costs 3 s of CPU; a task that needs torch imports it itself (test_supervisor checks preload).
    "FLEET_WORKER_PRELOAD": "",
    "FLEET_ARTIFACTS_MAX_BYTES": str(1024**3),  # reserved on disk per server: tests run side by side
}


class Target(Protocol):
    """A running fleet as a test reaches it: its NATS URL, and the home that holds the credentials."""

    url: str
    home: Path


@dataclass
class Found:
    """A fleet that `fleetd up` started: its URL comes from the home's fleetd.json."""

    home: Path
    url: str = ""


def call(fleet: Target, verb: str, request: Any = None, timeout: float = 30, role: str = "client") -> Any:
    async def go() -> Any:
        client = await FleetClient.connect(
            fleet.url, creds.seed_path(fleet.home, role), tls.find_ca(fleet.home)
        )
        try:
            return await client.call(verb, request, timeout=timeout)
        finally:
            await client.close()

    return anyio.run(go)


def submit(fleet: Target, mission: str, profile: str | None = None, **overrides: Any) -> str:
    req = m.SubmitRequest(mission=mission, profile=profile, overrides=overrides)
    return str(call(fleet, "submit", req)["mission_id"])


def status(fleet: Target, mission_id: str | None = None) -> dict[str, Any]:
    return call(fleet, "status", m.IdRequest(id=mission_id))  # type: ignore[no-any-return]


def sql(fleet: Target, query: str) -> list[dict[str, Any]]:
    out = call(fleet, "sql", m.SqlRequest(query=query))
    return [dict(zip(out["columns"], row, strict=True)) for row in out["rows"]]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except Exception:  # the fleet may be restarting: keep asking
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_mission(fleet: Target, mission_id: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        st = status(fleet, mission_id)
        return st if st["missions"][0]["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, f"mission {mission_id} to end")  # type: ignore[no-any-return]


class Fleet:
    """One fleet home with its processes; everything is stopped at teardown."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = {**os.environ, **FAST, **env, "FLEET_HOME": str(home)}
        # As `fleetd up` runs it: a credential per role, and nobody in without one.
        creds.ensure(home)
        self.server = NatsServer(home / "nats-test", auth=creds.auth_conf(home))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.fleetd: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return self.server.url

    def web_token(self) -> str:
        """The page's token: the configured one, else the one fleetd generated into the home."""
        return self.env.get("FLEET_WEB_TOKEN") or (self.home / "web-token").read_text().strip()

    def web_url(self) -> str:
        """The running fleetd's page (a free port; fleetd writes it to fleetd.json once it listens)."""

        def read() -> str | None:
            found = json.loads((self.home / "fleetd.json").read_text())
            return (
                found["web_url"] if found.get("pid") == (self.fleetd.pid if self.fleetd else None) else None
            )

        return wait_for(read, 30, "fleetd's web page")  # type: ignore[no-any-return]

    def spawn(self, *args: str, log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = (self.home / f"{log}.out").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env={**self.env, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def start_fleetd(self) -> None:
        self.fleetd = self.spawn(
            "-m", "fleetd", "--home", str(self.home), "run", "--nats", self.url, log="fleetd"
        )
        wait_for(lambda: call(self, "workers", timeout=1) is not None, 30, "fleetd to answer")

    def start_worker(self, worker_id: str, gpu: str | None = None, env: dict[str, str] | None = None) -> None:
        args = worker_args(worker_id, self.url, self.home, gpu, threads=1)
        self.workers[worker_id] = self.spawn(*args, log=f"worker-{worker_id}", env=env)

    def wait_workers(self, n: int) -> None:
        wait_for(lambda: sum(w["alive"] for w in call(self, "workers", timeout=2)) >= n, 60, f"{n} workers")

    def start_with_workers(self, *workers: str) -> None:
        """fleetd, then the workers, once each is alive."""
        self.start_fleetd()
        for w in workers:
            self.start_worker(w)
        self.wait_workers(len(workers))

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.home.glob("*.out")))

    def start_bus(self) -> None:
        self.server.start()

    def stop(self) -> None:
        stop_all(self.procs)
        self.server.stop()


class ClusterFleet(Fleet):
    """The same fleet on a NATS cluster (`fleet.cluster`: routes, TLS and credentials on), each worker
    with a home of its own, as if on another box: nothing but the bus is shared."""

    def __init__(self, home: Path, size: int = 3) -> None:
        super().__init__(home, {})
        self.cluster = Cluster(home, size)

    @property
    def url(self) -> str:
        return self.cluster.url

    def start_worker(self, worker_id: str, gpu: str | None = None, env: dict[str, str] | None = None) -> None:
        args = worker_args(worker_id, self.url, self.home, gpu, threads=1, own_home=True)
        self.workers[worker_id] = self.spawn(*args, log=f"worker-{worker_id}", env=env)

    def start_bus(self) -> None:
        self.cluster.start()

    def stop(self) -> None:
        stop_all(self.procs)
        self.cluster.stop()


F = TypeVar("F", bound=Fleet)


def _running(f: F, request: pytest.FixtureRequest) -> Iterator[F]:
    """The fleet's bus started; at teardown everything stopped, and its logs printed if the test failed."""
    f.start_bus()
    try:
        yield f
    finally:
        f.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f.logs())


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    yield from _running(Fleet(tmp_path / "home", {}), request)


@pytest.fixture
def cluster_fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterFleet]:
    yield from _running(ClusterFleet(tmp_path / "home"), request)


HEALED: list[str] = []  # the cluster drills' times to heal, printed at the end of the run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if HEALED:
        terminalreporter.section("cluster drills: time to heal")
        for line in HEALED:
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


def mission_dir(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "missions"
    d.mkdir(exist_ok=True)
    (d / f"{name}.toml").write_text(text)
    return d


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
