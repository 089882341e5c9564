"""Mission E through the real fleet: every seed's task runs on a CPU worker, its rows reach DuckDB, and
fleetd judges the mission's gates from the TOML into stored decisions. At the tiny profile on a random
model in `make test-slow`. The smoke profile (up to 40 minutes on 2 CPU workers) runs through
`python -m fleetcli.results --missions mission_e`, not in CI, whose hour Missions A and D already
fill (docs/decisions.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.bem.test_mission_e_recipe import tiny_base
from tests.fleet.conftest import Fleet, sql, submit, wait_mission

pytestmark = [pytest.mark.slow, pytest.mark.mission_fleet]

ROOT = Path(__file__).resolve().parents[2]
SPEC = tomllib.loads((ROOT / "schemas" / "missions" / "mission_e.toml").read_text())


def test_mission_e_stores_a_decision_for_every_gate(fleet: Fleet, tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    overrides = {
        "seeds": [1, 2],
        "profiles.smoke.params.profile": "tiny",
        "profiles.smoke.params.base": str(base),
    }
    mission = submit(fleet, "mission_e", "smoke", **overrides)
    st = wait_mission(fleet, mission, timeout=300)
    assert {t["name"]: t["state"] for t in st["tasks"]} == dict.fromkeys(
        ("base", "run-s1", "run-s2"), "succeeded"
    ), st
    gates = SPEC["gates"]
    names = {g["name"] for kind in ("preconditions", "claims", "guards") for g in gates[kind]}
    rows = sql(fleet, f"SELECT gate, outcome, reason FROM decisions WHERE mission_id = '{mission}'")
    assert {r["gate"] for r in rows} == names | {"verdict"}, rows
    # Every gate found its rows or its tasks' value: none lacks data.
    assert not [r for r in rows if r["outcome"] == "nodata"], rows
    counts = sql(
        fleet,
        "SELECT arm, count(DISTINCT seed) AS seeds FROM example_scores "
        f"WHERE mission_id = '{mission}' GROUP BY arm",
    )
    assert {r["arm"]: r["seeds"] for r in counts} == dict.fromkeys(SPEC["arms"], 2)
