"""`fleetctl report`, `rejudge` and `retry --failed` on a real fleet (nats-server, fleetd, workers).

The report must print each gate's numbers exactly as the `decisions` table holds them, in one HTML
file that fetches nothing; a rejudge with nothing changed reproduces the decisions (the gates' seed);
a retry runs new attempts of the failed tasks only.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleet.client import FleetError
from fleetcli.fleetctl import parser
from schemas.messages import IdRequest
from tests.fleet.conftest import REPO, Fleet, call, mission_dir, sql, submit, wait_mission

pytestmark = pytest.mark.slow
# Harmless overrides (the values the spec has anyway, a description) that the report must rebuild.
OVERRIDES: dict[str, Any] = {"profiles.quick.description": "report test's run", "gates.n_resamples": 2000}


def fleetctl(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(fleet.home), "--nats", fleet.url, *args],
        cwd=REPO, env=fleet.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def exact(x: float | None) -> str:
    """The test's own rendering of a stored number: the float's repr, which reads back to itself."""
    return "" if x is None else repr(x)


def md_cells(line: str) -> list[str]:
    """The cells of a Markdown table row (pipes inside a cell are escaped as \\|)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def md_table(md: str, heading: str) -> list[dict[str, str]]:
    """The first table under `## heading`, as dicts by column."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    headers = md_cells(rows[0])
    return [dict(zip(headers, md_cells(r), strict=True)) for r in rows[2:]]


def test_report_shows_the_stored_decisions_and_rejudge_reproduces_them(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    mission = submit(fleet, "selftest", "quick", **OVERRIDES)
    with pytest.raises(FleetError) as err:  # a mission still running keeps its judge
        call(fleet, "rejudge", IdRequest(id=mission))
    assert err.value.code == "refused" and f"mission {mission} is still running" in str(err.value)
    st = wait_mission(fleet, mission)
    assert st["missions"][0]["state"] == "succeeded" and st["missions"][0]["verdict"] == "promote", st

    out = fleetctl(fleet, "report", mission, "--out", str(tmp_path / "reports"), "--json")
    assert out.returncode == 0, out.stderr
    files = {k: Path(v) for k, v in json.loads(out.stdout).items()}
    assert files["markdown"] == tmp_path / "reports" / f"{mission}.md"
    md, page = files["markdown"].read_text(), files["html"].read_text()

    # Every gate's numbers as stored: the Markdown row against the decisions row, formatted here.
    decisions = sql(fleet, f"SELECT * FROM decisions WHERE mission_id = '{mission}' ORDER BY rowid")
    gates = [d for d in decisions if d["kind"] != "verdict"]
    assert {d["gate"] for d in gates} == {"b_beats_a", "b_level_sane"}
    shown = {r["gate"]: r for r in md_table(md, "Gates")}
    for d in gates:
        row = shown[d["gate"]]
        low = "-inf" if d["ci_low"] is None else exact(d["ci_low"])
        high = "+inf" if d["ci_high"] is None else exact(d["ci_high"])
        assert row["estimate"] == exact(d["estimate"]) and float(row["estimate"]) == d["estimate"]
        assert row["interval"] == f"[{low}, {high}]", (row, d)
        assert (row["p"], row["p_adj"]) == (exact(d["p"]), exact(d["p_adj"])), (row, d)
        assert (row["outcome"], row["reason"]) == (d["outcome"], d["reason"])
    verdict = next(d for d in decisions if d["kind"] == "verdict")
    assert f"**{verdict['outcome']}:** {verdict['reason']}" in md

    # Per-arm means of the scores, the training curves, who asked, the environment.
    means = {(r["metric"], r["arm"]): float(r["mean"]) for r in md_table(md, "Per-arm means")}
    stored = sql(
        fleet, f"SELECT arm, avg(value) AS v FROM example_scores WHERE mission_id = '{mission}' GROUP BY arm"
    )
    assert {k[1] for k in means} == {"a", "b"}
    for r in stored:
        assert means[("score", r["arm"])] == pytest.approx(r["v"], rel=1e-12)
    assert (
        "The metrics named like 'loss'" in md
        and (files["markdown"].parent / f"{mission}.curves.svg").is_file()
    )
    asked = md_table(md, "Who asked")
    assert [(a["action"], a["role"]) for a in asked] == [("submit", "client"), ("decide", "coordinator")]
    env = md_table(md, "Environment")
    assert sum(len(e["tasks"].split(", ")) for e in env) == 9
    assert all(e["numpy"] == importlib.metadata.version("numpy") for e in env)
    assert all(e["nats-py"] == importlib.metadata.version("nats-py") for e in env)
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        assert all(e["git commit"].startswith(head.strip()) for e in env), env
        assert f"by fleetctl at commit {head.strip()}" in md
    # The submit command, rebuilt from the missions row, parses back to the same request.
    command = md.split("## Reproduce\n", 1)[1].split("```\n", 2)[1].strip()
    args = parser().parse_args(shlex.split(command)[1:])
    assert (args.mission, args.profile, dict(args.overrides)) == ("selftest", "quick", OVERRIDES), command

    # The forest plot: an SVG beside the Markdown, inlined in the HTML, which loads nothing.
    forest = files["forest"]
    assert f"![forest plot of the gates]({forest.name})" in md and forest.read_text().startswith("<?xml")
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/svg+xml;base64,") for s in sources)
    inlined = [base64.b64decode(s.split(",", 1)[1]).decode() for s in sources]
    assert inlined[0] == forest.read_text() and all(d["gate"] in inlined[0] for d in gates)
    assert f"<td>{exact(gates[0]['estimate'])}</td>" in page

    # Rejudge with nothing changed: the same decisions (the gates' seed), and who asked.
    again = call(fleet, "rejudge", IdRequest(id=mission), timeout=120)
    assert (again["previous"], again["verdict"]) == ("promote", "promote")
    after = sql(fleet, f"SELECT * FROM decisions WHERE mission_id = '{mission}' ORDER BY rowid")
    strip = [{k: v for k, v in d.items() if k != "decided_at"} for d in decisions]
    assert [{k: v for k, v in d.items() if k != "decided_at"} for d in after] == strip
    assert after[0]["decided_at"] > decisions[0]["decided_at"]
    audit = sql(
        fleet, f"SELECT action, role, detail FROM audit WHERE mission_id = '{mission}' ORDER BY asked_at"
    )
    assert audit[-1]["action"] == "rejudge" and audit[-1]["role"] == "client"
    assert audit[-1]["detail"].startswith("promote -> promote: ")
    with pytest.raises(FleetError, match="has no failed task to retry"):
        call(fleet, "retry", IdRequest(id=mission))


RETRYING = """
name = "retrying"
arms = ["a", "b"]
[defaults]
timeout_s = 60
max_attempts = 2
[[stages]]
name = "ok"
kind = "selftest.sleep"
params = { seconds = 0.1 }
[[stages]]
name = "broken"
kind = "selftest.flaky"       # fails every attempt there is
params = { seconds = 0.1, fail_attempts = 99 }
[[stages]]
name = "after"
kind = "selftest.sleep"
after = ["broken"]
[[stages]]
name = "score"
kind = "selftest.score"
foreach = ["arm"]
after = ["ok"]
params = { seconds = 0.1, n_examples = 50, seed = 1 }
[gates]
n_resamples = 500
[[gates.claims]]
name = "b_beats_a"
metric = "score"
variant = "b"
baseline = "a"
"""


def attempts(fleet: Fleet, mission: str) -> dict[str, list[int]]:
    rows = sql(
        fleet,
        "SELECT t.name, list(a.attempt ORDER BY a.attempt) AS attempts FROM tasks t "
        f"LEFT JOIN task_attempts a USING (task_id) WHERE t.mission_id = '{mission}' GROUP BY t.name",
    )
    return {r["name"]: [a for a in r["attempts"] if a is not None] for r in rows}


def test_retry_failed_runs_new_attempts_of_the_failed_tasks_only(fleet: Fleet, tmp_path: Path) -> None:
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "retrying", RETRYING))
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.wait_workers(1)
    mission = submit(fleet, "retrying")
    st = wait_mission(fleet, mission)
    assert st["missions"][0]["state"] == "failed" and st["missions"][0]["verdict"], st
    before = attempts(fleet, mission)
    assert before == {"ok": [1], "broken": [1, 2], "after": [], "score-a": [1], "score-b": [1]}, before

    out = fleetctl(fleet, "retry", mission, "--failed", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "mission_id": mission, "retried": [f"{mission}/broken"], "dependents": [f"{mission}/after"],
    }  # fmt: skip
    st = wait_mission(fleet, mission)
    assert st["missions"][0]["state"] == "failed", st
    # Two new attempts of the failed task (a fresh budget), none of the others; the dependent waited
    # for it again and was cancelled again.
    assert attempts(fleet, mission) == {**before, "broken": [1, 2, 3, 4]}
    tasks = {t["name"]: t for t in st["tasks"]}
    assert tasks["after"]["state"] == "cancelled" and "dependency" in tasks["after"]["error"]
    audit = sql(
        fleet, f"SELECT action, role, detail FROM audit WHERE mission_id = '{mission}' ORDER BY asked_at"
    )
    assert [a["action"] for a in audit] == ["submit", "decide", "retry", "decide"], audit
    assert audit[2]["role"] == "client" and json.loads(audit[2]["detail"])["failed"] == [f"{mission}/broken"]
    verdicts = sql(
        fleet, f"SELECT count(*) AS n FROM decisions WHERE mission_id = '{mission}' AND kind = 'verdict'"
    )
    assert verdicts[0]["n"] == 1  # judged again: one set of decisions, not two
    refused = fleetctl(fleet, "retry", mission)  # --failed is the only kind of retry, and required
    assert refused.returncode == 2 and "--failed" in refused.stderr


def test_results_runs_missions_on_a_fresh_fleet_and_writes_their_reports(tmp_path: Path) -> None:
    """`make results`' plumbing, on the selftest at its quick profile instead of the smoke missions."""
    out = subprocess.run(
        [sys.executable, "-m", "fleetcli.results", "--missions", "selftest", "--profile", "quick",
         "--out", str(tmp_path / "results")],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    written = sorted(p.name.split(".", 1) for p in (tmp_path / "results").iterdir())
    assert len({mission for mission, _ in written}) == 1 and written[0][0].startswith("selftest-"), written
    assert [suffix for _, suffix in written] == ["curves.svg", "forest.svg", "html", "md"], written
    md = next((tmp_path / "results").glob("*.md")).read_text()
    assert "**promote:**" in md and "by fleetctl at commit " in md
    home = re.search(r"fleet home (\S+)", out.stdout)
    assert home is not None and not Path(home.group(1)).exists()  # the temporary fleet is gone
