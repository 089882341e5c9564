"""Mission B through the real fleet: an online learner on a CPU worker, fleetd's drift monitor and canary
gate reading its checks from JetStream, and their commands reaching the learner's process."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from rich.console import Console

from bem.core.models import build_tiny_llama, byte_tokenizer, save_model, tiny_llama_config
from bem.missions.mission_b.recipe import PROFILES
from fleet import render
from tests.fleet.conftest import Fleet, mission_dir, sql, status, submit, wait_mission

pytestmark = pytest.mark.slow

CFG = PROFILES["tiny"].learner
CHECK = CFG.drift_every * CFG.update_every  # prompts between drift checks
SABOTAGE = 2 * CHECK + 2  # an update with a learning rate 1,000x too large, between two checks

SPEC = """
name = "learner"
[[stages]]
name = "bad"
kind = "online.stream"
services = ["promotion"]
params = {{ profile = "tiny", seed = 1, base = "{base}", sabotage_at = {sabotage}, pace_s = 0.25 }}
[[stages]]
name = "clean"
kind = "online.stream"
services = ["promotion"]
params = {{ profile = "tiny", seed = 1, base = "{base}", pace_s = 0.25 }}
"""


def test_a_bad_update_is_rolled_back_by_the_services_within_one_check(fleet: Fleet, tmp_path: Path) -> None:
    base = save_model(build_tiny_llama(tiny_llama_config(), seed=0), byte_tokenizer(), tmp_path / "base")
    fleet.env["FLEET_MISSIONS_DIR"] = str(
        mission_dir(tmp_path, "learner", SPEC.format(base=base, sabotage=SABOTAGE))
    )
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    mission = submit(fleet, "learner")
    st = wait_mission(fleet, mission, timeout=240)
    assert st["missions"][0]["state"] == "succeeded", st

    rows = sql(
        fleet,
        "SELECT task_id, service, step, decision, acked, detail, reason FROM service_decisions "
        f"WHERE mission_id = '{mission}' ORDER BY step",
    )
    results = {
        r["task_id"].rsplit("/", 1)[1]: msgspec.json.decode(r["result"])
        if isinstance(r["result"], str)
        else r["result"]
        for r in sql(fleet, f"SELECT task_id, result FROM tasks WHERE mission_id = '{mission}'")
    }
    # The clean run is left alone; the bad update is caught at the first check after it.
    assert not [r for r in rows if r["task_id"].endswith("/clean") and r["decision"] == "rollback"], rows
    bad = [r for r in rows if r["task_id"].endswith("/bad")]
    first_check = (SABOTAGE // CHECK + 1) * CHECK
    assert bad and bad[0]["decision"] == "rollback" and bad[0]["step"] == first_check, bad
    assert bad[0]["acked"] is True and bad[0]["detail"].startswith("rollback at prompt "), bad[0]
    # Applied by the learner before its next check, to exactly the live weights (same hash).
    event = results["bad"]["events"][0]
    assert event["action"] == "rollback" and first_check <= event["prompt"] < first_check + CHECK, event
    assert event["to"] == event["live"] != event["from"]
    assert results["clean"]["rollbacks"] == 0
    st = status(fleet, mission)
    assert any(d["decision"] == "rollback" and d["step"] == first_check for d in st["service_decisions"])
    # fleetctl's summary counts every decision per task and service, from the store.
    counts = {(c["task_id"].rsplit("/", 1)[1], c["service"], c["decision"]): c for c in st["service_counts"]}
    rollbacks = sum(c["n"] for (task, _, d), c in counts.items() if task == "bad" and d == "rollback")
    assert rollbacks == len([r for r in bad if r["decision"] == "rollback"]) == results["bad"]["rollbacks"]
    console = Console(record=True, width=80)
    console.print(render.service_summary(st["service_counts"]))
    cells = [[c.strip() for c in x.split("│")[1:-1]] for x in console.export_text().splitlines() if "│" in x]
    line = next(c for c in cells if c[0] == "bad")
    promotions = len([r for r in bad if r["decision"] == "promote"])
    drift = len([r for r in bad if r["decision"] == "rollback" and r["service"] == "drift"])
    assert line[1:4] == [str(promotions), str(drift), str(rollbacks - drift)], line
