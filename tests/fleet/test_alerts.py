"""The Prometheus alert rules (prometheus/fleetd-alerts.yml): `promtool test rules` shows each alert
firing on a series that should trip it and quiet on one that should not, a rule changed under the test
fails it, and every metric the rules read is one a running fleetd serves."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet.conftest import REPO, Fleet

pytestmark = pytest.mark.slow
RULES = REPO / "prometheus" / "fleetd-alerts.yml"
TESTS = REPO / "prometheus" / "fleetd-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool: apt-get install prometheus (.ci/run installs it)"
)


def promtool_test(folder: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "test", "rules", "fleetd-alerts.test.yml"], cwd=folder, capture_output=True, text=True
    )


@needs_promtool
def test_each_alert_fires_when_it_should_and_only_then() -> None:
    done = promtool_test(RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", TESTS.read_text()))
    assert tested == set(re.findall(r"- alert: (\w+)", RULES.read_text())), tested


@needs_promtool
@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("for: 2m", "for: 20m"),  # a worker gone would be reported too late
        ("fleetd_running_mission_idle_seconds > 30 * 60", "fleetd_running_mission_idle_seconds > 0"),
        (
            "increase(fleetd_nats_reconnects_total[10m]) > 0",
            "increase(fleetd_nats_reconnects_total[10m]) > 1",
        ),
    ],
)
def test_a_rule_changed_under_the_tests_fails_them(tmp_path: Path, before: str, after: str) -> None:
    text = RULES.read_text()
    assert before in text
    (tmp_path / RULES.name).write_text(text.replace(before, after))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    assert promtool_test(tmp_path).returncode != 0


def test_every_metric_the_rules_read_is_one_fleetd_serves(fleet: Fleet) -> None:
    fleet.start_fleetd()
    with urllib.request.urlopen(f"{fleet.web_url()}/metrics", timeout=10) as r:
        served = {s.name for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    read = set(
        re.findall(
            r"\b(fleetd_[a-z_]+)",
            "\n".join(line for line in RULES.read_text().splitlines() if line.strip().startswith("expr:")),
        )
    )
    assert read and read <= served, read - served
