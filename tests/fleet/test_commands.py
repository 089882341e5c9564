"""Commands to a running job through the real bus: `fleet.cmd.<worker>` -> worker -> the task's process,
applied at the job's next step and acknowledged only then (what Mission B's rollback relies on)."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import nats
import pytest

from schemas import messages as m
from tests.fleet.conftest import Fleet, mission_dir, sql, status, submit, wait_for, wait_mission

pytestmark = pytest.mark.slow

OBEY = """
name = "obey"
[[stages]]
name = "obey"
kind = "selftest.obey"
params = { steps = 80, step_s = 0.05 }
"""


def command(url: str, worker: str, action: str, task_id: str, attempt: int = 1) -> m.CommandAck:
    async def go() -> m.CommandAck:
        nc = await nats.connect(url)
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
    mission = submit(fleet.url, "obey")
    task = f"{mission}/obey"
    wait_for(lambda: status(fleet.url, mission)["tasks"][0]["state"] == "running", 30, "the task to run")

    ack = command(fleet.url, "w0", "rollback", task)
    assert ack.ok and ack.detail.startswith("rollback applied at step "), ack
    step = int(ack.detail.rsplit(" ", 1)[1])
    refused = command(fleet.url, "w0", "promote", task, attempt=2)  # not the attempt that runs
    assert not refused.ok and "is not running here" in refused.detail
    ack2 = command(fleet.url, "w0", "promote", task)
    assert ack2.ok and int(ack2.detail.rsplit(" ", 1)[1]) >= step

    st = wait_mission(fleet.url, mission, timeout=60)
    assert st["missions"][0]["state"] == "succeeded"
    result = sql(fleet.url, f"SELECT result FROM tasks WHERE task_id = '{task}'")[0]["result"]
    applied = msgspec.json.decode(result)["applied"] if isinstance(result, str) else result["applied"]
    assert applied == [
        {"action": "rollback", "step": step},
        {"action": "promote", "step": applied[1]["step"]},
    ]
    # The job's own record of the rollback reached DuckDB too.
    points = sql(
        fleet.url, f"SELECT step FROM metrics WHERE task_id = '{task}' AND name = 'applied/rollback'"
    )
    assert [p["step"] for p in points] == [step]
