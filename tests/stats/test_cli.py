"""`python -m stats compare` as a user runs it: a real Parquet file, a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stats.gates import Claim, GateSpec, evaluate
from stats.gates import compare as compare_arms

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stats", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def compare(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("compare", str(path), "--baseline", "base", "--variant", "bem", "--resamples", "2000", *extra)


def write_scores(path: Path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for ex in range(150):
        p = rng.random()
        for seed in (1, 2, 3):
            b, v = float(rng.random() < p), float(rng.random() < min(1.0, p + 0.2))
            rows += [(f"ex{ex}", "base", seed, "em", b), (f"ex{ex}", "bem", seed, "em", v)]
            rows += [
                (f"ex{ex}", "base", seed, "f1", rng.random()),
                (f"ex{ex}", "bem", seed, "f1", rng.random()),
            ]
    df = pd.DataFrame(rows, columns=["example_id", "arm", "seed", "metric", "value"])
    df.to_parquet(path)
    return df


def test_json_output_is_the_gate_evaluation(tmp_path) -> None:
    df = write_scores(tmp_path / "scores.parquet")
    out = compare(tmp_path / "scores.parquet", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    spec = GateSpec(
        claims=(
            Claim(name="em", metric="em", variant="bem", baseline="base"),
            Claim(name="f1", metric="f1", variant="bem", baseline="base"),
        ),
        n_resamples=2000,
    )
    want = evaluate(spec, df)
    assert got["verdict"] == want.verdict == "reject"  # em improves, f1 is noise: rule "all" fails
    by_gate = {d["gate"]: d for d in got["decisions"]}
    for d in want.decisions:
        assert by_gate[d.gate]["outcome"] == d.outcome
        assert by_gate[d.gate]["p_adjusted"] == d.p_adjusted
        assert by_gate[d.gate]["low"] == d.low and by_gate[d.gate]["interval"] == d.interval
    assert by_gate["em"]["outcome"] == "pass" and by_gate["em"]["high"] is None  # +inf written as null


def test_the_command_is_gates_compare(tmp_path) -> None:
    """`stats.gates.compare` (which `python -m bem validate` calls too) builds the spec written out by hand
    above, and the command prints its decisions: one path, so the same table gets the same interval."""
    df = write_scores(tmp_path / "scores.parquet")
    shared = compare_arms(df, "base", "bem", n_resamples=2000)
    spec = GateSpec(
        claims=(
            Claim(name="em", metric="em", variant="bem", baseline="base"),
            Claim(name="f1", metric="f1", variant="bem", baseline="base"),
        ),
        n_resamples=2000,
    )
    assert shared == evaluate(spec, df)  # default metrics: every one both arms have, sorted
    out = compare(tmp_path / "scores.parquet", "--metric", "f1", "--json", "--seed", "5")
    assert out.returncode == 0, out.stderr
    (got,) = json.loads(out.stdout)["decisions"]
    (want,) = compare_arms(df, "base", "bem", ["f1"], n_resamples=2000, seed=5).decisions
    assert (got["estimate"], got["low"], got["high"], got["p_adjusted"], got["interval"]) == (
        want.estimate, want.low, want.high, want.p_adjusted, want.interval
    )  # fmt: skip
    with pytest.raises(ValueError, match="arm 'ghost' is not in the score table"):
        compare_arms(df, "base", "ghost")


def test_table_output_and_metric_selection(tmp_path) -> None:
    write_scores(tmp_path / "scores.parquet")
    out = compare(tmp_path / "scores.parquet", "--metric", "em")
    assert out.returncode == 0, out.stderr
    assert "em" in out.stdout and "f1" not in out.stdout.split("verdict")[0]
    assert "verdict: promote" in out.stdout


def test_bad_input_exits_2_with_the_reason(tmp_path) -> None:
    write_scores(tmp_path / "scores.parquet")
    missing = run("compare", str(tmp_path / "nope.parquet"), "--baseline", "a", "--variant", "b")
    assert missing.returncode == 2 and "no score table" in missing.stderr
    arm = run("compare", str(tmp_path / "scores.parquet"), "--baseline", "base", "--variant", "ghost")
    assert arm.returncode == 2 and "arm 'ghost' is not in" in arm.stderr and "['base', 'bem']" in arm.stderr
    pd.DataFrame({"example_id": [1], "arm": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    cols = run("compare", str(tmp_path / "bad.parquet"), "--baseline", "a", "--variant", "b")
    assert cols.returncode == 2 and "lacks column(s)" in cols.stderr
