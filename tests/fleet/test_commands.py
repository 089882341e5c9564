"""Commands to a running job through the real bus: `fleet.cmd.<worker>` -> worker -> the task's process,
applied at the job's next step and acknowledged only then (what Mission B's rollback relies on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from fleet import bus, creds
from fleet.client import FleetError
from schemas import messages as m
from tests.fleet.conftest import Fleet, call, mission_dir, sql, status, submit, wait_for, wait_mission

pytestmark = pytest.mark.slow

OBEY = """
name = "obey"
[[stages]]
name = "obey"
kind = "selftest.obey"
params = { steps = 80, step_s = 0.05 }
"""


def command(fleet: Fleet, worker: str, action: str, task_id: str, attempt: int = 1) -> m.CommandAck:
    """A command as the coordinator sends it (no other credential may publish on fleet.cmd.*)."""

    async def go() -> m.CommandAck:
        nc = await bus.connect(fleet.url, "commander", creds.seed_path(fleet.home, "coordinator"))
        try:
            cmd = m.Command(action=action, task_id=task_id, attempt=attempt)  # type: ignore[arg-type]
            reply = await nc.request(f"fleet.cmd.{worker}", m.encode(cmd), timeout=10)
            return msgspec.json.decode(reply.data, type=m.CommandAck)
        finally:
            await nc.close()

    return anyio.run(go)


def test_a_running_job_applies_a_command_and_only_then_acknowledges(fleet: Fleet, tmp_path: Path) -> None:
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "obey", OBEY))
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    mission = submit(fleet, "obey")
    task = f"{mission}/obey"
    wait_for(lambda: status(fleet, mission)["tasks"][0]["state"] == "running", 30, "the task to run")

    ack = command(fleet, "w0", "rollback", task)
    assert ack.ok and ack.detail.startswith("rollback applied at step "), ack
    step = int(ack.detail.rsplit(" ", 1)[1])
    with pytest.raises(FleetError, match="runs without the safety overlay"):  # no params.overlay
        call(fleet, "knob", m.KnobRequest(task_id=task, value=0.5))
    refused = command(fleet, "w0", "promote", task, attempt=2)  # not the attempt that runs
    assert not refused.ok and "is not running here" in refused.detail
    ack2 = command(fleet, "w0", "promote", task)
    assert ack2.ok and int(ack2.detail.rsplit(" ", 1)[1]) >= step

    st = wait_mission(fleet, mission, timeout=60)
    assert st["missions"][0]["state"] == "succeeded"
    result = sql(fleet, f"SELECT result FROM tasks WHERE task_id = '{task}'")[0]["result"]
    applied = msgspec.json.decode(result)["applied"] if isinstance(result, str) else result["applied"]
    assert applied == [
        {"action": "rollback", "step": step, "value": None},
        {"action": "promote", "step": applied[1]["step"], "value": None},
    ]
    # The job's own record of the rollback reached DuckDB too.
    points = sql(fleet, f"SELECT step FROM metrics WHERE task_id = '{task}' AND name = 'applied/rollback'")
    assert [p["step"] for p in points] == [step]


CHECKED = """
name = "checked"
[[stages]]
name = "learner"
kind = "selftest.obey"
services = ["promotion"]
params = { steps = 130, step_s = 0.1, checks = [
    { step = 3, drift = { bogus = 1.0 } },
    { step = 5, drift = { kl_per_token = 0.01, grad_norm = 1.0 } },
    { step = 20, drift = { kl_per_token = 0.01, grad_norm = 25.0 } },
    { step = 40, canary = 0.97, prompts_since_promotion = 1500 },
    { step = 60, canary = 0.96, prompts_since_promotion = 1550 },
    { step = 80, canary = 0.99, prompts_since_promotion = 1600 },
    { step = 100, canary = 0.80, prompts_since_promotion = 20 },
] }
"""
NEXT_CHECK = {20: 40, 80: 100, 100: 130}  # the step of the learner's next check (or its end)


def test_services_roll_back_and_promote_through_the_real_bus(fleet: Fleet, tmp_path: Path) -> None:
    """An emergency drift check, three canary passes in a row, then a canary failure: the drift monitor
    and the canary gate (in fleetd) decide, command the worker, and store each decision and its ack.
    A check the service cannot judge (an unknown signal, step 3) is logged and skipped, not fatal."""
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "checked", CHECKED))
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    mission = submit(fleet, "checked")
    st = wait_mission(fleet, mission, timeout=90)
    assert st["missions"][0]["state"] == "succeeded"
    rows = sql(
        fleet,
        f"SELECT service, step, decision, acked, detail, reason FROM service_decisions "
        f"WHERE mission_id = '{mission}' ORDER BY step",
    )
    assert [(r["service"], r["step"], r["decision"]) for r in rows] == [
        ("drift", 20, "rollback"),
        ("canary", 80, "promote"),
        ("canary", 100, "rollback"),
    ], rows
    assert all(r["acked"] for r in rows), rows
    assert "emergency drift: grad_norm" in rows[0]["reason"]
    result = sql(fleet, f"SELECT result FROM tasks WHERE mission_id = '{mission}'")[0]["result"]
    applied = msgspec.json.decode(result)["applied"] if isinstance(result, str) else result["applied"]
    assert [a["action"] for a in applied] == ["rollback", "promote", "rollback"]
    for a, r in zip(applied, rows, strict=True):
        # Applied before the learner's next check: the rule is "within one check".
        assert r["step"] < a["step"] < NEXT_CHECK[r["step"]], (a, r)
        assert r["detail"] == f"{a['action']} applied at step {a['step']}"
    shown = status(fleet, mission)["service_decisions"]
    assert {(d["service"], d["step"]) for d in shown} == {("drift", 20), ("canary", 80), ("canary", 100)}


WATCHED = """
name = "watched"
[[stages]]
name = "served"
kind = "selftest.obey"
services = ["overlay"]
params = { steps = 180, step_s = 0.1, overlay = true, knob = 0.0, checks = [
    { step = 5, violated = 2, n = 10 },
    { step = 30, violated = 9, n = 10 },
    { step = 70, violated = 8, n = 10 },
    { step = 160, violated = 0, n = 10 },
] }
[services.overlay]
ceiling = 0.1
confidence = 0.9
raise_by = 0.3
"""


def test_a_violation_spike_makes_the_overlay_service_raise_the_knob(fleet: Fleet, tmp_path: Path) -> None:
    """Mission C's overlay service reads a task's red-team checks from JetStream: 2/10 is no spike at a
    .1 ceiling, 9/10 raises κ from 0 to .3, 8/10 at the applied .3 raises it to .6, a clean check
    nothing. Each decision is stored before its command and acknowledged by the task after; then a
    person sets κ by hand with `fleetctl knob`, audited under their credential."""
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "watched", WATCHED))
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    mission = submit(fleet, "watched")
    task = f"{mission}/served"

    def overlay_rows() -> list[dict[str, object]]:
        query = "SELECT service, step, decision, level, value, acked, detail, reason FROM service_decisions"
        return sql(fleet, f"{query} WHERE mission_id = '{mission}' ORDER BY service, step")

    wait_for(lambda: len([r for r in overlay_rows() if r["acked"]]) == 2, 60, "two acknowledged raises")
    fleetctl = [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(fleet.home), "--nats", fleet.url]
    by_hand = subprocess.run([*fleetctl, "knob", task, "0.9"], capture_output=True, text=True, timeout=60)
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    assert "applied" in by_hand.stdout and task in by_hand.stdout
    refused = subprocess.run([*fleetctl, "knob", task, "1.5"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "κ must be in [0, 1]" in refused.stderr, refused.stderr

    st = wait_mission(fleet, mission, timeout=60)
    assert st["missions"][0]["state"] == "succeeded"
    rows = overlay_rows()
    assert [(r["service"], r["step"], r["level"], r["value"]) for r in rows] == [
        ("knob", 0, "manual", 0.9),
        ("overlay", 30, "spike", 0.3),
        ("overlay", 70, "spike", 0.6),
    ], rows
    assert all(r["acked"] for r in rows), rows
    assert [str(r["detail"]).split(" applied")[0] for r in rows] == ["knob", "raise", "raise"], rows
    assert "8/10 red-team outputs violated at κ 0.3" in str(rows[2]["reason"])
    result = sql(fleet, f"SELECT result FROM tasks WHERE task_id = '{task}'")[0]["result"]
    applied = msgspec.json.decode(result)["applied"] if isinstance(result, str) else result["applied"]
    assert [(a["action"], a["value"]) for a in applied] == [("raise", 0.3), ("raise", 0.6), ("knob", 0.9)]
    # The raise reached the job before its next check: that check ran at the raised κ.
    knobs = sql(fleet, f"SELECT step, value FROM metrics WHERE task_id = '{task}' AND name = 'overlay/knob'")
    assert sorted((p["step"], p["value"]) for p in knobs) == [(5, 0.0), (30, 0.0), (70, 0.3), (160, 0.9)]
    audit = sql(
        fleet, f"SELECT role, action FROM audit WHERE mission_id = '{mission}' AND target LIKE '%/served#%'"
    )
    assert sorted((a["role"], a["action"]) for a in audit) == [
        ("client", "knob"),
        ("service", "raise"),
        ("service", "raise"),
    ], audit


def test_a_knob_for_no_running_task_is_refused_with_the_reason(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_fleetd()
    with pytest.raises(FleetError, match="no task 'nope/x'"):
        call(fleet, "knob", m.KnobRequest(task_id="nope/x", value=0.5))
    with pytest.raises(ValueError, match="knob command needs a value"):
        m.Command(action="knob", task_id="a/b", attempt=1)
    with pytest.raises(msgspec.ValidationError, match="takes no value"):
        msgspec.json.decode(
            b'{"action": "rollback", "task_id": "a/b", "attempt": 1, "value": 0.5}', type=m.Command
        )


def test_a_command_that_expired_in_the_queue_is_refused_not_applied() -> None:
    """The worker stopped waiting (and told the sender "not applied"): the job must not apply it later."""
    import io
    import time

    from workers import protocol as p
    from workers.child import PipeReporter

    out = io.BytesIO()
    reporter = PipeReporter(out)
    lines = [
        p.CommandMsg("old", "raise", 0.5, time.time() - 1),
        p.CommandMsg("new", "raise", 0.7, time.time() + 60),
    ]
    reporter.listen(io.BytesIO(b"".join(msgspec.json.encode(x) + b"\n" for x in lines)))
    time.sleep(0.2)  # the listening thread reads both lines
    assert [(c.id, c.value) for c in reporter.commands()] == [("new", 0.7)]
    done = [p.decoder.decode(line) for line in out.getvalue().splitlines()]
    assert done == [p.CommandDone("old", False, "expired: the job reached no step boundary in time")]
