"""The fleet on a three-node NATS cluster (routes, TLS and credentials on; a home per worker), and the
failure drills of docs/operations.md: a node killed, the coordinator's node killed, a node stopped for
30 s. In each, the mission completes and every result row is stored exactly once. `make test-cluster`
(CI runs it); the run ends with each drill's time to heal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.js.errors import Error as JsError

from fleet import artifacts, bus, creds, tls
from fleet.cluster import Node
from tests.fleet.conftest import (
    HEALED,
    REPO,
    ClusterFleet,
    Found,
    call,
    mission_dir,
    sql,
    submit,
    wait_for,
    wait_mission,
)
from tests.fleet.test_runtime import check_results_once, running_on

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def start(fleet: ClusterFleet, seconds: float = 3.0) -> str:
    """fleetd and workers w0, w1 (separate homes), running a selftest whose tasks outlast a failure."""
    fleet.start_with_workers("w0", "w1")
    mission = submit(fleet, "selftest", "quick", **{"profiles.quick.params": {"seconds": seconds}})
    wait_for(lambda: running_on(fleet, "w0") or running_on(fleet, "w1"), 60, "a running task")
    return mission


def connz(node: Node) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{node.server.monitor_url}/connz", timeout=2) as r:
        return json.loads(r.read())["connections"] or []  # type: ignore[no-any-return]


STREAMS = (bus.TASKS_STREAM, bus.EVENTS_STREAM, "KV_" + bus.WORKERS_BUCKET)


def node_of(fleet: ClusterFleet, client_name: str) -> Node:
    """The node a client (by its connection name) is connected to, from each node's /connz."""
    for node in fleet.cluster.nodes:
        if node.server.running() and any(c.get("name") == client_name for c in connz(node)):
            return node
    raise AssertionError(f"{client_name} is connected to no node")


def leaders(fleet: ClusterFleet, without: Node | None = None) -> dict[str, str | None]:
    """Each fleet stream's leader (a node's name; None while it has none), asked of the live nodes."""

    async def go() -> dict[str, str | None]:
        nc = await bus.connect(
            ",".join(n.url for n in fleet.cluster.nodes if n is not without),
            "test-leaders",
            creds.seed_path(fleet.home, "coordinator"),
            fleet.cluster.files.ca,
            connect_timeout=2,
            max_reconnect_attempts=1,
        )
        found: dict[str, str | None] = {}
        try:
            js = nc.jetstream(timeout=2)
            for stream in STREAMS:
                with contextlib.suppress(JsError, nats.errors.Error, TimeoutError, OSError):
                    info = await js.stream_info(stream)
                    found[stream] = info.cluster.leader if info.cluster else None
            return found
        finally:
            await nc.close()

    return anyio.run(go)


def streams_led(fleet: ClusterFleet, without: Node | None = None) -> bool:
    """Every fleet stream answers with a leader that is not `without` (the failed node)."""
    try:
        found = leaders(fleet, without)
    except (nats.errors.Error, TimeoutError, OSError):
        return False
    return all(found.get(s) not in (None, without.name if without else None) for s in STREAMS)


def heal(fleet: ClusterFleet, what: str, failed: Node, began: float) -> float:
    took = wait_for(
        lambda: streams_led(fleet, without=failed) and time.monotonic(), 60, "the streams' leaders"
    )
    HEALED.append(f"{what}: every stream led again {took - began:.1f} s after the failure")
    return took - began


def rejoin(fleet: ClusterFleet, node: Node, what: str) -> None:
    """Restart the node on its ports and store; healthy means it has caught up (the full /healthz)."""
    began = time.monotonic()
    node.server.start(timeout=60)
    HEALED.append(
        f"{what}: {node.name} rejoined and caught up {time.monotonic() - began:.1f} s after its restart"
    )
    assert streams_led(fleet)


BYTES = 40 * 1024 * 1024  # three object-store parts of fleet.artifacts.PART_BYTES
RELAY = f"""
name = "relay"
description = "the demo's shape: a base stage, then seeds that need its output"
seeds = [1, 2, 3, 4]

[defaults]
timeout_s = 120

[profiles.smoke]
description = "selftest kinds"

[[stages]]
name = "base"
kind = "selftest.make"
params = {{ seed = 7, bytes = {BYTES} }}

[[stages]]
name = "use"
kind = "selftest.use"
foreach = ["seed"]
after = ["base"]
params = {{ made_seed = 7, bytes = {BYTES}, seconds = 1.0 }}
"""


def test_a_later_task_fetches_an_earlier_tasks_output_on_another_host(
    cluster_fleet: ClusterFleet, tmp_path: Path
) -> None:
    cluster_fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "relay", RELAY))
    cluster_fleet.start_with_workers("w0", "w1")
    mission = submit(cluster_fleet, "relay")
    st = wait_mission(cluster_fleet, mission, timeout=180)
    assert st["missions"][0]["state"] == "succeeded", st
    rows = sql(
        cluster_fleet,
        f"SELECT name, worker, result FROM tasks WHERE mission_id = '{mission}' ORDER BY name",
    )
    results = {
        r["name"]: (r["worker"], json.loads(r["result"]) if isinstance(r["result"], str) else r["result"])
        for r in rows
    }
    ref = results["base"][1]["outputs"]["base"]
    assert len(ref["sha256"]) == 64 and ref["bytes"] > BYTES  # the folder's tar, by its hash
    used = {name: worker for name, (worker, _) in results.items() if name != "base"}
    assert set(used.values()) == {"w0", "w1"}, used  # both hosts ran a seed: one of them is not base's
    for name, (worker, result) in results.items():
        if name == "base":
            continue
        home = cluster_fleet.home / "hosts" / worker
        # Each host's own copy, fetched once into its cache, whatever number of its tasks used it.
        assert Path(result["input"]) == home / "cache" / "artifacts" / ref["sha256"] / "content"
    for worker in ("w0", "w1"):
        cache = cluster_fleet.home / "hosts" / worker / "cache" / "artifacts"
        assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [ref["sha256"]]


def test_streams_and_the_bucket_have_three_replicas(cluster_fleet: ClusterFleet) -> None:
    async def as_one_node() -> None:  # what a fleet that ran on one node left in the store
        seed = creds.seed_path(cluster_fleet.home, "coordinator")
        nc = await bus.connect(cluster_fleet.url, "test", seed, cluster_fleet.cluster.files.ca)
        try:
            js = nc.jetstream()
            await bus.ensure_streams(js, replicas=1)
            await bus.workers_kv(js, replicas=1)
            await artifacts.ensure_bucket(js, replicas=1, max_bytes=1024**2)
        finally:
            await nc.close()

    anyio.run(as_one_node)
    cluster_fleet.start_fleetd()
    wait_for(lambda: streams_led(cluster_fleet), 60, "the streams")
    rows = sql(cluster_fleet, "SELECT 1 AS one")  # fleetctl's path: TLS, the client credential, any node
    assert rows == [{"one": 1}]

    async def configs() -> dict[str, Any]:
        seed = creds.seed_path(cluster_fleet.home, "coordinator")
        nc = await bus.connect(cluster_fleet.url, "test", seed, cluster_fleet.cluster.files.ca)
        try:
            js = nc.jetstream()
            names = (
                bus.TASKS_STREAM,
                bus.EVENTS_STREAM,
                bus.DLQ_STREAM,
                "KV_" + bus.WORKERS_BUCKET,
                "OBJ_" + artifacts.BUCKET,
            )
            return {s: (await js.stream_info(s)).config for s in names}
        finally:
            await nc.close()

    found = anyio.run(configs)
    assert {s: c.num_replicas for s, c in found.items()} == dict.fromkeys(found, 3)
    # The artifact bucket's limit follows the configuration too (the tests' FLEET_ARTIFACTS_MAX_BYTES).
    assert found["OBJ_" + artifacts.BUCKET].max_bytes == int(cluster_fleet.env["FLEET_ARTIFACTS_MAX_BYTES"])


def test_without_tls_or_without_a_credential_every_node_refuses(
    cluster_fleet: ClusterFleet, tmp_path: Path
) -> None:
    """The doors of docs/security.md hold on each node: plain TCP is refused, and so is TLS alone."""

    async def connects(url: str, **options: Any) -> bool:
        try:
            nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, **options)
        except Exception:  # refused, whichever way the client reports it
            return False
        await nc.close()
        return True

    ca = tls.client_context(cluster_fleet.cluster.files.ca)
    for node in cluster_fleet.cluster.nodes:
        assert not anyio.run(lambda: connects(node.url.replace("tls://", "nats://")))  # noqa: B023
        assert not anyio.run(lambda: connects(node.url, tls=ca))  # noqa: B023
    me = creds.read_identity(creds.seed_path(cluster_fleet.home, "client"))
    first = cluster_fleet.cluster.nodes[0].url
    assert anyio.run(lambda: connects(first, tls=ca, nkeys_seed_str=me.seed))
    # A server whose certificate another CA signed is not ours: the client refuses it.
    stranger = tls.client_context(tls.ensure(tmp_path / "elsewhere").ca)
    assert not anyio.run(lambda: connects(first, tls=stranger, nkeys_seed_str=me.seed))


def test_kill9_of_a_node_mid_mission(cluster_fleet: ClusterFleet) -> None:
    mission = start(cluster_fleet)
    fleetd_node = node_of(cluster_fleet, "fleetd")
    # Of the other two nodes, the one leading more fleet streams: its loss forces elections.
    led = list(leaders(cluster_fleet).values())
    others = [n for n in cluster_fleet.cluster.nodes if n is not fleetd_node]
    victim = max(others, key=lambda n: led.count(n.name))
    began = time.monotonic()
    victim.server.kill()
    heal(cluster_fleet, "kill -9 of a node", victim, began)
    st = wait_mission(cluster_fleet, mission, timeout=180)
    assert st["missions"][0]["state"] == "succeeded", st
    check_results_once(cluster_fleet, mission)
    rejoin(cluster_fleet, victim, "kill -9 of a node")


def test_kill9_of_the_coordinators_node_mid_mission(cluster_fleet: ClusterFleet) -> None:
    mission = start(cluster_fleet)
    victim = node_of(cluster_fleet, "fleetd")
    began = time.monotonic()
    victim.server.kill()
    heal(cluster_fleet, "kill -9 of fleetd's node", victim, began)
    moved = wait_for(lambda: node_of(cluster_fleet, "fleetd"), 60, "fleetd to reconnect to another node")
    HEALED.append(
        f"kill -9 of fleetd's node: fleetd on {moved.name} {time.monotonic() - began:.1f} s after the kill"
    )
    assert moved is not victim
    st = wait_mission(cluster_fleet, mission, timeout=180)
    assert st["missions"][0]["state"] == "succeeded", st
    check_results_once(cluster_fleet, mission)
    rejoin(cluster_fleet, victim, "kill -9 of fleetd's node")


def test_a_node_stopped_for_30_s_then_resumed(cluster_fleet: ClusterFleet) -> None:
    mission = start(cluster_fleet, seconds=8.0)
    victim = node_of(cluster_fleet, "fleetd")  # the hardest case: the coordinator's own node hangs
    began = time.monotonic()
    victim.server.pause()
    try:
        heal(cluster_fleet, "SIGSTOP of fleetd's node", victim, began)
        time.sleep(max(0.0, 30 - (time.monotonic() - began)))
    finally:
        victim.server.resume()
    resumed = time.monotonic()
    wait_for(lambda: victim.server.healthy(), 60, "the resumed node to catch up")
    HEALED.append(f"SIGSTOP of fleetd's node: healthy {time.monotonic() - resumed:.1f} s after SIGCONT")
    st = wait_mission(cluster_fleet, mission, timeout=180)
    assert st["missions"][0]["state"] == "succeeded", st
    check_results_once(cluster_fleet, mission)


def test_fleetd_up_cluster_runs_a_mission_and_restarts_a_killed_node(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = subprocess.Popen(
        [sys.executable, "-m", "fleetd", "--home", str(home), "up", "--cluster", "3", "--cpu-workers", "2",
         "--web-port", "0"],
        cwd=REPO, stdout=(tmp_path / "up.out").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: (home / "fleetd.json").exists(), 60, "fleetd up to write fleetd.json")
        fleet = Found(home, json.loads((home / "fleetd.json").read_text())["nats_url"])
        assert fleet.url.count("tls://") == 3, fleet.url
        wait_for(lambda: sum(w["alive"] for w in call(fleet, "workers", timeout=2)) == 2, 90, "2 workers")
        mission = submit(fleet, "selftest", "quick", **{"profiles.quick.params": {"seconds": 2.0}})
        ports = next((home / "cluster" / "n2" / "ports").glob("*.ports"))
        killed = int(ports.stem.rsplit("_", 1)[1])
        os.kill(killed, signal.SIGKILL)
        st = wait_mission(fleet, mission, timeout=180)
        assert st["missions"][0]["state"] == "succeeded", st
        check_results_once(fleet, mission)
        ran = {r["worker"] for r in sql(fleet, "SELECT DISTINCT worker FROM task_attempts")}
        assert {d.name for d in (home / "hosts").iterdir()} == ran and len(ran) == 2  # a home each

        def restarted() -> bool:
            found = list((home / "cluster" / "n2" / "ports").glob("*.ports"))
            return len(found) == 1 and int(found[0].stem.rsplit("_", 1)[1]) != killed

        wait_for(restarted, 60, "fleetd up to restart the killed node")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, (tmp_path / "up.out").read_text()[-3000:]
