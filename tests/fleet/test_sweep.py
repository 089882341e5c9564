"""Sweeps: the spec's `[sweep]` expanded into trials like arms, a 2×2 sweep of selftest tasks through a
real fleet ranked against the stored scores, its winner written as an overrides file and run gated on
fresh seeds, and the median rule stopping poor trials of a running sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import msgspec
import pandas as pd
import pytest

from fleet.client import FleetError
from schemas import messages as m
from schemas import missions as specs
from tests.fleet.conftest import REPO, Fleet, call, mission_dir, sql, status, wait_for, wait_mission


def _spec(tmp_path: Path, text: str, name: str = "swept") -> specs.MissionSpec:
    return specs.load(mission_dir(tmp_path, name, text) / f"{name}.toml")


PIPELINE = """
name = "swept"
arms = ["a", "b"]
seeds = [1]
[profiles.smoke]
params = { seconds = 0.1 }
[[stages]]
name = "prep"
kind = "selftest.sleep"
foreach = ["seed"]
[[stages]]
name = "train"
kind = "selftest.score"
foreach = ["arm", "seed"]
after = ["prep"]
params = { lr = 0.1, effect = 0.1 }
[[stages]]
name = "eval"
kind = "selftest.sleep"
foreach = ["arm", "seed"]
after = ["train"]
[sweep]
seeds = [7]
metric = "score"
params = { lr = [0.1, 0.2, 0.3], effect = [0.0, 0.5] }
"""


def test_a_sweep_expands_the_stages_that_take_its_params_and_those_after_them(tmp_path: Path) -> None:
    spec = _spec(tmp_path, PIPELINE)
    tasks = {t.name: t for t in specs.expand(spec, None, "m", sweep=True)}
    assert [n for n in tasks if n.startswith("prep")] == ["prep-s7"]  # no swept param: runs once
    assert len([n for n in tasks if n.startswith("train")]) == 6 * 2  # 3 x 2 trials x 2 arms
    t4 = tasks["train-b-s7-t4"]  # the grid's first key varies slowest: (lr 0.3, effect 0.0)
    assert (t4.trial, t4.params["lr"], t4.params["effect"], t4.params["seed"]) == (4, 0.3, 0.0, 7)
    assert t4.deps == ["m/prep-s7"]
    ev = tasks["eval-b-s7-t4"]  # after a swept stage: per trial, following its own trial only
    assert ev.trial == 4 and ev.deps == ["m/train-b-s7-t4"] and "lr" not in ev.params
    plain = specs.expand(spec, None, "m")  # the same spec without --sweep: the mission, its seeds
    assert len(plain) == 5 and {t.seed for t in plain} == {1} and all(t.trial is None for t in plain)


def test_random_draws_are_seeded_and_stay_in_their_ranges(tmp_path: Path) -> None:
    text = PIPELINE.replace(
        "params = { lr = [0.1, 0.2, 0.3], effect = [0.0, 0.5] }",
        'method = "random"\ntrials = 50\nseed = 4\n'
        "params = { lr = { low = 1e-4, high = 1e-1, log = true }, effect = [0.0, 0.5] }",
    )
    sw = _spec(tmp_path, text).sweep
    assert sw is not None
    draws = specs.trials(sw)
    assert draws == specs.trials(sw) and len(draws) == 50
    assert all(1e-4 <= d["lr"] <= 1e-1 and d["effect"] in (0.0, 0.5) for d in draws)
    below = sum(d["lr"] < 1e-2 for d in draws)  # log-uniform: two decades of three below 1e-2
    assert 25 <= below <= 42
    other = msgspec.structs.replace(sw, seed=5)
    assert specs.trials(other) != draws


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ("seeds = [7]", "sweep.seeds", "also the mission's seeds"),
        ("params = { lr = [0.1, 0.2, 0.3], effect = [0.0, 0.5] }", "sweep.params.depth", "no stage"),
        ("params = { lr = [0.1, 0.2, 0.3], effect = [0.0, 0.5] }", "sweep.params.lr", "ranges are for"),
        ("params = { lr = [0.1, 0.2, 0.3], effect = [0.0, 0.5] }", "sweep.params.seed", "set by the mission"),
        ('metric = "score"', "sweep.baseline", "needs another arm"),
        ('metric = "score"', "sweep.arm", "unknown arm"),
    ],
)
def test_a_bad_sweep_is_refused_naming_its_field(
    tmp_path: Path, change: str, field: str, reason: str
) -> None:
    new = {
        "sweep.seeds": "seeds = [1, 7]",
        "sweep.params.depth": "params = { depth = [1, 2] }",
        "sweep.params.lr": "params = { lr = { low = 0.1, high = 0.2 } }",
        "sweep.params.seed": "params = { seed = [1, 2] }",
        "sweep.baseline": 'metric = "score"\nbaseline = "a"',
        "sweep.arm": 'metric = "score"\narm = "c"',
    }[field]
    with pytest.raises(specs.SpecError) as e:
        _spec(tmp_path, PIPELINE.replace(change, new))
    assert e.value.field == field and reason in e.value.reason


def test_the_winner_s_overrides_set_its_values_on_the_plain_mission(tmp_path: Path) -> None:
    spec = _spec(tmp_path, PIPELINE)
    overrides = specs.winner_overrides(spec, "smoke", {"lr": 0.3, "seconds": 0.5})
    # lr lives in a stage; seconds in the profile, which wins over the stages' params.
    assert overrides == {"stages.train.params.lr": 0.3, "profiles.smoke.params.seconds": 0.5}
    again = specs.load(tmp_path / "missions" / "swept.toml", overrides)
    assert all(t.params["seconds"] == 0.5 for t in specs.expand(again, "smoke", "m"))
    assert [t.params["lr"] for t in specs.expand(again, "smoke", "m") if t.stage == "train"] == [0.3, 0.3]


def test_a_sweep_that_varies_nothing_or_too_much_is_refused(tmp_path: Path) -> None:
    only_fast = PIPELINE.replace("params = { lr = [0.1, 0.2, 0.3], effect = [0.0, 0.5] }",
                                 "params = { depth = [1, 2] }")  # fmt: skip
    only_fast = only_fast.replace(
        "[profiles.smoke]", "[profiles.deep]\nparams = { depth = 1 }\n[profiles.smoke]"
    )
    spec = _spec(tmp_path, only_fast)  # a key only the deep profile sets: the smoke profile varies nothing
    # A profile's param is every stage's: each runs per trial (2 trials x (1 prep + 2 train + 2 eval)).
    assert len(specs.expand(spec, "deep", "m", sweep=True)) == 2 * (1 + 2 + 2)
    with pytest.raises(specs.SpecError, match="no stage of profile 'smoke' sets any of"):
        specs.expand(spec, "smoke", "m", sweep=True)
    huge = PIPELINE.replace("params = { lr = [0.1, 0.2, 0.3], effect = [0.0, 0.5] }",
                            'method = "random"\ntrials = 1000000000\nparams = { lr = [0.1] }')  # fmt: skip
    with pytest.raises(specs.SpecError, match="1000000000 trials; at most 1000"):
        _spec(tmp_path, huge)  # counted, never drawn


def test_the_winner_is_the_best_trial_that_ran_to_its_end() -> None:
    from fleetd.sweeps import winner

    spec = '{"name": "s", "stages": [{"name": "x", "kind": "k", "params": {"lr": 1}}]}'
    row = {"name": "s", "profile": "smoke", "spec": spec, "overrides": '{"stages.x.params.depth": 2}'}
    trials = [
        {"trial": 3, "rank": 1, "stopped": "stopped at step 9", "params": '{"lr": 0.3}'},
        {"trial": 1, "rank": 2, "stopped": None, "params": '{"lr": 0.1}'},
        {"trial": 2, "rank": None, "stopped": None, "params": '{"lr": 0.2}'},
    ]
    decoded = msgspec.json.decode(spec, type=specs.MissionSpec)
    best = winner(decoded, row, trials)
    assert best is not None and best["trial"] == 1
    assert best["overrides"] == {"stages.x.params.depth": 2, "stages.x.params.lr": 0.1}
    assert winner(decoded, row, trials[:1] + trials[2:]) is None


def _ctl(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(fleet.home), "--nats", fleet.url, *args],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.mark.slow
def test_a_2x2_sweep_of_selftest_ranks_its_trials_and_its_winner_runs_gated(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.start_with_workers("w0", "w1")
    done = _ctl(fleet, "submit", "selftest", "--profile", "quick", "--sweep", "--detach", "--json")
    assert done.returncode == 0, done.stderr
    sweep_id = json.loads(done.stdout)["mission_id"]
    assert wait_mission(fleet, sweep_id, timeout=180)["missions"][0]["state"] == "succeeded"
    best = tmp_path / "best.toml"
    shown = _ctl(fleet, "sweep", sweep_id, "--write", str(best), "--json")
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)

    # The ranking against the stored scores: each trial's b − a, each example averaged over seeds.
    scores = pd.DataFrame(sql(fleet, (
        "SELECT t.trial, s.arm, s.example_id, avg(s.value) AS v FROM example_scores s JOIN tasks t "
        f"USING (task_id) WHERE s.mission_id = '{sweep_id}' GROUP BY ALL"
    )))  # fmt: skip
    wide = scores.pivot_table(index=["trial", "example_id"], columns="arm", values="v")
    expected = (wide["b"] - wide["a"]).groupby("trial").mean()
    trials = out["trials"]
    assert [t["rank"] for t in trials] == [1, 2, 3, 4]
    assert [t["trial"] for t in trials] == list(expected.sort_values(ascending=False).index)
    for t in trials:
        assert t["estimate"] == pytest.approx(expected[t["trial"]], abs=1e-12)
        assert t["ci_low"] < t["estimate"] < t["ci_high"]
        assert t["n"] == t["params"]["n_examples"]  # the examples, each its mean over seeds 11 and 12
    top, bottom = trials[:2], trials[2:]
    assert {t["params"]["effect"] for t in top} == {0.2} and {t["params"]["effect"] for t in bottom} == {0.0}
    assert all(t["ci_low"] > 0.15 for t in top) and all(t["ci_low"] < 0 < t["ci_high"] for t in bottom)
    # Never gated: no verdict, no decisions; its tasks ran on the sweep's seeds.
    row = sql(fleet, f"SELECT verdict, reason FROM missions WHERE mission_id = '{sweep_id}'")[0]
    assert row["verdict"] is None and row["reason"].startswith("sweep of 4 trials, never gated")
    assert sql(fleet, f"SELECT count(*) AS n FROM decisions WHERE mission_id = '{sweep_id}'")[0]["n"] == 0
    seeds = sql(
        fleet, f"SELECT DISTINCT seed FROM tasks WHERE mission_id = '{sweep_id}' AND seed IS NOT NULL"
    )
    assert sorted(r["seed"] for r in seeds) == [11, 12]
    with pytest.raises(FleetError) as refused:
        call(fleet, "rejudge", m.IdRequest(id=sweep_id))
    assert refused.value.code == "refused" and "never judged" in str(refused.value)

    # The winner's overrides file, then the winner as a gated mission on the mission's own seeds.
    written = tomllib.loads(best.read_text())
    assert written == {f"stages.score.params.{k}": v for k, v in trials[0]["params"].items()}
    assert f"sweep {sweep_id}" in best.read_text()
    run = _ctl(
        fleet, "submit", "selftest", "--profile", "quick", "--overrides", str(best), "--detach", "--json"
    )
    assert run.returncode == 0, run.stderr
    gated = json.loads(run.stdout)["mission_id"]
    final = wait_mission(fleet, gated, timeout=180)["missions"][0]
    assert final["verdict"] == "promote", final
    ran = sql(fleet, "SELECT DISTINCT seed, json_extract(params, '$.effect') AS effect FROM tasks "
                     f"WHERE mission_id = '{gated}' AND stage = 'score'")  # fmt: skip
    assert {(r["seed"], json.loads(r["effect"])) for r in ran} == {(1, 0.2), (2, 0.2)}

    # The page shows the same ranking; the CLI's table names every trial.
    web, token = fleet.web_url(), {"Authorization": f"Bearer {fleet.web_token()}"}
    req = urllib.request.Request(f"{web}/api/missions/{sweep_id}", headers=token)
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["sweep"]["trials"] == trials
    table = _ctl(fleet, "sweep", sweep_id)
    assert table.returncode == 0 and all(f"t{t}" in table.stdout for t in range(4)), table.stderr
    with pytest.raises(FleetError) as not_sweep:
        call(fleet, "sweep", m.IdRequest(id=gated))
    assert not_sweep.value.code == "refused"


STOPPER = """
name = "stopper"
arms = ["b"]
seeds = [1]
[defaults]
timeout_s = 60
[[stages]]
name = "score"
kind = "selftest.score"
foreach = ["arm", "seed"]
params = { seconds = 2.0, n_examples = 200, effect = 0.1 }
[[stages]]
name = "report"
kind = "selftest.sleep"
foreach = ["arm", "seed"]
after = ["score"]
params = { seconds = 0.1 }
[sweep]
seeds = [5]
metric = "score"
arm = "b"
params = { effect = [0.3, 0.0], n_examples = [200, 201] }
[sweep.early_stop]
metric = "score/running_mean"
after_steps = 2
goal = "max"
min_trials = 2
"""


@pytest.mark.slow
def test_the_median_rule_stops_the_poor_trials_of_a_running_sweep(fleet: Fleet, tmp_path: Path) -> None:
    # One worker runs the trials in order: t0 and t1 (effect 0.3) finish before t2 and t3 (effect 0)
    # start, so each of those meets two better curves at step 2 and is stopped there. fleetd is
    # killed while t1 runs: at restart the rule is rebuilt from the stored curves (t0's whole, t1's
    # so far); without that replay t2 would meet t1's curve alone and run to its end.
    fleet.env["FLEET_MISSIONS_DIR"] = str(mission_dir(tmp_path, "stopper", STOPPER))
    fleet.start_with_workers("w0")
    sweep_id = str(call(fleet, "submit", m.SubmitRequest(mission="stopper", sweep=True))["mission_id"])

    def t1_running() -> bool:
        states = {t["name"]: t["state"] for t in status(fleet, sweep_id)["tasks"]}
        return states["score-b-s5-t0"] == "succeeded" and states["score-b-s5-t1"] == "running"

    wait_for(t1_running, 60, "trial 0 done and trial 1 running")
    fleet.kill9(fleet.fleetd)
    fleet.start_fleetd()
    assert wait_mission(fleet, sweep_id, timeout=120)["missions"][0]["state"] == "succeeded"
    rows = sql(fleet, f"SELECT name, state, error FROM tasks WHERE mission_id = '{sweep_id}' ORDER BY name")
    states = {r["name"]: (r["state"], r["error"]) for r in rows}
    assert {n: st for n, (st, _) in states.items()} == {
        **{f"{stage}-b-s5-t{t}": "succeeded" for stage in ("score", "report") for t in (0, 1)},
        **{f"{stage}-b-s5-t{t}": "stopped" for stage in ("score", "report") for t in (2, 3)},
    }  # the stopped trials' later stage never ran: stopped with them, and the sweep succeeded
    assert all("stopped at step 2 of score-b-5" in states[f"score-b-s5-t{t}"][1] for t in (2, 3))
    out = call(fleet, "sweep", m.IdRequest(id=sweep_id))
    assert out["best"]["trial"] in (0, 1) and out["best"]["params"]["effect"] == 0.3
    stopped = {t["trial"]: t for t in out["trials"] if t["stopped"]}
    assert set(stopped) == {2, 3}
    audit = sql(fleet, f"SELECT target FROM audit WHERE mission_id = '{sweep_id}' AND action = 'stop'")
    assert sorted(r["target"] for r in audit) == [f"{sweep_id}/t2", f"{sweep_id}/t3"]
