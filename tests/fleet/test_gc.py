"""`fleetctl gc`: the policy picks ended runs only, a home's folders are measured and removed (read-only
copies too), and on a real fleet with a mission still running, gc removes the ended mission's run
folders and the artifact only it had, while the artifact a pending task needs, the running mission's
folders and every stored row survive, and the running mission then succeeds."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from fleet import artifacts, bus, creds, retention, tls
from fleetd.gc import choose, parse_duration
from schemas import messages as m
from tests.fleet.conftest import REPO, Fleet, call, mission_dir, sql, status, wait_for, wait_mission

DAY = 86400.0


def _row(mid: str, name: str, state: str, ended: float | None, collected: float | None = None) -> Any:
    return {"mission_id": mid, "name": name, "state": state, "submitted_at": (ended or 0) - 10,
            "finished_at": ended, "collected_at": collected}  # fmt: skip


def test_the_policy_keeps_the_newest_runs_of_each_name_and_never_a_running_one() -> None:
    now = 100 * DAY
    rows = [
        _row("a1", "a", "succeeded", now - 9 * DAY),
        _row("a2", "a", "failed", now - 5 * DAY),
        _row("a3", "a", "succeeded", now - 1 * DAY),
        _row("a4", "a", "running", None),
        _row("b1", "b", "cancelled", now - 8 * DAY),
        _row("b0", "b", "succeeded", now - 20 * DAY, collected=now - 19 * DAY),
    ]

    def ids(keep_last: int | None, older_than: float | None) -> list[str]:
        return [r["mission_id"] for r in choose(rows, keep_last, older_than, now)]

    assert ids(1, None) == ["a1", "a2"]  # b1 is b's newest; b0 was collected already; a4 runs
    assert ids(0, None) == ["a1", "b1", "a2", "a3"]  # oldest first
    assert ids(None, 6 * DAY) == ["a1", "b1"]
    assert ids(1, 6 * DAY) == ["a1"]  # both conditions
    assert parse_duration("7d") == 7 * DAY and parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="'7 days'"):
        parse_duration("7 days")
    with pytest.raises(ValueError, match="policy"):
        m.GcRequest()  # nothing to keep said: refused, not "remove everything"


def _files(path: Path) -> int:
    """`du -sb`: coreutils' apparent size, the measure gc reports."""
    return int(
        subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    )


def test_a_home_s_share_is_measured_then_removed_read_only_copies_too(tmp_path: Path) -> None:
    home, cache = tmp_path / "home", tmp_path / "home" / "cache" / "artifacts"
    (home / "runs" / "m1" / "t" / "attempt-1").mkdir(parents=True)
    (home / "runs" / "m1" / "t" / "attempt-1" / "ckpt.bin").write_bytes(b"x" * 5000)
    (home / "runs" / "m2" / "t").mkdir(parents=True)
    (home / "runs" / "m2" / "t" / "keep.bin").write_bytes(b"y" * 300)
    sha = "ab" * 32
    content = cache / sha / "content"
    content.mkdir(parents=True)
    (content / "w.bin").write_bytes(b"z" * 700)
    (content / "w.bin").chmod(0o444)
    content.chmod(0o555)  # a read-only folder inside a fetched copy
    before, copy = _files(home / "runs" / "m1"), _files(cache / sha)
    assert before > 5000 and copy > 700  # the files and their folders' entries
    dry = retention.collect_home(home, cache, ["m1", "gone"], [sha], dry_run=True)
    assert dry.runs == {"m1": before} and dry.cache == copy and (home / "runs" / "m1").exists()
    done = retention.collect_home(home, cache, ["m1", "gone"], [sha], dry_run=False)
    assert done == dry
    assert not (home / "runs" / "m1").exists() and not (cache / sha).exists()
    assert (home / "runs" / "m2" / "t" / "keep.bin").exists()
    # A link inside a read-only folder: the link goes, its target outside the home keeps its mode.
    outside = tmp_path / "outside.txt"
    outside.write_text("not the fleet's")
    outside.chmod(0o600)
    linked = home / "runs" / "m3" / "t"
    linked.mkdir(parents=True)
    (linked / "link").symlink_to(outside)
    linked.chmod(0o555)
    (home / "runs" / "m4").symlink_to(tmp_path)  # a run folder that leads out of the home
    bad = retention.collect_home(home, cache, ["..", "m4", "m3"], ["../x"], dry_run=False)
    assert not (home / "runs" / "m3").exists() and outside.read_text() == "not the fleet's"
    assert outside.stat().st_mode & 0o777 == 0o600 and (home / "runs" / "m4").is_symlink()
    assert "'..' is not a mission id" in bad.error and "runs/m4" in bad.error and "SHA-256" in bad.error


MAKE = """
[[stages]]
name = "make"
kind = "selftest.make"
params = { seed = 3, bytes = 40000, seconds = 0.1 }
"""
USE = """
[[stages]]
name = "use"
kind = "selftest.use"
after = ["make"]
params = { made_seed = 3, bytes = 40000, seconds = 0.1 }
"""
EXTRA_AND_HOLD = """
[[stages]]
name = "extra"
kind = "selftest.make"
params = { seed = 9, bytes = 80000, seconds = 0.1 }
[[stages]]
name = "hold"
kind = "selftest.sleep"
params = { seconds = 0.1 }
"""
SCORED = """
[[stages]]
name = "score"
kind = "selftest.score"
foreach = ["arm", "seed"]
params = { seconds = 0.1, n_examples = 50, effect = 0.2 }
[gates]
q = 0.05
n_resamples = 2000
[[gates.claims]]
name = "b_beats_a"
metric = "score"
variant = "b"
baseline = "a"
"""
HEADER = """
seeds = [1]
[defaults]
timeout_s = 60
"""
# `use` is after `hold` in submission order: on one worker it waits behind it.
KEEP = 'name = "keep"\narms = ["a", "b"]' + HEADER + MAKE + EXTRA_AND_HOLD + USE + SCORED


def _with_store(fleet: Fleet, fn: Any) -> Any:
    """`fn(object_store)` on the artifacts' bucket, with the coordinator's credential."""

    async def go() -> Any:
        seed = creds.seed_path(fleet.home, "coordinator")
        nc = await bus.connect(fleet.url, "test", seed, tls.find_ca(fleet.home))
        try:
            return await fn(await nc.jetstream().object_store(artifacts.BUCKET))
        finally:
            await nc.close()

    return anyio.run(go)


def _objects(fleet: Fleet, shas: list[str]) -> dict[str, bool]:
    """Which of these artifacts the object store holds."""

    async def held(obs: Any) -> dict[str, bool]:
        found = {}
        for sha in shas:
            try:
                await obs.get_info(sha)
                found[sha] = True
            except Exception:
                found[sha] = False
        return found

    return _with_store(fleet, held)


def _gc(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(fleet.home), "--nats", fleet.url,
         "gc", *args],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def _outputs(fleet: Fleet, mission_id: str) -> dict[str, dict[str, Any]]:
    query = f"SELECT name, result FROM tasks WHERE mission_id = '{mission_id}' AND stage IN ('make', 'extra')"
    rows = sql(fleet, query)
    return {r["name"]: json.loads(r["result"])["outputs"]["base"] for r in rows}


@pytest.mark.slow
def test_gc_beside_a_running_mission_keeps_what_it_needs(fleet: Fleet, tmp_path: Path) -> None:
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "keep", KEEP))
    fleet.start_with_workers("w0")  # one worker: the running mission's `use` waits behind `hold`
    old = str(call(fleet, "submit", m.SubmitRequest(mission="keep"))["mission_id"])
    assert wait_mission(fleet, old, timeout=120)["missions"][0]["verdict"] == "promote"
    changed = {"stages.extra.params.seed": 10, "stages.hold.params.seconds": 15.0}
    running = str(call(fleet, "submit", m.SubmitRequest(mission="keep", overrides=changed))["mission_id"])

    def held() -> bool:
        tasks = {t["name"]: t["state"] for t in status(fleet, running)["tasks"]}
        return tasks["hold"] == "running" and tasks["use"] == "pending"

    wait_for(held, 60, "the running mission's use task pending behind hold")
    made, extra = _outputs(fleet, old)["make"], _outputs(fleet, old)["extra"]
    assert _outputs(fleet, running)["make"]["sha256"] == made["sha256"]  # the same bytes: one artifact
    assert _outputs(fleet, running)["extra"]["sha256"] != extra["sha256"]
    rows_before = {t: sql(fleet, f"SELECT count(*) AS n FROM {t} WHERE mission_id = '{old}'")[0]["n"]
                   for t in ("example_scores", "decisions", "tasks", "events")}  # fmt: skip
    old_runs, new_runs = fleet.home / "runs" / old, fleet.home / "runs" / running
    size = _files(old_runs)
    assert size > 0 and new_runs.exists()

    dry = _gc(fleet, "--keep-last", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    would = json.loads(dry.stdout)
    assert [r["mission_id"] for r in would["missions"]] == [old]
    assert would["missions"][0]["runs_bytes"] == size
    assert would["artifacts"]["removed"] == 1 and would["artifacts"]["bytes"] == extra["bytes"]
    assert would["artifacts"]["kept_needed"] == [made["sha256"]]
    assert old_runs.exists() and _objects(fleet, [extra["sha256"]]) == {extra["sha256"]: True}

    done = _gc(fleet, "--keep-last", "0", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["freed_bytes"] == would["freed_bytes"] == size + extra["bytes"], out
    assert not old_runs.exists() and new_runs.exists()
    kept = _objects(fleet, [made["sha256"], extra["sha256"]])
    assert kept == {made["sha256"]: True, extra["sha256"]: False}
    cached = artifacts.cache_dir(fleet.home) / made["sha256"]
    assert cached.exists()  # the old mission's use fetched it; the pending use may read this copy
    for table, n in rows_before.items():  # gc removes files, never rows
        assert sql(fleet, f"SELECT count(*) AS n FROM {table} WHERE mission_id = '{old}'")[0]["n"] == n

    # The running mission's pending task gets what it needs and the mission ends well.
    assert wait_mission(fleet, running, timeout=120)["missions"][0]["verdict"] == "promote"
    # A worker away at that gc left the old run's folder and a copy of its dropped artifact: the next
    # gc, which collects nothing new (the new run is its name's newest), frees them.
    left = fleet.home / "runs" / old / "extra" / "attempt-1"
    left.mkdir(parents=True)
    (left / "ckpt.bin").write_bytes(b"c" * 3000)
    stale = artifacts.cache_dir(fleet.home) / extra["sha256"] / "content"
    stale.mkdir(parents=True)
    (stale / "weights.bin").write_bytes(b"w" * 2000)
    runs_left, copy_left = _files(old_runs), _files(stale.parent)
    again = _gc(fleet, "--keep-last", "1", "--json")
    assert again.returncode == 0, again.stderr
    later = json.loads(again.stdout)
    assert later["missions"] == [] and later["earlier_runs_bytes"] == runs_left
    assert later["freed_bytes"] == runs_left + copy_left
    assert not old_runs.exists() and not stale.parent.exists()
    assert cached.exists()  # still referenced by the kept run
    web, token = fleet.web_url(), {"Authorization": f"Bearer {fleet.web_token()}"}
    disks = {}
    for mid in (old, running):
        with urllib.request.urlopen(urllib.request.Request(f"{web}/api/missions/{mid}", headers=token)) as r:
            disks[mid] = json.loads(r.read())["disk"]
    assert disks[old]["runs_bytes"] == 0 and disks[old]["collected_at"] is not None
    assert disks[running]["runs_bytes"] == _files(new_runs) > 0 and disks[running]["collected_at"] is None
    assert disks[running]["artifacts"] == 2
    table = _gc(fleet, "--keep-last", "1", "--dry-run")
    assert table.returncode == 0 and "would free 0 B" in table.stdout, table.stdout + table.stderr
    nothing = _gc(fleet)
    assert nothing.returncode == 2 and "--keep-last N, --older-than D" in nothing.stderr


def _task(mission: str, name: str, state: str, out: str | None = None, deps: tuple[str, ...] = ()) -> Any:
    from schemas.missions import Task

    result = {"outputs": {"base": {"sha256": out, "bytes": 100, "path": "/x"}}} if out else None
    return Task(task_id=f"{mission}/{name}", mission_id=mission, name=name, stage=name, kind="noop",
                params={}, deps=[f"{mission}/{d}" for d in deps], vram_gb=0, gpu_class=None, timeout_s=10,
                max_attempts=1, max_infra_attempts=1, state=state, result=result)  # fmt: skip


def test_the_plan_drops_only_what_no_kept_mission_references_and_no_waiting_task_needs() -> None:
    from fleetd.gc import plan
    from fleetd.scheduler import Mission, Scheduler

    s1, s2, s3, s4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)
    sched = Scheduler()
    # x: ended, its output s1 alone. y: a task of it still waits on s2 (as after a retry). z shares s3
    # with w, which is kept. Collecting x, y and z drops s1 only, and names s2 as needed.
    sched.add_mission(Mission("x", "x", "succeeded"), [_task("x", "a", "succeeded", s1)])
    sched.add_mission(Mission("y", "y", "succeeded"), [_task("y", "a", "succeeded", s2),
                                                       _task("y", "b", "pending", deps=("a",))])  # fmt: skip
    sched.add_mission(Mission("z", "z", "failed"), [_task("z", "a", "succeeded", s3)])
    sched.add_mission(
        Mission("w", "w", "running"), [_task("w", "a", "succeeded", s3), _task("w", "b", "running", s4)]
    )
    got = plan(sched, ["x", "y", "z"])
    assert got.drop == {s1: 100} and got.needed == {s2}
    assert plan(sched, ["w"]).drop == {s4: 100}  # s3 is z's too (z not collected here)


RACE = 'name = "race"' + HEADER + MAKE + USE


def _remove_object(fleet: Fleet, sha: str) -> None:
    """What gc does to an artifact: its manifest, then its parts."""

    async def remove(obs: Any) -> None:
        manifest = msgspec.json.decode((await obs.get(sha)).data or b"", type=artifacts.Manifest)
        await obs.delete(sha)
        for i in range(len(manifest.parts)):
            await obs.delete(f"{sha}.{i:05d}")

    _with_store(fleet, remove)


@pytest.mark.slow
def test_an_output_removed_while_its_task_finished_is_made_again(fleet: Fleet, tmp_path: Path) -> None:
    # The race gc could lose: a task makes bytes the store already holds (its worker skips the upload),
    # and the store's copy is removed before the coordinator records the task's end. fleetd is
    # stopped over that window; on waking it finds the output gone and runs the task again, so the
    # task after it gets its input. Without the check `make` succeeds and `use` fails: its input is gone.
    import os
    import signal

    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "race", RACE))
    # Leases as in production: the pause must not make the task's worker look lost.
    fleet.env.update(FLEET_SCHEDULER_LEASE_S="30", FLEET_SCHEDULER_ASSIGN_GRACE_S="30")
    fleet.start_with_workers("w0")
    first = str(call(fleet, "submit", m.SubmitRequest(mission="race"))["mission_id"])
    assert wait_mission(fleet, first, timeout=60)["missions"][0]["state"] == "succeeded"
    sha = _outputs(fleet, first)["make"]["sha256"]
    slow_make = m.SubmitRequest(mission="race", overrides={"stages.make.params.seconds": 3.0})
    second = str(call(fleet, "submit", slow_make)["mission_id"])
    wait_for(
        lambda: {t["name"]: t["state"] for t in status(fleet, second)["tasks"]}["make"] == "running",
        30,
        "make",
    )
    os.kill(fleet.fleetd.pid, signal.SIGSTOP)
    try:
        log = fleet.home / "worker-w0.out"
        ended = f'"task": "{second}/make", "attempt": 1'
        wait_for(
            lambda: any(ended in ln and "task_end" in ln for ln in log.read_text().splitlines()),
            30,
            "make's end",
        )
        _remove_object(fleet, sha)
        retention.remove(artifacts.cache_dir(fleet.home) / sha)  # and the host's copy, as gc's order does
    finally:
        os.kill(fleet.fleetd.pid, signal.SIGCONT)
    assert wait_mission(fleet, second, timeout=60)["missions"][0]["state"] == "succeeded"
    rows = sql(
        fleet,
        f"SELECT attempt, reason, error FROM task_attempts WHERE task_id = '{second}/make' ORDER BY attempt",
    )
    assert [r["reason"] for r in rows] == ["infra", None] and "removed from the object store" in rows[0][
        "error"
    ]
    assert _objects(fleet, [sha]) == {sha: True}  # the second attempt uploaded it again
