"""Pairing rules of the score table (STATS_SPEC §1)."""

import numpy as np
import pandas as pd
import pytest

from stats.bootstrap import NoData
from stats.table import arm_stats, check_scores, pair, pair_stats, read_scores, stat_columns


def _table(rows):
    return check_scores(pd.DataFrame(rows, columns=["example_id", "arm", "seed", "metric", "value"]))


def test_seeds_are_averaged_over_the_seeds_both_arms_have() -> None:
    df = _table(
        [
            ("a", "base", 1, "em", 0.0),
            ("a", "bem", 1, "em", 1.0),
            ("a", "base", 2, "em", 1.0),
            ("a", "bem", 2, "em", 1.0),
            ("a", "bem", 3, "em", 0.0),  # seed 3 has no baseline partner: dropped and counted
            ("b", "base", 1, "em", 0.5),
            ("b", "bem", 1, "em", 0.5),
            ("c", "base", 1, "em", 1.0),  # example c has no variant at all
            ("d", "base", 1, "em", 0.0),
            ("d", "bem", 1, "em", 0.0),
        ]
    )
    p = pair(df, "em", "base", "bem")
    assert list(p.example_ids) == ["a", "b", "d"]
    assert np.allclose(p.baseline_scores, [0.5, 0.5, 0]) and np.allclose(p.variant_scores, [1.0, 0.5, 0])
    assert p.n_unpaired == 2 and p.n_nan == 0
    # Seed 2 covers only example a: dropping it keeps 3 cells of the grid, dropping b and d keeps 2.
    assert p.seeds == (1,) and p.seed_deltas.shape == (1, 3)
    q = pair(df[df.example_id != "d"], "em", "base", "bem")  # now a tie: keep the seeds
    assert q.seeds == (1, 2) and list(q.seed_deltas[:, 0]) == [1.0, 0.0]


def test_nan_rows_are_dropped_and_counted_and_missing_arms_are_nodata() -> None:
    df = _table(
        [
            ("a", "base", 1, "em", np.nan),
            ("a", "bem", 1, "em", 1.0),
            ("b", "base", 1, "em", 0.0),
            ("b", "bem", 1, "em", 1.0),
        ]
    )
    p = pair(df, "em", "base", "bem")
    assert p.n_nan == 1 and p.n_unpaired == 1 and list(p.example_ids) == ["b"]
    with pytest.raises(NoData, match="arm 'ghost' has no 'em'"):
        pair(df, "em", "base", "ghost")
    with pytest.raises(NoData, match="share no"):
        pair(_table([("a", "base", 1, "em", 1.0), ("b", "bem", 1, "em", 1.0)]), "em", "base", "bem")


def test_row_order_does_not_matter() -> None:
    rng = np.random.default_rng(0)
    rows = [
        (int(e), arm, s, "f1", float(rng.random())) for e in range(30) for arm in ("x", "y") for s in (1, 2)
    ]
    df = _table(rows)
    shuffled = df.sample(frac=1, random_state=3)
    a, b = pair(df, "f1", "x", "y"), pair(shuffled, "f1", "x", "y")
    assert np.array_equal(a.deltas, b.deltas) and np.array_equal(a.seed_deltas, b.seed_deltas)


def test_bad_tables_are_refused_naming_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['seed'\]"):
        check_scores(pd.DataFrame({"example_id": [1], "arm": ["a"], "metric": ["em"], "value": [1.0]}))
    with pytest.raises(ValueError, match="duplicate score row"):
        _table([("a", "base", 1, "em", 1.0), ("a", "base", 1, "em", 0.0)])
    with pytest.raises(ValueError, match="'value' must be numeric"):
        _table([("a", "base", 1, "em", "high")])
    with pytest.raises(ValueError, match="same arm"):
        pair(_table([("a", "base", 1, "em", 1.0)]), "em", "base", "base")
    with pytest.raises(FileNotFoundError, match="no score table"):
        read_scores(tmp_path / "missing.parquet")


def _stats_rows(example, arm, seed, values, metric="f1"):
    return [(example, arm, seed, f"{metric}#{j}", float(v)) for j, v in enumerate(values)]


def test_corpus_statistics_pair_on_complete_example_seeds_and_average_per_column() -> None:
    """M#0 … M#{k-1} per (example, arm, seed); an (example, seed) lacking a column in either arm is
    dropped and counted; seeds are averaged per example and column; examples sorted by id."""
    df = _table(
        _stats_rows("b", "base", 1, [1, 2, 3])
        + _stats_rows("b", "bem", 1, [3, 0, 1])
        + _stats_rows("b", "base", 2, [3, 2, 1])
        + _stats_rows("b", "bem", 2, [5, 0, 1])
        + _stats_rows("a", "base", 1, [0, 1, 1])
        + _stats_rows("a", "bem", 1, [1, 0, 0])
        + _stats_rows("a", "base", 2, [9, 9, 9])  # seed 2 of "a": the variant lacks column 2
        + _stats_rows("a", "bem", 2, [9, 9])
        + [("a", "bem", 3, "f1#0", float("nan"))]
        + [("a", "base", 1, "em", 1.0)]  # another metric: ignored
    )
    assert stat_columns(df, "f1") == ("f1#0", "f1#1", "f1#2")
    p = pair_stats(df, "f1", "base", "bem")
    assert p.example_ids.tolist() == ["a", "b"]
    assert p.baseline_stats.tolist() == [[0, 1, 1], [2, 2, 2]]
    assert p.variant_stats.tolist() == [[1, 0, 0], [4, 0, 1]]
    assert (p.n_unpaired, p.n_nan, p.seeds) == (5, 1, (1, 2))
    stats, dropped = arm_stats(df, "f1", "bem")
    assert stats.tolist() == [[1, 0, 0], [4, 0, 1]] and dropped == 3  # a/2 incomplete (2 rows), a/3 NaN


def test_corpus_statistics_numbering_must_be_complete() -> None:
    df = _table([*_stats_rows("a", "base", 1, [1, 2, 3]), ("a", "base", 1, "f1#4", 1.0)])
    with pytest.raises(ValueError, match=r"f1#0 … #3, got \[0, 1, 2, 4\]"):
        stat_columns(df, "f1")
    with pytest.raises(NoData, match="corpus metric 'bleu' has no statistics"):
        pair_stats(df, "bleu", "base", "bem")
    with pytest.raises(NoData, match="arm 'bem' has no"):
        pair_stats(_table(_stats_rows("a", "base", 1, [1, 2, 3])), "f1", "base", "bem")
