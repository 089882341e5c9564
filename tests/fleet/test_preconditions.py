"""A precondition in a real mission: when the skill never learns, the verdict is inconclusive, whatever
the claims say; when it learns, the same mission is judged on its claims."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fleet.conftest import Fleet, mission_dir, sql, submit, wait_mission

pytestmark = pytest.mark.slow

MISSION = """
name = "skilled"
arms = ["a", "b"]
seeds = [1, 2]

[profiles.smoke]
params = {{ seconds = 0.1, n_examples = 200, effect = 0.2 }}

[[stages]]
name = "score"
kind = "selftest.score"
foreach = ["arm", "seed"]
params = {{ skill_accuracy = {accuracy} }}

[gates]
n_resamples = 2000

[[gates.preconditions]]
name = "skill_learnt"          # could the run measure anything at all?
metric = "skill_em"
arm = "b"
statistic = "level"
low = 0.8

[[gates.claims]]
name = "b_beats_a"
metric = "score"
variant = "b"
baseline = "a"
"""


def run(fleet: Fleet, tmp_path: Path, accuracy: float) -> tuple[dict, list[dict]]:
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "skilled", MISSION.format(accuracy=accuracy)))
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    mission = submit(fleet, "skilled")
    st = wait_mission(fleet, mission, timeout=90)
    rows = sql(
        fleet, f"SELECT gate, kind, outcome, estimate, reason FROM decisions WHERE mission_id = '{mission}'"
    )
    return st["missions"][0], rows


def test_a_skill_that_never_learns_makes_the_verdict_inconclusive(fleet: Fleet, tmp_path: Path) -> None:
    mission, rows = run(fleet, tmp_path, accuracy=0.0)
    gates = {r["gate"]: r for r in rows}
    assert gates["skill_learnt"]["kind"] == "precondition" and gates["skill_learnt"]["outcome"] == "fail"
    assert gates["skill_learnt"]["estimate"] == 0.0
    assert gates["b_beats_a"]["outcome"] == "pass"  # the claim holds, and still decides nothing
    assert mission["verdict"] == "inconclusive" and mission["reason"].startswith("precondition"), mission


def test_a_skill_that_learns_leaves_the_claims_to_decide(fleet: Fleet, tmp_path: Path) -> None:
    mission, rows = run(fleet, tmp_path, accuracy=1.0)
    gates = {r["gate"]: r for r in rows}
    assert gates["skill_learnt"]["outcome"] == "pass" and gates["skill_learnt"]["estimate"] == 1.0
    assert mission["verdict"] == "promote", mission
