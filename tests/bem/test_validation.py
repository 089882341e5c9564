"""The validation experiment end to end on the ~90k-parameter test base, at a micro profile.

These tests check the experiment's plumbing and the properties its arms must have; whether BEM
beats the baselines is the job of `make run` on the demo base, not of a unit test.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch
from peft import LoraConfig, get_peft_model

from bem import __main__ as cli
from bem.core.attach import role_sites
from bem.core.reporter import Cancelled, MemoryReporter, ScoreRow
from bem.missions.validation import recipe as val

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


def test_paired_diff_averages_seeds_before_pairing() -> None:
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
    np.testing.assert_allclose(val.paired_diff(rows, "bem", "equal"), [0.5 - 0.25, 0.5 - 1.0])


def test_percentile_interval_agrees_with_scipy() -> None:
    d = np.random.default_rng(3).normal(0.2, 1.0, 300)
    ours = val.percentile_interval(d, n_boot=20_000)
    ref = scipy.stats.bootstrap((d,), np.mean, method="percentile", n_resamples=20_000, random_state=1)
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert abs(ours[0] - ref.confidence_interval.low) < 0.1 * se
    assert abs(ours[1] - ref.confidence_interval.high) < 0.1 * se


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
    assert d["low"] <= d["estimate"] <= d["high"]
    printed = capsys.readouterr().out
    assert "routing accuracy" in printed and "bem - equal" in printed


def test_stats_reads_the_scores_and_pairs_them_like_paired_diff(run) -> None:
    """The fleet judges the validation run with `stats`: same table, same seed-averaged deltas."""
    from stats.table import pair, read_scores

    _, reporter, out = run
    paired = pair(read_scores(out / "scores.parquet"), "score", "equal", "bem")
    np.testing.assert_allclose(
        np.sort(paired.deltas), np.sort(val.paired_diff(reporter.rows, "bem", "equal"))
    )
    assert paired.n_unpaired == 0 and paired.n_nan == 0
