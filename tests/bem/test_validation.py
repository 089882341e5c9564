"""The validation experiment end to end on the ~90k-parameter test base, at a micro profile.

These tests check the experiment's plumbing and the properties its arms must have; whether BEM
beats the baselines is the job of `make run` on the demo base, not of a unit test.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, get_peft_model

from bem import __main__ as cli
from bem.core.attach import role_sites
from bem.core.reporter import Cancelled, MemoryReporter, ScoreRow, write_scores
from bem.missions.validation import recipe as val

REPO = Path(__file__).resolve().parents[2]

MICRO = val.Profile(
    sizes={"train": 16, "val": 2, "test": 5},
    lora_steps=3,
    controller_steps=2,
    batch_size=8,
    lora_lr=1e-2,
    controller_lr=1e-3,
    eval_batch=32,
)


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    reporter = MemoryReporter()
    summary = val.run_validation(base_dir, profile=MICRO, seed=7, out_dir=out, reporter=reporter)
    return summary, reporter, out


def test_writes_summary_and_scores(run) -> None:
    summary, reporter, out = run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["routing_accuracy"] == summary["routing_accuracy"]
    assert 0.0 <= summary["routing_accuracy"] <= 1.0
    assert set(summary["arms"]) == set(val.ARMS)
    assert all(0.0 <= arm["score"] <= 1.0 for arm in summary["arms"].values())

    table = pq.read_table(out / "scores.parquet").to_pylist()
    assert set(table[0]) == {"example_id", "arm", "seed", "metric", "value"}
    assert len(table) == len(reporter.rows)
    ids = {arm: {r["example_id"] for r in table if r["arm"] == arm} for arm in val.ARMS}
    assert all(s == ids["bem"] for s in ids.values()) and len(ids["bem"]) == 2 * MICRO.sizes["test"]
    kinds = {kind for _, kind in reporter.artifacts}
    assert {"scores", "summary", "peft_lora", "bem_checkpoint"} <= kinds


def test_arm_scores_agree_where_arms_share_a_code(run) -> None:
    """oracle is fixed_json on JSON examples and fixed_sum on summaries; random is always one of them."""
    _, reporter, _ = run
    score = {(r.arm, r.example_id): r.value for r in reporter.rows if r.metric == "score"}
    for (arm, eid), value in score.items():
        if arm == "oracle":
            assert value == score[("fixed_json" if eid.startswith("json") else "fixed_sum", eid)]
        if arm == "random":
            assert value in (score[("fixed_json", eid)], score[("fixed_sum", eid)])
    mean = {arm: np.mean([v for (a, _), v in score.items() if a == arm]) for arm in val.ARMS}
    summary, _, _ = run
    assert all(abs(summary["arms"][arm]["score"] - mean[arm]) < 1e-9 for arm in val.ARMS)


def test_composed_block_reproduces_the_trained_peft_lora(base_dir) -> None:
    """A BEM block with code 1 is the LoRA it was loaded from: same logits as peft's own model."""
    from bem.core.models import load_model

    model, _ = load_model(base_dir)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    loras = {}
    for name, rank in (("json", 8), ("summary", 8), ("multitask", 16)):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[n for n, _ in role_sites(model)])
        peft_model = get_peft_model(load_model(base_dir)[0], config).eval()
        for module in peft_model.modules():
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.3)
        with torch.no_grad():
            expected = peft_model(ids).logits
        loras[name] = (val.lora_factors(peft_model), expected)
    att = val.compose(model, {name: factors for name, (factors, _) in loras.items()})
    model.eval()
    for i, (_, expected) in enumerate(loras.values()):
        weights = torch.nn.functional.one_hot(torch.tensor([i, i]), 3).float()
        with torch.no_grad(), att.codes(val.block_code(weights)):
            assert (model(ids).logits - expected).abs().max() < 1e-5


def test_block_code_layout() -> None:
    code = val.block_code(torch.tensor([[0.25, 0.75, 2.0]]))
    assert code.shape == (1, 32)
    assert torch.equal(code[0, :8], torch.full((8,), 0.25))
    assert torch.equal(code[0, 8:16], torch.full((8,), 0.75))
    assert torch.equal(code[0, 16:], torch.full((16,), 2.0))


def test_cancelled_reporter_stops_the_run(base_dir, tmp_path) -> None:
    reporter = MemoryReporter()
    reporter.cancel()
    with pytest.raises(Cancelled):
        val.run_validation(base_dir, profile=MICRO, seed=1, out_dir=tmp_path, reporter=reporter)
    assert not (tmp_path / "summary.json").exists()


def test_the_stats_engine_averages_seeds_before_pairing() -> None:
    """bem − equal is judged on the frame the recipe builds from its rows, as `stats.table.pair` pairs it."""
    from stats.table import pair

    rows = [
        ScoreRow("a", "bem", 1, "score", 1.0),
        ScoreRow("a", "bem", 2, "score", 0.0),
        ScoreRow("a", "bem", 3, "score", 1.0),  # seed 3 has no baseline: dropped
        ScoreRow("a", "equal", 1, "score", 0.25),
        ScoreRow("a", "equal", 2, "score", 0.25),
        ScoreRow("b", "bem", 1, "score", 0.5),
        ScoreRow("b", "equal", 1, "score", 1.0),
        ScoreRow("c", "bem", 1, "score", 0.5),  # no baseline at all: unpaired
        ScoreRow("b", "bem", 1, "em", 9.0),  # another metric: ignored
    ]
    paired = pair(val.score_frame(rows), "score", "equal", "bem")
    np.testing.assert_allclose(paired.deltas, [0.5 - 0.25, 0.5 - 1.0])
    assert list(paired.example_ids) == ["a", "b"] and paired.n_unpaired == 2


def synthetic_rows(effect: float, seed: int) -> list[ScoreRow]:
    """bem and equal on 120 examples x 3 seeds; bem is `effect` better on average."""
    rng = np.random.default_rng(seed)
    rows = []
    for ex in range(120):
        level = rng.random()
        for s in (1, 2, 3):
            rows.append(ScoreRow(f"ex{ex}", "equal", s, "score", float(rng.random() < level)))
            rows.append(
                ScoreRow(f"ex{ex}", "bem", s, "score", float(rng.random() < min(1.0, level + effect)))
            )
    return rows


def stats_compare_json(path) -> dict:
    """What `python -m stats compare PATH --baseline equal --variant bem --metric score` decides."""
    args = ["compare", str(path), "--baseline", "equal", "--variant", "bem", "--metric", "score", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "stats", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    (decision,) = json.loads(out.stdout)["decisions"]
    return decision


def assert_same_decision(ours: dict, theirs: dict) -> None:
    """Our bem − equal fields are the stats command's decision, number for number."""
    assert ours["n"] == theirs["n"] and ours["outcome"] == theirs["outcome"]
    for key, their_key in (
        ("estimate", "estimate"),
        ("low", "low"),
        ("high", "high"),
        ("p_adj", "p_adjusted"),
    ):
        assert ours[key] == theirs[their_key], (key, ours[key], theirs[their_key])
    assert ours["method"].endswith(theirs["interval"])


@pytest.mark.parametrize("effect", [0.3, 0.0])
def test_bem_minus_equal_is_what_stats_compare_prints(tmp_path, effect) -> None:
    """A clear effect is selected (FCR-adjusted one-sided bound, no upper end), no effect is not (BCa
    two-sided); either way the recipe reports exactly the command's interval, not a bootstrap of its own."""
    rows = synthetic_rows(effect, seed=11)
    write_scores(rows, tmp_path / "scores.parquet")
    ours = val.bem_minus_equal(rows)
    assert_same_decision(ours, stats_compare_json(tmp_path / "scores.parquet"))
    if effect:
        assert ours["outcome"] == "pass" and ours["high"] is None and "one-sided" in ours["method"]
    else:
        assert ours["outcome"] != "pass" and ours["low"] <= ours["estimate"] <= ours["high"]
        assert "BCa 95% two-sided" in ours["method"]


def test_cli_runs_seeds_and_aggregates(base_dir, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(val.PROFILES, "smoke", MICRO)
    assert cli.main(["validate", "--seed", "1", "2", "--base", str(base_dir), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    per_seed = [json.loads((tmp_path / f"seed-{s}" / "summary.json").read_text()) for s in (1, 2)]
    assert summary["seeds"] == [1, 2]
    assert summary["routing_accuracy"] == pytest.approx(np.mean([s["routing_accuracy"] for s in per_seed]))
    rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert {r["seed"] for r in rows} == {1, 2}
    d = summary["bem_minus_equal"]
    assert d["low"] <= d["estimate"] and (d["high"] is None or d["estimate"] <= d["high"])
    assert_same_decision(d, stats_compare_json(tmp_path / "scores.parquet"))
    printed = capsys.readouterr().out
    assert "routing accuracy" in printed and "bem - equal" in printed
    assert f"{d['estimate']:+.3f}  [{d['low']:+.3f}, " in printed and f"p_adj {d['p_adj']:.3g}" in printed
    assert d["method"] in printed


def test_stats_reads_the_scores_as_the_recipe_frames_them(run) -> None:
    """The fleet judges the validation run with `stats`: the Parquet table is the frame the recipe
    judged, and the per-seed summary holds the engine's decision on it."""
    from stats.gates import compare
    from stats.table import pair, read_scores

    summary, reporter, out = run
    on_disk = read_scores(out / "scores.parquet")
    paired = pair(on_disk, "score", "equal", "bem")
    framed = pair(val.score_frame(reporter.rows), "score", "equal", "bem")
    np.testing.assert_array_equal(paired.example_ids, framed.example_ids)
    np.testing.assert_array_equal(paired.deltas, framed.deltas)
    assert paired.n_unpaired == 0 and paired.n_nan == 0
    (decision,) = compare(on_disk, "equal", "bem", ["score"]).decisions
    d = summary["bem_minus_equal"]
    assert (d["estimate"], d["low"], d["high"], d["p_adj"], d["n"]) == (
        decision.estimate, decision.low, decision.high, decision.p_adjusted, decision.n
    )  # fmt: skip
