"""stats: the statistics that decide promotions (../shared/STATS_SPEC.md). No imports of the project.

- `bootstrap`: BCa with scipy's conventions (mean, ratio of sums, callables, families) and the
  one-sided p-value; `resample` draws for it; `corpus` scores corpus metrics from totals.
- `quantile`: percentile intervals for medians and quantile ratios; `seeds`: multi-bootstrap.
- `table`: pairs the (example_id, arm, seed, metric, value) score table.
- `multitest`: BH/BY with FCR-adjusted levels; `gates`: preconditions, claims and guards into a
  verdict (`preconditions`, `claims`, `rare` for exact rare-event tests, `decision` the rows).
- `canary`: the Kayenta-style judge; `promotion`: an online learner's promotion and rollback rules
  (drift levels, the canary gate, the live-versus-shadow judge).
- `python -m stats compare SCORES.parquet --baseline A --variant B`: the decision table.

The names below are the public surface, loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "bootstrap": ("BootstrapResult", "bca", "paired_bca"),
    "multitest": ("fdr",),
    "gates": ("Claim", "GateSpec", "Guard", "Precondition", "Verdict", "evaluate"),
    "table": ("read_scores",),
    "canary": ("CanaryConfig", "MetricSpec", "judge"),
    "promotion": ("PromotionRules", "PromotionWatch"),
}
_WHERE = {name: f"stats.{module}" for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'stats' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return __all__
