"""The v1.3 suite through the real fleet: a variant set off parity is refused at submit with its
numbers, and a subset of arms (`--set 'arms=[...]'`) runs one task per arm and seed at the tiny
profile on a random model, its rows reach DuckDB, and fleetd judges every gate left for those arms.
The smoke profile (30 minutes on 2 CPU workers) runs through `python -m fleetcli.results --missions
v13`, outside CI's hour (docs/decisions.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fleet.client import FleetError
from tests.bem.test_v13_recipe import tiny_base
from tests.fleet.conftest import Fleet, sql, submit, wait_mission

pytestmark = [pytest.mark.slow, pytest.mark.mission_fleet]

ROOT = Path(__file__).resolve().parents[2]
SPEC = tomllib.loads((ROOT / "schemas" / "missions" / "v13.toml").read_text())
ARMS = ["anchor", "V3", "MM", "MM_prefix"]


def test_a_subset_of_the_suite_stores_a_decision_for_each_of_its_gates(fleet: Fleet, tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    fleet.start_fleetd()
    # Off parity: refused before anything runs, with the ratios.
    with pytest.raises(FleetError) as err:
        submit(fleet, "v13", "smoke", **{"profiles.smoke.params.variants": {"V3": {"kron_ranks": [8, 8]}}})
    assert err.value.code == "invalid_spec" and "V3 is off parity" in str(err.value), str(err.value)
    assert "parameters" in str(err.value) and "FLOPs" in str(err.value)
    assert sql(fleet, "SELECT count(*) AS n FROM missions")[0]["n"] == 0

    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    overrides = {
        "arms": ARMS,
        "seeds": [1, 2],
        "profiles.smoke.params.profile": "tiny",
        "profiles.smoke.params.base": str(base),
    }
    mission = submit(fleet, "v13", "smoke", **overrides)
    st = wait_mission(fleet, mission, timeout=300)
    expected = {"base"} | {f"run-{arm}-s{seed}" for arm in ARMS for seed in (1, 2)}
    assert {t["name"]: t["state"] for t in st["tasks"]} == dict.fromkeys(expected, "succeeded"), st
    gates = SPEC["gates"]
    kept = {
        g["name"]
        for kind in ("preconditions", "claims", "guards")
        for g in gates[kind]
        if {g.get(r) for r in ("arm", "variant", "baseline")} - {None} <= set(ARMS)
    }
    assert "V3_chrf" in kept and "MM_vqa_em" in kept and "V1_em" not in kept
    rows = sql(fleet, f"SELECT gate, outcome, reason FROM decisions WHERE mission_id = '{mission}'")
    assert {r["gate"] for r in rows} == kept | {"verdict"}, rows
    assert not [r for r in rows if r["outcome"] == "nodata"], rows
    counts = sql(
        fleet,
        "SELECT arm, count(DISTINCT seed) AS seeds FROM example_scores "
        f"WHERE mission_id = '{mission}' GROUP BY arm",
    )
    assert {r["arm"]: r["seeds"] for r in counts} == dict.fromkeys(ARMS, 2)
