"""The score table and its pairing rules (STATS_SPEC §1).

Rows are (example_id, arm, seed, metric, value). A comparison pairs variant and baseline on the
(example_id, seed) they share; everything else is dropped and counted. Seeds are replicates, never
family members: per example, average over the seeds both arms have, then d_i = variant_i − baseline_i.
Examples are sorted by id, so a result never depends on the order rows arrived in.

Corpus metrics (chrF, BLEU, micro-F1; `stats.corpus`) are not means of per-example scores, so the
table holds their per-example sufficient statistics instead: a corpus metric M with k statistics per
example is stored as k metrics named `M#0` … `M#{k-1}`, one row each per (example_id, arm, seed),
in the column order of the `stats.corpus` function that scores them (sacrebleu's segment statistics
for chrF and BLEU, [TP, FP, FN] for micro-F1, [numerator, denominator] for a ratio of sums). Seeds
are averaged per example and column like any metric; an (example_id, seed) lacking a column in
either arm is dropped and counted. `pair_stats` and `arm_stats` return the n×k arrays; the corpus
score is f(Σ rows), and the bootstrap resamples rows (examples), never refitting anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stats.bootstrap import NoData

COLUMNS = ("example_id", "arm", "seed", "metric", "value")
_KEY = ["example_id", "arm", "seed", "metric"]


@dataclass(frozen=True)
class Paired:
    """One metric, variant against baseline, per example (seed-averaged) and per seed."""

    metric: str
    baseline: str
    variant: str
    example_ids: np.ndarray
    baseline_scores: np.ndarray  # seed-averaged, one per example
    variant_scores: np.ndarray
    seeds: tuple[int, ...]  # the rows of seed_deltas
    seed_deltas: np.ndarray  # seeds × examples, for the examples scored under every seed in both arms
    n_unpaired: int  # rows whose (example_id, seed) the other arm lacks
    n_nan: int  # rows dropped because their value is NaN

    @property
    def deltas(self) -> np.ndarray:
        return self.variant_scores - self.baseline_scores


def check_scores(df: pd.DataFrame, source: str = "the score table") -> pd.DataFrame:
    """The table with exactly the columns we need, or a ValueError naming what is wrong."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source} lacks column(s) {missing}; expected {list(COLUMNS)}")
    df = df.loc[:, list(COLUMNS)]
    try:
        df = df.assign(value=pd.to_numeric(df["value"]).astype(np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: column 'value' must be numeric ({exc})") from None
    dup = df.duplicated(_KEY)
    if dup.any():
        first = df.loc[dup, _KEY].iloc[0].to_dict()
        raise ValueError(f"{source} has {int(dup.sum())} duplicate score row(s), e.g. {first}")
    return df


def read_scores(path: str | Path) -> pd.DataFrame:
    """A Parquet score table, checked."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no score table at {path}")
    return check_scores(pd.read_parquet(path), str(path))


def _arm_rows(df: pd.DataFrame, metric: str, arm: str) -> pd.DataFrame:
    rows = df[(df["metric"] == metric) & (df["arm"] == arm)]
    if rows.empty:
        raise NoData(f"NODATA: arm {arm!r} has no {metric!r} scores")
    return rows


def arm_scores(df: pd.DataFrame, metric: str, arm: str) -> tuple[np.ndarray, int]:
    """One arm's seed-averaged score per example (sorted by id), and the count of NaN rows dropped."""
    rows = _arm_rows(df, metric, arm)
    n_nan = int(rows["value"].isna().sum())
    per_example = rows.dropna(subset=["value"]).groupby("example_id")["value"].mean()
    return per_example.to_numpy(), n_nan


def _complete_grid(grid: pd.DataFrame) -> pd.DataFrame:
    """The examples × seeds deltas without holes, for the multi-bootstrap.

    A seed that crashed halfway leaves a column of holes, a lost example a row; drop whichever
    keeps more cells (ties keep the seeds).
    """
    by_example, by_seed = grid.dropna(), grid.dropna(axis=1)
    return by_seed if by_seed.size > by_example.size else by_example


def pair(df: pd.DataFrame, metric: str, baseline: str, variant: str) -> Paired:
    """Pair two arms on one metric: shared (example_id, seed) only, seeds averaged per example."""
    if baseline == variant:
        raise ValueError(f"baseline and variant are the same arm {baseline!r}")
    rows = pd.concat([_arm_rows(df, metric, baseline), _arm_rows(df, metric, variant)])
    n_nan = int(rows["value"].isna().sum())
    rows = rows.dropna(subset=["value"])
    wide = rows.pivot(index=["example_id", "seed"], columns="arm", values="value")
    both = wide.dropna()
    if both.empty:
        raise NoData(f"NODATA: arms {variant!r} and {baseline!r} share no (example_id, seed) on {metric!r}")
    per_example = both.groupby(level="example_id").mean()
    grid = _complete_grid((both[variant] - both[baseline]).unstack("seed"))
    return Paired(
        metric,
        baseline,
        variant,
        example_ids=per_example.index.to_numpy(),
        baseline_scores=per_example[baseline].to_numpy(),
        variant_scores=per_example[variant].to_numpy(),
        seeds=tuple(int(s) for s in grid.columns),
        seed_deltas=grid.to_numpy().T,
        n_unpaired=len(rows) - 2 * len(both),
        n_nan=n_nan,
    )


# -- corpus metrics: per-example sufficient statistics M#0 … M#{k-1} ------------------------------


@dataclass(frozen=True)
class PairedStats:
    """A corpus metric's per-example statistics, variant against baseline (seed-averaged, n×k each)."""

    metric: str
    baseline: str
    variant: str
    columns: tuple[str, ...]  # M#0 … M#{k-1}
    example_ids: np.ndarray
    baseline_stats: np.ndarray
    variant_stats: np.ndarray
    seeds: tuple[int, ...]  # the seeds any kept (example_id, seed) came from
    n_unpaired: int  # rows dropped: their (example_id, seed) lacks a column or the other arm
    n_nan: int  # rows dropped because their value is NaN


def stat_columns(df: pd.DataFrame, metric: str) -> tuple[str, ...]:
    """The metric names `metric#0` … `metric#{k-1}` in the table, in order; NoData when there are none,
    a ValueError when the numbering has gaps (a column lost would silently change the metric)."""
    pattern = re.compile(rf"{re.escape(metric)}#(\d+)")
    found = sorted(int(m.group(1)) for name in df["metric"].unique() if (m := pattern.fullmatch(str(name))))
    if not found:
        raise NoData(f"NODATA: no {metric + '#0'!r}… rows: corpus metric {metric!r} has no statistics")
    if found != list(range(len(found))):
        raise ValueError(
            f"corpus metric {metric!r}: statistics must be {metric}#0 … #{len(found) - 1}, got {found}"
        )
    return tuple(f"{metric}#{i}" for i in found)


def _stat_grid(
    df: pd.DataFrame, metric: str, columns: tuple[str, ...], arms: list[str]
) -> tuple[pd.DataFrame, int, int]:
    """(example_id, seed) × (arm, column) for the rows complete in every arm, with the NaN and
    incomplete row counts."""
    rows = df[df["metric"].isin(columns) & df["arm"].isin(arms)]
    for arm in arms:
        if not (rows["arm"] == arm).any():
            raise NoData(f"NODATA: arm {arm!r} has no {metric + '#…'!r} statistics")
    n_nan = int(rows["value"].isna().sum())
    rows = rows.dropna(subset=["value"])
    wide = rows.pivot(index=["example_id", "seed"], columns=["arm", "metric"], values="value")
    complete = wide.reindex(columns=pd.MultiIndex.from_product([arms, columns])).dropna()
    return complete, n_nan, len(rows) - complete.size


def pair_stats(df: pd.DataFrame, metric: str, baseline: str, variant: str) -> PairedStats:
    """Pair two arms on a corpus metric's statistics: shared complete (example_id, seed), seeds averaged."""
    if baseline == variant:
        raise ValueError(f"baseline and variant are the same arm {baseline!r}")
    columns = stat_columns(df, metric)
    grid, n_nan, n_incomplete = _stat_grid(df, metric, columns, [variant, baseline])
    if grid.empty:
        raise NoData(
            f"NODATA: arms {variant!r} and {baseline!r} share no complete (example_id, seed) on {metric!r}"
        )
    per_example = grid.groupby(level="example_id").mean()
    return PairedStats(
        metric,
        baseline,
        variant,
        columns,
        example_ids=per_example.index.to_numpy(),
        baseline_stats=per_example[baseline].to_numpy(),
        variant_stats=per_example[variant].to_numpy(),
        seeds=tuple(int(s) for s in sorted(grid.index.get_level_values("seed").unique())),
        n_unpaired=n_incomplete,
        n_nan=n_nan,
    )


def arm_stats(df: pd.DataFrame, metric: str, arm: str) -> tuple[np.ndarray, int]:
    """One arm's seed-averaged n×k statistics of a corpus metric (examples sorted by id), and the count
    of rows dropped (NaN, or their (example_id, seed) lacks a column)."""
    columns = stat_columns(df, metric)
    grid, n_nan, n_incomplete = _stat_grid(df, metric, columns, [arm])
    per_example = grid.groupby(level="example_id").mean()
    return per_example[arm].to_numpy().reshape(len(per_example), len(columns)), n_nan + n_incomplete
