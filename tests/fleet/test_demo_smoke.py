"""The demo mission (what `make run` runs) at its smoke profile through a real fleet, in `make
test-slow`: the base stage pretrains the smoke base and leaves it in the object store, the seeds on
both workers fetch it instead of pretraining their own, and the stats engine decides every gate."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from tests.fleet.conftest import Fleet, sql, submit, wait_mission

pytestmark = [pytest.mark.slow, pytest.mark.mission_smoke]

SPEC = tomllib.loads((Path(__file__).resolve().parents[2] / "schemas" / "missions" / "demo.toml").read_text())


def test_the_demo_smoke_decides_every_gate_with_the_base_fetched_by_its_seeds(fleet: Fleet) -> None:
    fleet.start_with_workers("w0", "w1")
    mission = submit(fleet, "demo", "smoke")
    st = wait_mission(fleet, mission, timeout=30 * 60)
    assert st["missions"][0]["state"] == "succeeded", st
    rows = sql(fleet, f"SELECT name, worker, result FROM tasks WHERE mission_id = '{mission}'")
    results = {
        r["name"]: json.loads(r["result"]) if isinstance(r["result"], str) else r["result"] for r in rows
    }
    base = results["base"]["outputs"]["base"]
    assert len(base["sha256"]) == 64 and base["bytes"] > 0
    assert len({r["worker"] for r in rows if r["name"] != "base"}) == 2  # the seeds ran on both workers
    fetched = Path(fleet.home / "cache" / "artifacts" / base["sha256"] / "content")
    assert (fetched / "config.json").is_file() and (fetched / "pretrain.json").is_file()
    gates = SPEC["gates"]
    names = {g["name"] for kind in ("preconditions", "claims", "guards") for g in gates.get(kind, [])}
    decided = sql(fleet, f"SELECT gate, outcome FROM decisions WHERE mission_id = '{mission}'")
    assert {d["gate"] for d in decided} == names | {"verdict"}, decided
    assert not [d for d in decided if d["outcome"] == "nodata"], decided
