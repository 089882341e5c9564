"""stats.compare: B − A per shared arm and metric, paired by example (and seed), against an
independent pandas merge and scipy's BCa; and the pairing refused, with the reason, where it fails."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from stats.compare import compare_runs


def run(effect: float, seeds: list[int], examples: range, arms: tuple[str, ...] = ("a", "b")) -> pd.DataFrame:
    difficulty = np.random.default_rng(0).uniform(0.2, 0.8, 1000)
    rows = []
    for arm in arms:
        for seed in seeds:
            noise = np.random.default_rng([seed, len(arm), int(effect * 100)]).normal(0, 0.05, 1000)
            for i in examples:
                value = difficulty[i] + (effect if arm == "b" else 0.0) + noise[i]
                rows.append((f"ex{i:04d}", arm, seed, "score", value))
    return pd.DataFrame(rows, columns=["example_id", "arm", "seed", "metric", "value"])


def test_a_changed_effect_shows_on_its_arm_and_not_on_the_other() -> None:
    a, b = run(0.1, [1, 2], range(200)), run(0.3, [1, 2], range(200))
    found = {c.arm: c for c in compare_runs(a, b, n_resamples=4000)}
    assert set(found) == {"a", "b"}
    for arm, c in found.items():
        merged = a[a.arm == arm].merge(b[b.arm == arm], on=["example_id", "seed"], suffixes=("_a", "_b"))
        diffs = (merged.value_b - merged.value_a).to_numpy()
        assert c.paired_by == "example and seed" and c.n_pairs == len(diffs) == 400
        assert c.estimate == pytest.approx(diffs.mean(), abs=1e-12)
        ref = scipy.stats.bootstrap((diffs,), np.mean, method="BCa", n_resamples=4000, random_state=1)
        assert c.low == pytest.approx(ref.confidence_interval.low, abs=0.004)
        assert c.high == pytest.approx(ref.confidence_interval.high, abs=0.004)
    assert found["b"].low > 0.15  # the effect moved by 0.2 on b
    assert found["a"].low < 0 < found["a"].high or abs(found["a"].estimate) < 0.02  # a did not move


def test_other_seeds_pair_by_example_and_other_examples_do_not_pair() -> None:
    a = run(0.1, [1, 2], range(200))
    other_seeds = compare_runs(a, run(0.1, [3], range(200)), n_resamples=2000, metric="score")
    assert {c.paired_by for c in other_seeds} == {"example (mean over seeds)"}
    assert all(c.n_pairs == 200 for c in other_seeds)
    apart = compare_runs(a, run(0.1, [1, 2], range(500, 700)), n_resamples=2000)
    assert all(c.paired_by == "" and np.isnan(c.low) for c in apart)
    assert "pairing does not hold: 0 keys in both runs" in apart[0].note
    only_a = compare_runs(a, run(0.1, [1, 2], range(200), arms=("c",)))
    assert only_a == []  # no arm in common: nothing to compare
    with pytest.raises(ValueError, match="lack columns"):
        compare_runs(a.drop(columns="seed"), a)
