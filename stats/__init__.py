"""stats: the statistics that decide promotions (../shared/STATS_SPEC.md). No fleet imports.

- `bootstrap`: BCa with scipy's conventions (mean, ratio of sums, callables, families) and the
  one-sided p-value; `resample` draws for it; `corpus` scores corpus metrics from totals.
- `quantile`: percentile intervals for medians and quantile ratios; `seeds`: multi-bootstrap.
- `table`: pairs the (example_id, arm, seed, metric, value) score table.
- `multitest`: BH/BY with FCR-adjusted levels; `gates`: claims and guards into a verdict.
- `canary`: the Kayenta-style judge; `drift`: drift statistics with learnt thresholds.
- `python -m stats compare SCORES.parquet --baseline A --variant B`: the decision table.
"""
