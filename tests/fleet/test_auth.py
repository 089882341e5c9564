"""The bus's doors with a real nats-server: nobody in without a credential, each role held to its
subjects, the coordinator told by the server who asked (the audit), and credentials that rotate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import pytest

from fleet import bus, creds
from fleet.client import FleetClient, FleetError
from fleet.natsserver import NatsServer, NatsServerError, find_binary, reload_servers
from schemas import messages as m
from tests.fleet.conftest import REPO, Fleet, call, sql, submit, wait_for

# ---- without a fleet ----------------------------------------------------------------------------


def test_credentials_are_private_and_the_authorization_is_one_nats_server_accepts(tmp_path: Path) -> None:
    roster = creds.ensure(tmp_path)
    assert sorted(e.role for e in roster.values()) == sorted(creds.ROLES)
    assert (creds.creds_dir(tmp_path).stat().st_mode & 0o777) == 0o700
    for name in creds.ROLES:
        path = creds.seed_path(tmp_path, name)
        assert (path.stat().st_mode & 0o777) == 0o600
        assert creds.read_identity(path).public_key in roster  # the roster holds what the seed signs as
    conf = creds.auth_conf(tmp_path).read_text()
    for name in creds.ROLES:  # public keys only, never a seed
        assert creds.seed_path(tmp_path, name).read_text().strip() not in conf
    checked = subprocess.run(
        [str(find_binary()), "-c", str(creds.auth_conf(tmp_path)), "-t"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert creds.ensure(tmp_path) == roster  # a second start keeps them

    loose = creds.seed_path(tmp_path, "client")
    loose.chmod(0o644)
    with pytest.raises(creds.CredsError, match=r"others may read.*chmod 600"):
        creds.read_identity(loose)
    bad = tmp_path / "bad.nk"
    bad.write_text("SUnot-a-seed")
    bad.chmod(0o600)
    with pytest.raises(creds.CredsError, match="not a valid NKEY seed"):
        creds.read_identity(bad)
    with pytest.raises(creds.CredsError, match="credential name"):
        creds.add(tmp_path, "../x", "client")
    with pytest.raises(creds.CredsError, match="role 'admin'"):
        creds.add(tmp_path, "alice", "admin")


def test_nats_beyond_loopback_needs_credentials(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match=r"refusing to bind NATS to 0\.0\.0\.0 without credentials"):
        NatsServer(tmp_path, host="0.0.0.0")

    async def anonymous_remote() -> None:
        await bus.connect("nats://10.1.2.3:4222", "t")

    with pytest.raises(creds.CredsError, match="without a credential"):
        anyio.run(anonymous_remote)


# ---- with a real fleet ---------------------------------------------------------------------------


class Violations:
    """A connection's permission errors, which nats-server reports asynchronously."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def record(self, e: Exception) -> None:
        if "permissions violation" in str(e).lower():
            self.seen.append(str(e))


async def _as(fleet: Fleet, role: str, violations: Violations) -> Any:
    return await bus.connect(
        fleet.url,
        f"test-{role}",
        creds.seed_path(fleet.home, role),
        error_cb=violations.record,
        connect_timeout=3,
    )


async def refusals(nc: Any, attempts: tuple[Callable[[], Awaitable[Any]], ...]) -> list[str]:
    """Try each attempt on `nc`; the names of the errors the refused ones raised. Closes `nc`."""
    refused = []
    for attempt in attempts:
        try:
            await attempt()
        except (nats.errors.Error, TimeoutError) as e:
            refused.append(type(e).__name__)
    await nc.flush()
    await nc.close()
    return refused


def test_each_role_is_held_to_its_subjects(fleet: Fleet) -> None:
    fleet.start_fleetd()

    async def unauthenticated() -> None:
        await nats.connect(fleet.url, max_reconnect_attempts=0, connect_timeout=3, allow_reconnect=False)

    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        anyio.run(unauthenticated)

    # A worker's credential: no control calls, no commands, no stream administration.
    async def as_worker() -> tuple[list[str], list[str]]:
        v = Violations()
        nc = await _as(fleet, "worker", v)
        js = nc.jetstream(timeout=2)
        me = creds.read_identity(creds.seed_path(fleet.home, "worker")).public_key
        req = m.encode(m.SubmitRequest(mission="selftest", profile="quick"))
        attempts = (
            lambda: nc.request(bus.ctl_subject(me, "submit"), req, timeout=2),
            lambda: nc.request(bus.cmd_subject("w0"), b"{}", timeout=2),
            lambda: js.purge_stream(bus.TASKS_STREAM),
            lambda: js.delete_stream(bus.EVENTS_STREAM),
            lambda: js.add_consumer(bus.TASKS_STREAM, bus.worker_consumer("intruder")),
        )
        return await refusals(nc, attempts), v.seen

    refused, seen = anyio.run(as_worker)
    assert len(refused) == 5, refused
    subjects = " ".join(seen)  # nats-py lower-cases the server's message, subjects included
    for subject in ("fleet.ctl.", "fleet.cmd.w0", "$js.api.stream.purge.fleet_tasks"):
        assert subject in subjects, seen
    assert "$js.api.stream.delete.fleet_events" in subjects and ".create.fleet_tasks" in subjects, seen
    assert sql(fleet, "SELECT count(*) AS n FROM missions")[0]["n"] == 0
    streams = call(fleet, "sql", m.SqlRequest(query="SELECT 1 AS one"))  # the fleet still answers
    assert streams["rows"] == [[1]]

    # The worker's FleetClient says why, rather than timing out in silence.
    async def worker_submits() -> None:
        client = await FleetClient.connect(fleet.url, creds.seed_path(fleet.home, "worker"))
        try:
            await client.submit("selftest", "quick")
        finally:
            await client.close()

    with pytest.raises(FleetError, match=r"the bus refused submit.*(?i:permissions violation)"):
        anyio.run(worker_submits)

    # A client's credential: control calls under its own key only, and no task events.
    worker_key = creds.read_identity(creds.seed_path(fleet.home, "worker")).public_key

    async def as_client() -> tuple[list[str], list[str]]:
        v = Violations()
        nc = await _as(fleet, "client", v)
        js = nc.jetstream(timeout=2)
        forged = m.encode(m.Finished(mission_id="m", task_id="m/t", attempt=1, seq=0, worker="w0", ts=0.0))
        attempts = (
            lambda: js.publish("fleet.evt.m.t.finished", forged),
            lambda: js.publish("fleet.task.w0", b"{}"),
            lambda: nc.request(bus.ctl_subject(worker_key, "status"), b"", timeout=2),
        )
        return await refusals(nc, attempts), v.seen

    refused, seen = anyio.run(as_client)
    assert len(refused) == 3, refused
    subjects = " ".join(seen)
    assert "fleet.evt.m.t.finished" in subjects and "fleet.task.w0" in subjects, seen
    assert f"fleet.ctl.{worker_key.lower()}.status" in subjects, seen
    assert sql(fleet, "SELECT count(*) AS n FROM events")[0]["n"] == 0


def test_the_audit_names_who_asked_and_a_rotated_key_stops_working(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_fleetd()
    creds.add(fleet.home, "alice", "client")
    assert reload_servers(fleet.home / "nats-test") == [fleet.server.proc.pid]  # type: ignore[union-attr]

    mission = submit(fleet, "selftest", "quick")  # as the home's client credential; no worker runs it
    alice = creds.seed_path(fleet.home, "alice")

    async def alice_cancels() -> Any:
        client = await FleetClient.connect(fleet.url, alice)
        try:
            return await client.call("cancel", m.IdRequest(id=mission))
        finally:
            await client.close()

    wait_for(lambda: anyio.run(alice_cancels), 20, "alice's credential to be accepted after the reload")
    rows = sql(fleet, f"SELECT action, target, role, credential FROM audit WHERE mission_id = '{mission}'")
    by = {(r["action"], r["role"], r["credential"]) for r in rows}
    assert ("submit", "client", "client") in by and ("cancel", "client", "alice") in by, rows

    fleetctl = [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(fleet.home), "--nats", fleet.url]
    env = {**os.environ, "COLUMNS": "200"}
    shown = subprocess.run(
        [*fleetctl, "status", mission], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "who asked" in shown.stdout and "alice" in shown.stdout and "client:client" in shown.stdout

    # Rotation: the old seed is refused once the server reloads; the new one works.
    old = tmp_path / "old.nk"
    old.write_text(alice.read_text())
    old.chmod(0o600)
    out = subprocess.run(
        [sys.executable, "-m", "fleetd", "--home", str(fleet.home), "creds", "rotate", "alice"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # fleetd creds reloads the servers of <home>/nats; the test's server keeps its store elsewhere.
    reload_servers(fleet.home / "nats-test")
    listed = subprocess.run(
        [sys.executable, "-m", "fleetd", "--home", str(fleet.home), "creds", "list"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert creds.read_identity(alice).public_key in listed.stdout

    def old_refused() -> bool:
        async def go() -> None:
            client = await FleetClient.connect(fleet.url, old)
            await client.close()

        try:
            anyio.run(go)
        except FleetError as e:
            return e.code == "unauthorized"
        return False

    wait_for(old_refused, 20, "the rotated-out seed to be refused")
    assert json.loads(
        subprocess.run(
            [*fleetctl, "--creds", str(alice), "status", mission, "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        ).stdout
    )["missions"][0]["state"] == "cancelled"  # fmt: skip
