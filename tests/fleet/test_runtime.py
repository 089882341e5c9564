"""The fleet end to end on real parts: nats-server, fleetd and workers as processes, a DuckDB file.

The outage tests kill -9 one process in the middle of a mission and hold the fleet to its contract
(DESIGN.md section 8): the mission completes and every result row is present exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nats
import pyarrow.parquet as pq
import pytest

from fleet import bus, creds
from schemas.messages import IdRequest
from tests.fleet.conftest import (
    REPO,
    Fleet,
    Found,
    Target,
    call,
    mission_dir,
    sql,
    status,
    submit,
    wait_for,
    wait_mission,
)

pytestmark = pytest.mark.slow
N_EXAMPLES = 200
SCORE_TASKS = 4  # arms a, b x seeds 1, 2 in selftest.toml


def check_results_once(fleet: Target, mission_id: str) -> None:
    """Every task succeeded once, every score row exists once, one decision per gate plus the verdict."""
    tasks = sql(fleet, f"SELECT name, state FROM tasks WHERE mission_id = '{mission_id}'")
    assert tasks and all(t["state"] == "succeeded" for t in tasks), tasks
    rows = sql(
        fleet,
        "SELECT count(*) AS n, count(DISTINCT (task_id, example_id, metric)) AS distinct_n "
        "FROM example_scores "
        f"WHERE mission_id = '{mission_id}'",
    )[0]
    assert rows["n"] == rows["distinct_n"] == SCORE_TASKS * N_EXAMPLES, rows
    finished = sql(
        fleet,
        "SELECT t.name, count(*) AS n FROM events e JOIN tasks t USING (task_id) "
        f"WHERE t.mission_id = '{mission_id}' AND e.kind = 'finished' AND e.attempt = t.attempt GROUP BY ALL",
    )
    assert len(finished) == len(tasks) and all(r["n"] == 1 for r in finished), finished
    gates = sql(fleet, f"SELECT gate, kind FROM decisions WHERE mission_id = '{mission_id}'")
    assert sorted(g["gate"] for g in gates) == ["b_beats_a", "b_level_sane", "verdict"], gates


def running_on(fleet: Target, worker: str) -> bool:
    return any(t["state"] == "running" and t["worker"] == worker for t in status(fleet)["tasks"])


def test_selftest_completes_on_two_cpu_workers_with_fleetd_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = subprocess.Popen(
        [sys.executable, "-m", "fleetd", "--home", str(home), "up", "--cpu-workers", "2", "--web-port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: (home / "fleetd.json").exists(), 30, "fleetd up to write fleetd.json")
        url = Found(home, json.loads((home / "fleetd.json").read_text())["nats_url"])
        wait_for(lambda: sum(w["alive"] for w in call(url, "workers", timeout=2)) == 2, 60, "2 workers")
        again = subprocess.run(
            [sys.executable, "-m", "fleetd", "--home", str(home), "up"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 2 and "another fleet is running" in again.stderr, again.stderr

        mission = submit(url, "selftest", "quick")  # the smoke profile's shape, in seconds
        st = wait_mission(url, mission, timeout=150)
        assert st["missions"][0]["state"] == "succeeded", st
        assert st["missions"][0]["verdict"] == "promote"  # b = a + 0.1 by construction
        used = {
            r["worker"]
            for r in sql(url, f"SELECT DISTINCT worker FROM task_attempts WHERE task_id LIKE '{mission}%'")
        }
        assert len(used) == 2, used
        retried = {
            r["name"]: r["attempt"] for r in sql(url, "SELECT name, attempt FROM tasks WHERE attempt > 1")
        }
        assert retried == {"flaky-s1": 2, "flaky-s2": 2, "crash": 2}
        crash = sql(
            url, "SELECT reason, error FROM task_attempts WHERE task_id LIKE '%/crash' AND attempt = 1"
        )[0]
        assert crash["reason"] == "crash" and "SIGKILL" in crash["error"]
        check_results_once(url, mission)

        refused = subprocess.run(
            [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(home), "sql", "DELETE FROM tasks"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2 and "read-only" in refused.stderr and "DELETE" in refused.stderr
        assert sql(url, "SELECT count(*) AS n FROM tasks")[0]["n"] == 9
        # Files stay out of reach of the SQL door: table functions that read files are refused.
        fleetctl = [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(home)]
        for query in (
            "SELECT * FROM read_text('/etc/passwd')",
            "SELECT * FROM read_blob('/proc/self/environ')",
        ):
            out = subprocess.run(
                [*fleetctl, "sql", query], cwd=REPO, capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 2 and "tables only" in out.stderr and "root:" not in out.stdout, out

        # Export travels over the bus and is written by the client: every table, row for row.
        out = subprocess.run(
            [*fleetctl, "export", str(tmp_path / "export"), "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        written = json.loads(out.stdout)
        for table in ("tasks", "events", "metrics", "example_scores", "decisions"):
            want = sql(url, f"SELECT count(*) AS n FROM {table}")[0]["n"]
            got = pq.read_table(written[table]["file"])
            assert got.num_rows == written[table]["rows"] == want > 0, table
        assert set(pq.read_table(written["tasks"]["file"]).column_names) >= {"task_id", "state", "params"}
    finally:
        up.terminate()
        out = up.communicate(timeout=30)[0].decode()
        assert up.returncode == 0, out


def test_malformed_messages_are_dead_lettered_without_a_crash(fleet: Fleet) -> None:
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)

    async def poison() -> list[str]:
        nc = await bus.connect(fleet.url, "poison", creds.seed_path(fleet.home, "coordinator"))
        js = nc.jetstream()
        await js.publish("fleet.evt.m.t.metrics", b"{not json", timeout=5)
        await js.publish("fleet.evt.m.t.finished", b'{"kind": "finished", "task_id": 3}', timeout=5)
        await js.publish("fleet.task.w0", b'{"task_id": "x"}', timeout=5)  # an assignment missing fields
        # Well-formed JSON that would break the store: a series with more steps than values.
        bad_series = (
            b'{"kind": "metrics", "mission_id": "m", "task_id": "m/t", "attempt": 1, "seq": 0, '
            b'"worker": "w0", "ts": 0.0, "series": {"loss": [[1, 2], [0.5], [0.0, 0.0]]}}'
        )
        await js.publish("fleet.evt.m.t-2.metrics", bad_series, timeout=5)
        # A forged id that would be a path outside the fleet home.
        forged = b'{"task_id": "m/../../../tmp/x", "mission_id": "m", "kind": "noop", "params": {}, '
        forged += b'"attempt": 1, "timeout_s": 5}'
        await js.publish("fleet.task.w0", forged, timeout=5)
        await nc.flush()
        sub = await js.subscribe("fleet.dlq.>", ordered_consumer=True)
        reasons = []
        deadline = time.monotonic() + 20
        while len(reasons) < 5 and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                continue
            reasons.append(msg.headers["Fleet-Reason"])
        await nc.close()
        return reasons

    import anyio

    reasons = anyio.run(poison)
    assert len(reasons) == 5, reasons
    assert sum("malformed event" in r for r in reasons) == 3
    assert sum("malformed assignment" in r for r in reasons) == 2
    assert any("one entry per point" in r for r in reasons) and any("task_id" in r for r in reasons)
    rows = sql(fleet, "SELECT subject, reason FROM dead_letters ORDER BY subject")
    assert [r["subject"] for r in rows] == [
        "fleet.evt.m.t-2.metrics",
        "fleet.evt.m.t.finished",
        "fleet.evt.m.t.metrics",
    ]
    # Both processes live on and work.
    mission = submit(fleet, "selftest", "quick")
    assert wait_mission(fleet, mission)["missions"][0]["state"] == "succeeded"
    assert fleet.fleetd is not None and fleet.fleetd.poll() is None and fleet.workers["w0"].poll() is None
    log = (fleet.home / "fleetd.out").read_text()
    assert '"event": "dead_letter"' in log and "fleet.evt.m.t.metrics" in log


def test_bad_spec_is_refused_and_creates_nothing(fleet: Fleet, tmp_path: Path) -> None:
    from fleet.client import FleetError

    bad = mission_dir(
        tmp_path,
        "broken",
        'name = "broken"\n[[stages]]\nname = "a"\nkind = "selftest.sleep"\nafter = ["nope"]\n',
    )
    (bad / "typo.toml").write_text(
        'name = "typo"\n[[stages]]\nname = "a"\nkind = "selftest.sleep"\ntimeout_s = "soon"\n'
    )
    (bad / "selftest.toml").write_text((REPO / "schemas/missions/selftest.toml").read_text())
    fleet.env["FLEET_MISSIONS_DIR"] = str(bad)
    fleet.start_fleetd()
    cases = [
        (lambda: submit(fleet, "broken"), "broken.toml: stages[0].after: 'nope' is not an earlier stage"),
        (
            lambda: submit(fleet, "typo"),
            "typo.toml: stages[0].timeout_s: Expected `float | null`, got `str`",
        ),
        (lambda: submit(fleet, "nosuch"), "unknown mission 'nosuch'"),
        (lambda: submit(fleet, "selftest", "huge"), "unknown profile 'huge'"),
        (
            lambda: submit(fleet, "selftest", **{"gates.q": 2.0}),
            "selftest.toml: gates.q: must be in (0, 1)",
        ),
        (
            lambda: submit(fleet, "selftest", **{"stages.sleep.kind": "no.such"}),
            "unknown task kind 'no.such'",
        ),
    ]
    for attempt, message in cases:
        with pytest.raises(FleetError) as err:
            attempt()
        assert err.value.code == "invalid_spec" and message in str(err.value), str(err.value)
    assert sql(fleet, "SELECT count(*) AS n FROM missions")[0]["n"] == 0
    assert sql(fleet, "SELECT count(*) AS n FROM tasks")[0]["n"] == 0


PLACEMENT = """
name = "placement"
seeds = [1, 2]
[defaults]
timeout_s = 60
[[stages]]
name = "big"
kind = "selftest.sleep"
foreach = ["seed"]
vram_gb = 40
params = { seconds = 0.5 }
[[stages]]
name = "huge"
kind = "selftest.sleep"
vram_gb = 100
"""


def test_placement_honours_memory_and_shows_pending_reasons(fleet: Fleet, tmp_path: Path) -> None:
    gb = 1024**3
    inventory = [
        {
            "uuid": "GPU-4090-aaaa",
            "name": "NVIDIA GeForce RTX 4090",
            "total_bytes": 24 * gb,
            "free_bytes": 23 * gb,
        },
        {
            "uuid": "GPU-h100-bbbb",
            "name": "NVIDIA H100 80GB HBM3",
            "total_bytes": 80 * gb,
            "free_bytes": 79 * gb,
        },
    ]
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "placement", PLACEMENT))
    fleet.env["FLEET_FAKE_GPUS"] = json.dumps(inventory)
    fleet.start_fleetd()
    fleet.start_worker("w4090", gpu="GPU-4090-aaaa")
    fleet.start_worker("wh100", gpu="GPU-h100-bbbb")
    fleet.wait_workers(2)
    mission = submit(fleet, "placement")

    def big_done() -> bool:
        tasks = status(fleet, mission)["tasks"]
        return all(t["state"] == "succeeded" for t in tasks if t["stage"] == "big")

    wait_for(big_done, 60, "the 40G tasks")
    st = status(fleet, mission)
    workers = {
        r["worker"] for r in sql(fleet, "SELECT worker FROM task_attempts WHERE task_id LIKE '%/big-%'")
    }
    assert workers == {"wh100"}  # the 4090's 23G free cannot hold 40G
    huge = next(t for t in st["tasks"] if t["stage"] == "huge")
    assert huge["state"] == "pending"
    assert huge["pending_reason"] == "waiting_for_gpu_memory need=100G best_free=79G"
    assert sql(fleet, "SELECT pending_reason FROM tasks WHERE name = 'huge'")[0]["pending_reason"].startswith(
        "waiting_for_gpu_memory"
    )
    call(fleet, "cancel", IdRequest(id=mission))
    assert wait_mission(fleet, mission)["missions"][0]["state"] == "cancelled"


def _slow_selftest_on_two_workers(fleet: Fleet) -> str:
    """fleetd and workers w0, w1 running a selftest with tasks long enough for a kill to land mid-task."""
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    return submit(fleet, "selftest", "quick", **{"profiles.quick.params": {"seconds": 1.5}})


def test_kill9_worker_mid_task(fleet: Fleet) -> None:
    mission = _slow_selftest_on_two_workers(fleet)
    wait_for(lambda: running_on(fleet, "w0"), 30, "a task running on w0")
    fleet.kill9(fleet.workers["w0"])
    st = wait_mission(fleet, mission, timeout=120)
    assert st["missions"][0]["state"] == "succeeded", st
    lost = sql(fleet, "SELECT reason, error FROM task_attempts WHERE worker = 'w0' AND reason = 'infra'")
    assert lost and "lease lapsed" in lost[0]["error"]
    check_results_once(fleet, mission)


def test_kill9_fleetd_mid_mission_then_restart(fleet: Fleet) -> None:
    mission = _slow_selftest_on_two_workers(fleet)
    wait_for(lambda: running_on(fleet, "w0") or running_on(fleet, "w1"), 30, "a running task")
    time.sleep(1.0)
    assert fleet.fleetd is not None
    fleet.kill9(fleet.fleetd)
    time.sleep(2.0)  # tasks finish and publish while nobody records
    fleet.start_fleetd()
    st = wait_mission(fleet, mission, timeout=120)
    assert st["missions"][0]["state"] == "succeeded", st
    check_results_once(fleet, mission)


def test_kill9_nats_server_mid_mission_then_restart(fleet: Fleet) -> None:
    mission = _slow_selftest_on_two_workers(fleet)
    wait_for(lambda: running_on(fleet, "w0") or running_on(fleet, "w1"), 30, "a running task")
    fleet.server.kill()
    time.sleep(2.0)
    fleet.server.start()  # same port and store: clients reconnect
    st = wait_mission(fleet, mission, timeout=120)
    assert st["missions"][0]["state"] == "succeeded", st
    check_results_once(fleet, mission)
    assert fleet.fleetd is not None and fleet.fleetd.poll() is None
