"""Mission D through the real fleet: every seed's task runs on a CPU worker, its rows reach DuckDB, and
fleetd judges the mission's gates from the TOML into stored decisions. At the tiny profile on a random
model in `make test-slow`. The smoke profile (about 21 minutes on 2 CPU workers) runs through
`python -m fleetcli.results --missions mission_d`, outside CI's hour (docs/decisions.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.bem.test_mission_d_recipe import tiny_base
from tests.fleet.conftest import Fleet, sql, submit, wait_mission

pytestmark = [pytest.mark.slow, pytest.mark.mission_fleet]

ROOT = Path(__file__).resolve().parents[2]
SPEC = tomllib.loads((ROOT / "schemas" / "missions" / "mission_d.toml").read_text())


def test_mission_d_stores_a_decision_for_every_gate(fleet: Fleet, tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    overrides = {
        "seeds": [1, 2],
        "profiles.smoke.params.profile": "tiny",
        "profiles.smoke.params.base": str(base),
    }
    mission = run(fleet, overrides, [1, 2], timeout=300)
    check_decisions(fleet, mission, seeds=2)


def run(fleet: Fleet, overrides: dict[str, Any], seeds: list[int], timeout: float) -> str:
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    mission = submit(fleet, "mission_d", "smoke", **overrides)
    st = wait_mission(fleet, mission, timeout=timeout)
    names = ("base", *(f"run-s{s}" for s in seeds))
    assert {t["name"]: t["state"] for t in st["tasks"]} == dict.fromkeys(names, "succeeded"), st
    return mission


def check_decisions(fleet: Fleet, mission: str, seeds: int) -> None:
    gates = SPEC["gates"]
    names = {g["name"] for kind in ("preconditions", "claims", "guards") for g in gates[kind]}
    rows = sql(fleet, f"SELECT gate, outcome, reason FROM decisions WHERE mission_id = '{mission}'")
    assert {r["gate"] for r in rows} == names | {"verdict"}, rows
    # Every gate found its rows (or, for the FLOPs guard, the tasks' value): none lacks data.
    assert not [r for r in rows if r["outcome"] == "nodata"], rows
    counts = sql(
        fleet,
        "SELECT arm, count(DISTINCT seed) AS seeds FROM example_scores "
        f"WHERE mission_id = '{mission}' GROUP BY arm",
    )
    assert {r["arm"]: r["seeds"] for r in counts} == dict.fromkeys(SPEC["arms"], seeds)
