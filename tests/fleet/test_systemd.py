"""The systemd units: `systemd-analyze verify` where it exists, the settings the fleet relies on, and
the example fleetd.toml loading under the strict config loader."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import config

UNITS = Path(__file__).resolve().parents[2] / "systemd"
VENV = "/opt/bem-fleet/venv"


def unit(name: str) -> dict[str, list[str]]:
    """`Key=value` lines per key (a key may repeat: Environment=), sections merged."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_coordinator_unit() -> None:
    u = unit("fleetd.service")
    assert u["Type"] == ["notify"] and u["WatchdogSec"] and u["Restart"] == ["on-failure"]
    assert u["StateDirectory"] == ["bem-fleet"]
    assert "fleetd-nats.service" in u["Requires"][0] and "fleetd-nats.service" in u["After"][0]
    assert u["ExecStart"][0].endswith(" run")


def test_nats_unit_lets_nobody_in_without_a_credential() -> None:
    u = unit("fleetd-nats.service")
    # The credentials exist before the server starts, and the server loads their authorization.
    assert u["ExecStartPre"] == [f"{VENV}/bin/fleetd --home /var/lib/bem-fleet creds ensure"]
    assert "-c /var/lib/bem-fleet/creds/nats-auth.conf" in u["ExecStart"][0]
    assert "-a 127.0.0.1" in u["ExecStart"][0] and u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # fleetd and the workers find their seeds in the same home the nats unit wrote them to.
    for name in ("fleetd.service", "fleetd-worker@.service"):
        assert "FLEET_HOME=/var/lib/bem-fleet" in unit(name)["Environment"], name


def test_worker_unit_pins_its_gpu_and_takes_its_children_down() -> None:
    u = unit("fleetd-worker@.service")
    assert (
        u["Type"] == ["notify"] and u["KillMode"] == ["control-group"] and u["PartOf"] == ["fleetd.service"]
    )
    env = " ".join(u["Environment"])
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env and "CUDA_VISIBLE_DEVICES=%i" in env
    assert "--gpu %i" in u["ExecStart"][0] and not any("%I" in v for vs in u.values() for v in vs)
    assert int(u["TimeoutStopSec"][0]) >= 60  # time for a checkpoint before SIGKILL


def test_example_config_loads_strictly(tmp_path: Path) -> None:
    cfg = config.load(UNITS / "fleetd.toml", env={})
    assert cfg.web.host == "127.0.0.1" and cfg.worker.preload == ["torch"]
    # Each commented default, switched on, is a real key (a typo would be an unknown-key error).
    lines = []
    for line in (UNITS / "fleetd.toml").read_text().splitlines():
        body = line.removeprefix("# ")
        if line.startswith("# ") and "=" in body and not body.startswith(("/", "e.g")) and body[0].islower():
            lines.append(body.split("  #")[0])
        elif line.startswith("["):
            lines.append(line)
    switched = tmp_path / "fleetd.toml"
    switched.write_text("\n".join(lines) + "\n")
    on = config.load(switched, env={})
    assert on.nats.url == "nats://127.0.0.1:4222" and on.web.token_file == "/etc/fleetd/web-token"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    venv = str(Path(sys.executable).parent.parent)  # ExecStart must name files that exist
    for src in UNITS.glob("*.service"):
        (tmp_path / src.name).write_text(src.read_text().replace(VENV, venv))
    shutil.copy(tmp_path / "fleetd-worker@.service", tmp_path / "fleetd-worker@GPU-0000.service")
    names = ["fleetd.service", "fleetd-nats.service", "fleetd-worker@GPU-0000.service"]
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in proc.stderr.splitlines() if str(tmp_path) in line or "fleetd" in line]
    assert proc.returncode == 0 and not ours, proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(
    ("name", "at_most"),
    [("fleetd.service", 4.0), ("fleetd-nats.service", 4.0), ("fleetd-worker@GPU-0000.service", 2.5)],
)
def test_units_are_sandboxed(tmp_path: Path, name: str, at_most: float) -> None:
    """systemd's own exposure score (0 safest, 10 unsandboxed); the worker keeps the NVIDIA devices."""
    for src in UNITS.glob("*.service"):
        shutil.copy(src, tmp_path / src.name)
    shutil.copy(tmp_path / "fleetd-worker@.service", tmp_path / "fleetd-worker@GPU-0000.service")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = proc.stdout.strip().splitlines()[-1]
    exposure = float(line.split(":")[1].split()[0])  # "→ Overall exposure level for X: 1.5 OK"
    assert exposure <= at_most, proc.stdout
    worker = unit("fleetd-worker@.service")
    assert "char-nvidia-frontend rw" in worker["DeviceAllow"] and worker["DevicePolicy"] == ["closed"]
