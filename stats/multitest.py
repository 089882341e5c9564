"""False discovery rate over a mission's family of primary claims (STATS_SPEC §5).

statsmodels computes BH and BY; this module adds what a promotion decision needs around them:
NaN p-values are an error (a NaN silently sorts as "not significant"), and the selected claims get
Benjamini–Yekutieli (2005) FCR-adjusted intervals at level 1 − R·q/m.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from statsmodels.stats.multitest import multipletests

Method = Literal["bh", "by"]
_STATSMODELS = {"bh": "fdr_bh", "by": "fdr_by"}  # always named: statsmodels' default is Holm–Šidák


@dataclass(frozen=True)
class FamilyResult:
    p_values: tuple[float, ...]
    p_adjusted: tuple[float, ...]
    rejected: tuple[bool, ...]
    q: float
    method: Method

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected)

    @property
    def fcr_level(self) -> float | None:
        """1 − R·q/m, the level of the selected claims' intervals; None when nothing was selected.

        BY is BH at q / Σ_{i≤m} 1/i, so its intervals use that q: "rejected ⇔ bound > 0" holds for both.
        """
        r, m = self.n_rejected, len(self.rejected)
        q = self.q / np.sum(1 / np.arange(1, m + 1)) if self.method == "by" else self.q
        return float(1 - r * q / m) if r else None


def fdr(p_values: Sequence[float] | np.ndarray, q: float = 0.05, method: Method = "bh") -> FamilyResult:
    """Adjusted p-values and rejections at FDR level q, BH (independence or PRDS) or BY (any dependence)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or len(p) == 0:
        raise ValueError(f"p-values must be a non-empty 1-D sequence, got shape {p.shape}")
    if np.isnan(p).any():
        where = np.flatnonzero(np.isnan(p)).tolist()
        raise ValueError(
            f"NaN p-values at positions {where}: a NaN must never reach BH; fix or drop that claim"
        )
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if method not in _STATSMODELS:
        raise ValueError(f"unknown FDR method {method!r}; use 'bh' or 'by'")
    rejected, adjusted, _, _ = multipletests(p, alpha=q, method=_STATSMODELS[method])
    return FamilyResult(
        tuple(float(v) for v in p),
        tuple(float(v) for v in adjusted),
        tuple(bool(r) for r in rejected),
        q,
        method,
    )
