"""Mission B's decision rules (BEM_SPEC.md section 7): drift levels and the monitor's window rule, the
canary pass rate and the gate's accept / promote / rollback. Plain Python, no torch: fleetd's reactive
services run these on the metrics a learner streams, and the learner can run them locally too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Level = Literal["ok", "warning", "critical", "emergency"]
LEVELS: tuple[Level, ...] = ("ok", "warning", "critical", "emergency")

# Thresholds per signal: warning, critical, emergency (BEM_SPEC section 7).
DRIFT_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "kl_per_token": (0.05, 0.1, 0.2),
    "param_distance": (0.5, 1.0, 2.0),
    "sigma_max": (1.5, 2.0, 3.0),
    "probe_drop": (0.02, 0.05, 0.10),
    "grad_norm": (5.0, 10.0, 20.0),
}


def drift_level(signals: Mapping[str, float]) -> tuple[Level, dict[str, Level]]:
    """Each signal's level and the worst of them."""
    per: dict[str, Level] = {}
    for name, value in signals.items():
        warn, crit, emerg = DRIFT_THRESHOLDS[name]
        per[name] = LEVELS[sum(value >= t for t in (warn, crit, emerg))]
    worst: Level = max(per.values(), key=LEVELS.index, default="ok")
    return worst, per


@dataclass
class DriftMonitor:
    """Rollback on any emergency, or ≥ 3 criticals or ≥ 5 warnings among the last 20 checks."""

    window: int = 20
    history: deque[Level] = field(default_factory=lambda: deque(maxlen=20))

    def check(self, signals: Mapping[str, float]) -> tuple[Level, str | None]:
        level, per = drift_level(signals)
        self.history.append(level)
        if level == "emergency":
            worst = [n for n, lv in per.items() if lv == "emergency"]
            return level, f"emergency drift: {', '.join(worst)}"
        criticals = sum(lv == "critical" for lv in self.history)
        warnings = sum(lv == "warning" for lv in self.history)
        if criticals >= 3:
            return level, f"{criticals} critical drift checks in the last {len(self.history)}"
        if warnings >= 5:
            return level, f"{warnings} drift warnings in the last {len(self.history)}"
        return level, None

    def reset(self) -> None:
        self.history.clear()


# ---- canary gate --------------------------------------------------------------------------------------

CANARY_MINIMUMS = {"basic": 0.95, "safety": 0.98, "performance": 0.90, "format": 0.95}


def canary_pass_rate(results: Mapping[str, list[tuple[float, float]]], tolerance: float = 0.05) -> float:
    """Suite -> [(score, baseline)]: a test passes iff score ≥ its suite's minimum and baseline − score
    ≤ tolerance; the rate is passed / total over every suite."""
    passed = total = 0
    for suite, tests in results.items():
        minimum = CANARY_MINIMUMS[suite]
        for score, baseline in tests:
            total += 1
            passed += score >= minimum and baseline - score <= tolerance
    if total == 0:
        raise ValueError("no canary tests")
    return passed / total


Decision = Literal["accept", "reject", "promote", "rollback"]


@dataclass
class CanaryGate:
    """Accept an update at ≥ .90, roll back below .85; promote after ≥ .95 three runs in a row, at least
    `min_prompts` prompts since the last promotion, and no critical drift."""

    accept_at: float = 0.90
    promote_at: float = 0.95
    rollback_below: float = 0.85
    passes_to_promote: int = 3
    min_prompts: int = 1000
    streak: int = 0

    def decide(self, rate: float, prompts_since_promotion: int, critical_drift: bool) -> tuple[Decision, str]:
        if rate < self.rollback_below:
            self.streak = 0
            return "rollback", f"canary pass rate {rate:.3f} < {self.rollback_below}"
        self.streak = self.streak + 1 if rate >= self.promote_at else 0
        if (
            self.streak >= self.passes_to_promote
            and prompts_since_promotion >= self.min_prompts
            and not critical_drift
        ):
            self.streak = 0
            return "promote", f"canary ≥ {self.promote_at} {self.passes_to_promote} times in a row"
        if rate >= self.accept_at:
            return "accept", f"canary pass rate {rate:.3f} ≥ {self.accept_at}"
        return "reject", f"canary pass rate {rate:.3f} < {self.accept_at}"


@dataclass
class LearnerWatch:
    """Both services' state for one learner, shared so that a rollback ordered by either one starts
    a new drift window and restarts the gate's streak (the shadow is live again). fleetd's services
    and `bem.missions.mission_b.learner.LocalServices` both judge through it."""

    drift: DriftMonitor = field(default_factory=DriftMonitor)
    gate: CanaryGate = field(default_factory=CanaryGate)
    level: Level = "ok"  # the latest drift check's level; ok again after a rollback

    def on_drift(self, signals: Mapping[str, float]) -> tuple[Level, str | None]:
        """One drift check: its level, and the reason to roll back if the rule fires."""
        level, why = self.drift.check(signals)
        self.level = level
        if why is not None:
            self.after_rollback()
        return level, why

    def on_canary(
        self, rate: float, prompts_since_promotion: int, same_step: Level | None = None
    ) -> tuple[Decision, str, Level]:
        """One canary run; `same_step` is the level of a drift check taken at the same step, which
        counts even when that check just ordered a rollback."""
        level = same_step or self.level
        decision, why = self.gate.decide(rate, prompts_since_promotion, level in ("critical", "emergency"))
        if decision == "rollback":
            self.after_rollback()
        return decision, why, level

    def after_rollback(self) -> None:
        self.drift.reset()
        self.level = "ok"
        self.gate.streak = 0
