"""`fleetctl compare` on two selftest missions through a real fleet, the second run with a changed
effect: the changed arm moves by the change, the other not at all, and the inputs that differ are
named (the override and the frozen spec's value); an unknown mission is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from fleet.client import FleetError
from schemas import messages as m
from tests.fleet.conftest import REPO, Fleet, call, submit, wait_mission

pytestmark = pytest.mark.slow


def test_compare_traces_a_changed_effect_to_its_override(fleet: Fleet) -> None:
    fleet.start_with_workers("w0", "w1")
    first = submit(fleet, "selftest", "quick")
    second = submit(fleet, "selftest", "quick", **{"stages.score.params.effect": 0.3})
    for mission in (first, second):
        assert wait_mission(fleet, mission, timeout=120)["missions"][0]["state"] == "succeeded"
    done = subprocess.run(
        [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(fleet.home), "--nats", fleet.url,
         "compare", first, second, "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["a"]["mission_id"] == first and out["b"]["mission_id"] == second
    found = {(c["arm"], c["metric"]): c for c in out["scores"]}
    assert set(found) == {("a", "score"), ("b", "score")}
    moved, still = found[("b", "score")], found[("a", "score")]
    assert moved["paired_by"] == "example and seed" and moved["n_pairs"] == 400  # 200 examples x 2 seeds
    # b = difficulty + effect + noise(seed, arm), clipped to [0, 1]: +0.2, a little less where clipped.
    assert 0.15 < moved["low"] < moved["estimate"] < moved["high"] <= 0.2 + 1e-9
    assert still["estimate"] == 0.0  # arm a does not see the effect: the same scores in both runs
    diffs = {(r["what"], r["key"]): (r["a"], r["b"]) for r in out["inputs"]}
    assert diffs[("overrides", "stages.score.params.effect")] == (None, 0.3)
    assert diffs[("spec", "stages.score.params.effect")] == (0.1, 0.3)
    assert not [k for k in diffs if k[0] in ("code", "environment")]  # one checkout ran both

    table = subprocess.run(
        [sys.executable, "-m", "fleetcli.fleetctl", "--home", str(fleet.home), "--nats", fleet.url,
         "compare", first, second],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert table.returncode == 0 and "stages.score.params.effect" in table.stdout, table.stderr
    # The page's API gives the same answer, behind the token like every read; the page is served.
    web, token = fleet.web_url(), {"Authorization": f"Bearer {fleet.web_token()}"}
    url = f"{web}/api/compare?a={first}&b={second}"
    with urllib.request.urlopen(urllib.request.Request(url, headers=token), timeout=30) as r:
        assert json.loads(r.read()) == out
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(url, timeout=30)
    with urllib.request.urlopen(f"{web}/compare?a={first}&b={second}", timeout=30) as r:
        assert "/api/compare" in r.read().decode()
    with pytest.raises(FleetError) as refused:
        call(fleet, "compare", m.CompareRequest(a=first, b="selftest-19990101-000000-0000"))
    assert refused.value.code == "not_found" and "no mission" in str(refused.value)


def test_a_different_commit_or_package_is_named() -> None:
    from fleetd.compare import environments, input_diff

    def result(commit: str, torch: str, dirty: bool = False) -> dict[str, object]:
        return {"environment": {"git_commit": commit, "git_dirty": dirty, "packages": {"torch": torch}}}

    a = environments([result("aaa", "2.13.0"), None])
    b = environments([result("bbb", "2.13.0", dirty=True), result("aaa", "2.14.0")])
    rows = {(r["what"], r["key"]): (r["a"], r["b"]) for r in input_diff({}, {}, a, b)}
    assert rows == {
        ("code", "code"): ("aaa", "aaa, bbb (dirty)"),
        ("environment", "packages.torch"): ("2.13.0", "2.13.0, 2.14.0"),
    }
    spec = {"stages": [{"name": "s", "params": {"k": 1}}], "seeds": [1, 2]}
    other = {"stages": [{"name": "s", "params": {"k": 2}}], "seeds": [1, 2]}
    assert input_diff({"spec": json.dumps(spec)}, {"spec": other}, {}, {}) == [
        {"what": "spec", "key": "stages.s.params.k", "a": 1, "b": 2}
    ]
