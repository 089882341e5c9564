"""Promote or roll back an online learner's shadow (BEM_SPEC.md section 7): the rules, in one place.

- The drift monitor: fixed levels per drift signal (warning, critical, emergency) and the window rule
  (roll back on any emergency, or too many criticals or warnings among the last checks).
- The canary gate: the suites' pass rate; accept an update, promote after passes in a row with
  enough prompts since the last promotion and no critical drift, roll back below a floor.
- The live-versus-shadow judge: the Kayenta judge (`stats.canary`, Mann–Whitney and Hodges–Lehmann)
  on the mirrored traffic since the previous canary run, shadow as the canary and live as the
  baseline. A Fail is a canary failure (roll back); only a Pass counts toward a promotion.

Thresholds are data, `PromotionRules`, converted from the mission's TOML (the spec's values are the
defaults). `PromotionWatch` holds one learner's state and turns the points the learner reports into
actions; fleetd's service host and the learner's in-process `LocalServices` both run it.

What a learner reports, as metric points (the names are the protocol):
- `drift/<signal>`: one drift check per step, all its signals at that step in one batch;
- `canary/pass_rate` at the canary run's step, with `canary/prompts_since_promotion` and, optionally,
  `canary/min_prompts` (the learner's own minimum between promotions) at the same step;
- `judge/live/<metric>` and `judge/shadow/<metric>`: several values at the canary run's step, the
  per-prompt scores of the traffic served since the previous run, in the same batch as the pass rate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from stats.canary import CanaryConfig, CanaryReport, MetricSpec, judge

Level = Literal["ok", "warning", "critical", "emergency"]
LEVELS: tuple[Level, ...] = ("ok", "warning", "critical", "emergency")
Decision = Literal["accept", "reject", "promote", "rollback"]
Series = Mapping[str, Sequence[tuple[int, float]]]  # name -> (step, value) points

# BEM_SPEC section 7: warning, critical, emergency per drift signal.
SPEC_LEVELS: dict[str, tuple[float, float, float]] = {
    "kl_per_token": (0.05, 0.1, 0.2),
    "param_distance": (0.5, 1.0, 2.0),
    "sigma_max": (1.5, 2.0, 3.0),
    "probe_drop": (0.02, 0.05, 0.10),
    "grad_norm": (5.0, 10.0, 20.0),
}
SPEC_SUITES = {"basic": 0.95, "safety": 0.98, "performance": 0.90, "format": 0.95}


class _Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class DriftRule(_Rule, frozen=True):
    """Levels per signal, and the window rule: roll back on any emergency, or on at least `criticals`
    critical or `warnings` warning checks among the last `window`."""

    levels: dict[str, tuple[float, float, float]] = msgspec.field(default_factory=lambda: dict(SPEC_LEVELS))
    window: int = 20
    criticals: int = 3
    warnings: int = 5

    def __post_init__(self) -> None:
        for name, (warn, crit, emerg) in self.levels.items():
            if not warn <= crit <= emerg:
                raise ValueError(f"drift level {name!r}: need warning ≤ critical ≤ emergency")
        if min(self.window, self.criticals, self.warnings) < 1:
            raise ValueError("window, criticals and warnings must be at least 1")

    def level(self, signals: Mapping[str, float]) -> tuple[Level, dict[str, Level]]:
        """Each signal's level and the worst of them."""
        per: dict[str, Level] = {}
        for name, value in signals.items():
            if name not in self.levels:
                raise ValueError(f"drift signal {name!r} has no levels; known: {sorted(self.levels)}")
            per[name] = LEVELS[sum(value >= t for t in self.levels[name])]
        return max(per.values(), key=LEVELS.index, default="ok"), per


class GateRule(_Rule, frozen=True):
    """The canary gate: a test passes iff its score ≥ its suite's minimum and baseline − score ≤
    `tolerance`; accept an update at ≥ `accept_at`, promote after `passes_to_promote` runs in a row
    at ≥ `promote_at` (at least `min_prompts` since the last promotion, no critical drift), roll
    back below `rollback_below`."""

    accept_at: float = 0.90
    promote_at: float = 0.95
    rollback_below: float = 0.85
    passes_to_promote: int = 3
    min_prompts: int = 1000
    tolerance: float = 0.05
    suites: dict[str, float] = msgspec.field(default_factory=lambda: dict(SPEC_SUITES))

    def __post_init__(self) -> None:
        if not 0 <= self.rollback_below <= self.accept_at <= self.promote_at <= 1:
            raise ValueError("need 0 ≤ rollback_below ≤ accept_at ≤ promote_at ≤ 1")
        if self.passes_to_promote < 1 or self.min_prompts < 0:
            raise ValueError("passes_to_promote must be at least 1 and min_prompts at least 0")

    def pass_rate(self, results: Mapping[str, Sequence[tuple[float, float]]]) -> float:
        """Suite -> [(score, baseline)] per test: passed / total over every suite."""
        passed = total = 0
        for suite, tests in results.items():
            if suite not in self.suites:
                raise ValueError(f"canary suite {suite!r} has no minimum; known: {sorted(self.suites)}")
            for score, baseline in tests:
                total += 1
                passed += score >= self.suites[suite] and baseline - score <= self.tolerance
        if total == 0:
            raise ValueError("no canary tests")
        return passed / total


def _spec_judge() -> CanaryConfig:
    """Shadow (canary) against live (baseline) on served prompts; a drop is what fails. Coherence is
    reported, not scored: a shadow that learns a new format may well grow more or less confident."""
    return CanaryConfig(
        metrics=(
            MetricSpec("aggregate", direction="decrease"),
            MetricSpec("quality", direction="decrease"),
            MetricSpec("coherence", direction="decrease", report_only=True),
        )
    )


class PromotionRules(_Rule, frozen=True):
    """Every threshold of the drift monitor, the canary gate and the live-versus-shadow judge."""

    drift: DriftRule = msgspec.field(default_factory=DriftRule)
    gate: GateRule = msgspec.field(default_factory=GateRule)
    judge: CanaryConfig = msgspec.field(default_factory=_spec_judge)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> PromotionRules:
        """From a mission TOML's table; a bad one raises msgspec.ValidationError naming the field.
        A `drift.levels` or `gate.suites` table changes or adds entries to the spec's, never drops them:
        a learner reports every signal and suite."""
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (config or {}).items()}
        for section, key, spec in (("drift", "levels", SPEC_LEVELS), ("gate", "suites", SPEC_SUITES)):
            table = raw.get(section)
            if isinstance(table, dict) and isinstance(table.get(key), Mapping):
                table[key] = {**spec, **table[key]}
        return msgspec.convert(raw, cls, strict=True)


@dataclass(frozen=True)
class Action:
    """A decision that acts: roll the shadow back, or promote it."""

    service: Literal["drift", "canary"]  # which rule decided
    step: int
    decision: Literal["rollback", "promote"]
    level: Level  # the drift level the decision saw
    value: float  # the check's largest signal, or the canary pass rate
    reason: str


class PromotionWatch:
    """One learner's drift window and gate streak, shared by both rules so that a rollback either one
    orders starts a new drift window and restarts the streak (the shadow is live again)."""

    def __init__(self, rules: PromotionRules | None = None) -> None:
        self.rules = rules or PromotionRules()
        self.history: deque[Level] = deque(maxlen=self.rules.drift.window)
        self.level: Level = "ok"  # the latest drift check's; ok again after a rollback
        self.streak = 0
        self.min_prompts = self.rules.gate.min_prompts
        self.prompts: dict[int, float] = {}  # step -> prompts since the last promotion
        self.judged: list[tuple[int, CanaryReport]] = []  # every live-versus-shadow judgement
        self.unjudged: list[tuple[int, str]] = []  # canary runs whose samples could not be judged

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> PromotionWatch:
        return cls(PromotionRules.from_config(config))

    def observe(self, series: Series) -> list[Action]:
        """The actions one batch of points calls for, step by step: at each step the drift check
        first, then the canary run, judged with the drift level measured at its own step (sent in the
        same batch), so the gate never promotes what the drift monitor is rolling back at that step;
        a canary run at a step whose check rolled back decides nothing."""
        actions: list[Action] = []
        checks = _by_step(series, "drift/")
        rates = dict(series.get("canary/pass_rate", ()))
        for _, value in series.get("canary/min_prompts", ()):
            self.min_prompts = int(value)
        self.prompts.update(series.get("canary/prompts_since_promotion", ()))
        # Step by step, as the learner measured them (a batch may hold several checks).
        for step in sorted(checks.keys() | rates.keys()):
            level: Level | None = None
            if step in checks:
                level, why = self.on_drift(checks[step])
                if why is not None:
                    actions.append(Action("drift", step, "rollback", level, max(checks[step].values()), why))
                    continue  # this step's canary run measured the shadow the rollback discards
            if step in rates:
                prompts = self.prompts.get(step, max(self.prompts.values(), default=0.0))
                report = self.judge(series, step)
                decision, why, seen = self.on_canary(rates[step], int(prompts), level, report)
                if decision == "rollback" or decision == "promote":
                    actions.append(Action("canary", step, decision, seen, rates[step], why))
        return actions

    def on_drift(self, signals: Mapping[str, float]) -> tuple[Level, str | None]:
        """One drift check: its level, and the reason to roll back if the window rule fires."""
        rule = self.rules.drift
        level, per = rule.level(signals)
        self.history.append(level)
        self.level = level
        why = None
        criticals = sum(lv == "critical" for lv in self.history)
        warnings = sum(lv == "warning" for lv in self.history)
        if level == "emergency":
            why = f"emergency drift: {', '.join(n for n, lv in per.items() if lv == 'emergency')}"
        elif criticals >= rule.criticals:
            why = f"{criticals} critical drift checks in the last {len(self.history)}"
        elif warnings >= rule.warnings:
            why = f"{warnings} drift warnings in the last {len(self.history)}"
        if why is not None:
            self.after_rollback()
        return level, why

    def judge(self, series: Series, step: int) -> CanaryReport | None:
        """The Kayenta judge on the shadow's and live's served scores at this canary step, if sent."""
        arms: dict[str, dict[str, list[float]]] = {"live": {}, "shadow": {}}
        for name, points in series.items():
            kind, _, rest = name.partition("/")
            arm, _, metric = rest.partition("/")
            if kind == "judge" and arm in arms:
                arms[arm][metric] = [v for s, v in points if s == step]
        if not any(arms["live"].values()) and not any(arms["shadow"].values()):
            return None
        try:
            report = judge(self.rules.judge, arms["live"], arms["shadow"])
        except ValueError as e:  # samples it cannot judge (a metric it does not know, too many pairs)
            self.unjudged.append((step, str(e)))
            # Not a pass: it holds the streak, as a Marginal does, and the reason says why.
            return CanaryReport((), (), 0.0, "Marginal", f"could not judge the samples: {e}")
        self.judged.append((step, report))
        return report

    def on_canary(
        self, rate: float, prompts: int, same_step: Level | None = None, report: CanaryReport | None = None
    ) -> tuple[Decision, str, Level]:
        """One canary run: the gate's decision, its reason, and the drift level it saw (`same_step`:
        a check taken at this step, which counts even when that check just ordered a rollback)."""
        gate, level = self.rules.gate, same_step or self.level
        decision: Decision
        if rate < gate.rollback_below:
            decision, why = "rollback", f"canary pass rate {rate:.3f} < {gate.rollback_below}"
        elif report is not None and report.decision == "Fail":
            decision, why = "rollback", f"live-versus-shadow judge: Fail ({report.reason})"
        else:
            judged = report is None or report.decision == "Pass"
            self.streak = self.streak + 1 if rate >= gate.promote_at and judged else 0
            critical = level in ("critical", "emergency")
            if self.streak >= gate.passes_to_promote and prompts >= self.min_prompts and not critical:
                self.streak = 0
                runs = f"{gate.passes_to_promote} runs in a row"
                decision, why = "promote", f"canary ≥ {gate.promote_at} and the judge's Pass, {runs}"
            elif rate >= gate.accept_at:
                decision, why = "accept", f"canary pass rate {rate:.3f} ≥ {gate.accept_at}"
            else:
                decision, why = "reject", f"canary pass rate {rate:.3f} < {gate.accept_at}"
        if decision == "rollback":
            self.after_rollback()
        return decision, why, level

    def after_rollback(self) -> None:
        self.history.clear()
        self.level = "ok"
        self.streak = 0


def _by_step(series: Series, prefix: str) -> dict[int, dict[str, float]]:
    """The points under `prefix`, grouped by step: one check per step."""
    out: dict[int, dict[str, float]] = {}
    for name, points in series.items():
        if name.startswith(prefix):
            for step, value in points:
                out.setdefault(step, {})[name.removeprefix(prefix)] = value
    return out
