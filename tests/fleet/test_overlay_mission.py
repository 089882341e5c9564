"""Mission A at its smoke profile with Mission C's overlay on, through the real fleet (`make test-slow`):
the base learns both missions' mixtures, the overlay stage trains the package on it, and the run task
serves its evaluation under the overlay with red-team checks, which fleetd's overlay service reads to
raise κ through the worker. Minutes: the union base alone pretrains for about eight."""

from __future__ import annotations

import msgspec
import pytest

from tests.fleet.conftest import Fleet, sql, submit, wait_mission

pytestmark = [pytest.mark.slow, pytest.mark.mission_smoke, pytest.mark.outside_ci]


def test_a_mission_a_smoke_task_with_the_overlay_on_shows_the_services_knob_decisions(fleet: Fleet) -> None:
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    mission = submit(fleet, "mission_a", "smoke_overlay", seeds=[1])
    st = wait_mission(fleet, mission, timeout=45 * 60)
    tasks = {t["name"]: t for t in st["tasks"]}
    assert {n: t["state"] for n, t in tasks.items()} == dict.fromkeys(
        ("base", "overlay", "run-s1"), "succeeded"
    )

    rows = sql(
        fleet,
        "SELECT task_id, service, step, decision, level, value, acked, detail, reason FROM service_decisions "
        f"WHERE mission_id = '{mission}' ORDER BY step",
    )
    assert rows, "the overlay service raised κ on no check"
    assert all(r["task_id"] == f"{mission}/run-s1" and r["service"] == "overlay" for r in rows), rows
    assert all(r["decision"] == "raise" and r["level"] == "spike" for r in rows), rows
    raw = sql(fleet, f"SELECT result FROM tasks WHERE task_id = '{mission}/run-s1'")[0]["result"]
    result = msgspec.json.decode(raw) if isinstance(raw, str) else raw
    overlay = result["overlay"]
    # Every raise was applied at the task's next check, except one decided on its last check (no check
    # followed to apply it; the worker reports it not applied).
    last = max(c["step"] for c in overlay["checks"])
    applied = [r for r in rows if r["step"] < last]
    assert all(r["acked"] and str(r["detail"]).startswith("raise applied at check ") for r in applied), rows
    assert all(not r["acked"] for r in rows if r["step"] == last), rows
    # What the task applied is what the service decided, in order; later checks ran at the raised κ.
    assert [a["kappa"] for a in overlay["applied"]] == [r["value"] for r in applied]
    for applied in overlay["applied"]:
        later = [c for c in overlay["checks"] if c["step"] >= applied["check"]]
        assert later and later[0]["kappa"] == applied["kappa"], (applied, overlay["checks"])
    # Each decision came from a check the task reported: step, violations and κ match its reason.
    checks = {c["step"]: c for c in overlay["checks"]}
    for r in rows:
        c = checks[r["step"]]
        assert f"{c['violations']}/{c['n']} red-team outputs violated at κ {c['kappa']:g}" in r["reason"]
    raw = sql(fleet, f"SELECT result FROM tasks WHERE task_id = '{mission}/overlay'")[0]["result"]
    package = msgspec.json.decode(raw) if isinstance(raw, str) else raw
    assert min(package["op"].values()) >= 0.95, package  # trained out of the skill subspace
