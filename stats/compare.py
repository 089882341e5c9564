"""Two runs of a mission compared on their per-example scores (`fleetctl compare A B`).

For each arm and metric both runs scored, the difference B − A with a paired BCa interval, paired by
(example_id, seed) when both runs used the same seeds, else by example_id on each example's mean over
the seeds. Pairing holds when at least `min_shared` of either run's keys are in both; when it does
not (other examples, another data seed), the comparison says so and gives the two means, no interval:
an unpaired difference of runs that saw different data is not what this tool is for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from stats.bootstrap import paired_bca

COLUMNS = ("example_id", "arm", "seed", "metric", "value")


@dataclass(frozen=True)
class Comparison:
    arm: str
    metric: str
    mean_a: float
    mean_b: float
    n_a: int  # pairing keys in A (examples, or examples x seeds)
    n_b: int
    n_pairs: int
    paired_by: str  # "example and seed", "example (mean over seeds)", or "" when pairing fails
    estimate: float = float("nan")  # mean of B − A over the pairs
    low: float = float("nan")
    high: float = float("nan")
    level: float = 0.95
    note: str = ""  # why there is no interval


def _keyed(frame: pd.DataFrame, by_seed: bool) -> pd.Series:
    if by_seed:
        return frame.groupby(["example_id", "seed"])["value"].mean()
    return frame.groupby("example_id")["value"].mean()


def compare_runs(
    a: pd.DataFrame,
    b: pd.DataFrame,
    *,
    metric: str | None = None,
    level: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    min_shared: float = 0.9,
) -> list[Comparison]:
    """B − A per shared (arm, metric), sorted by arm then metric; `metric` keeps one."""
    for name, frame in (("A", a), ("B", b)):
        missing = set(COLUMNS) - set(frame.columns)
        if missing:
            raise ValueError(f"run {name}'s scores lack columns {sorted(missing)}")
    out = []
    shared = set(map(tuple, a[["arm", "metric"]].drop_duplicates().to_numpy())) & set(
        map(tuple, b[["arm", "metric"]].drop_duplicates().to_numpy())
    )
    for arm, name in sorted(shared):
        if metric is not None and name != metric:
            continue
        fa = a[(a.arm == arm) & (a.metric == name)]
        fb = b[(b.arm == arm) & (b.metric == name)]
        by_seed = set(fa.seed.unique()) == set(fb.seed.unique())
        ka, kb = _keyed(fa, by_seed), _keyed(fb, by_seed)
        common = ka.index.intersection(kb.index)
        base = Comparison(
            arm=arm,
            metric=name,
            mean_a=float(fa.value.mean()),
            mean_b=float(fb.value.mean()),
            n_a=len(ka),
            n_b=len(kb),
            n_pairs=len(common),
            paired_by="example and seed" if by_seed else "example (mean over seeds)",
            level=level,
        )
        if len(common) < min_shared * max(len(ka), len(kb)) or len(common) < 2:
            note = (
                f"pairing does not hold: {len(common)} keys in both runs, of {len(ka)} in A and "
                f"{len(kb)} in B (needs {min_shared:.0%} of each); the means are not comparable"
            )
            out.append(replace(base, paired_by="", note=note))
            continue
        res = paired_bca(
            ka.loc[common].to_numpy(np.float64),
            kb.loc[common].to_numpy(np.float64),
            n_resamples=n_resamples,
            level=level,
            seed=seed,
        )
        note = "; ".join(filter(None, [res.reason, *res.warnings])) if res.degenerate else ""
        out.append(replace(base, estimate=res.estimate, low=res.low, high=res.high, note=note))
    return out
