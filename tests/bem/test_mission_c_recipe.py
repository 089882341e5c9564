"""Mission C's recipe end to end at the tiny profile, on the test base: every arm scored on the same
examples, the overlay orthogonal to the skill, and κ = 0 serving exactly the unprotected model."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from bem.core.reporter import MemoryReporter
from bem.missions.mission_c import data
from bem.missions.mission_c.recipe import ARMS, PROFILES, make_data, run_mission_c


def test_a_tiny_run_scores_every_arm_on_the_same_examples(base_dir: Path, tmp_path: Path) -> None:
    reporter = MemoryReporter()
    summary = run_mission_c(base_dir, profile="tiny", seed=1, out_dir=tmp_path, reporter=reporter)
    rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert len(rows) == len(reporter.rows) > 0  # the same rows stored and reported
    d = make_data(PROFILES["tiny"])
    by_arm: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], set()).add((r["example_id"], r["metric"]))
    assert set(by_arm) == set(ARMS)
    # Each arm has the same (example, metric) pairs, so the stats engine can pair every claim.
    assert len({frozenset(v) for v in by_arm.values()}) == 1
    metrics_of = {c.example_id: c.kind for c in [*d.red_team, *d.utility_test, *d.benign_test]}
    for example_id, metric in by_arm["no_safety"]:
        kind = metrics_of[example_id]
        allowed = (
            {"violation"}
            if kind in data.FAMILIES
            else {"em", "f1"}
            if kind == "utility"
            else {"over_refusal", "em"}
        )
        assert metric in allowed | {"latency_ms"}, (kind, metric)
    assert summary["values"]["min_op"] >= 0.95
    # The unconstrained ablation may leave S's complement; the served arm never does.
    assert min(v for k, v in summary["orthogonality"]["bem_safety"].items() if k.endswith("_op")) >= 0.95
    assert set(summary["knob"]) >= {
        "slope",
        "slope_low",
        "slope_high",
        "spearman_violation",
        "anti_steerable",
    }
    assert len(summary["knob"]["violation_rate"]) == 11
    assert summary["layers"] == {"probe": 1, "steer": 0}  # depth .5 of the test base's 2 layers
    # κ = 0: the overlay is off, so the red team's violation rate is the skilled model's own, exactly.
    assert summary["knob"]["violation_rate"][0] == summary["arms"]["no_safety"]["violation"]


def test_depths_name_layers_on_any_model() -> None:
    from bem.core.models import build_tiny_llama, tiny_llama_config
    from bem.missions.mission_c.recipe import depth_layer

    for n, depth, want in [(2, 0.5, 1), (2, 1.0, 2), (32, 0.5, 16), (32, 0.0, 1), (12, 0.6, 7)]:
        model = build_tiny_llama(tiny_llama_config(num_hidden_layers=n), seed=0)
        assert depth_layer(model, depth) == want, (n, depth)
