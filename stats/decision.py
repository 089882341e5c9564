"""The decision row every gate kind (precondition, primary claim, guard) is judged into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["pass", "fail", "no_evidence", "nodata", "inconclusive"]
Kind = Literal["precondition", "primary", "guard"]


@dataclass(frozen=True)
class Decision:
    gate: str
    kind: Kind
    metric: str
    comparison: str
    outcome: Outcome
    reason: str
    estimate: float | None = None
    # The interval (see `interval`): claims and guards are judged on it; a precondition is judged on
    # its point estimate and reports the interval beside it.
    low: float | None = None
    high: float | None = None
    interval: str = ""
    p_value: float | None = None
    p_adjusted: float | None = None
    p_value_se: float | None = None
    n: int = 0
    family: str | None = None
    seeds_positive: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"
