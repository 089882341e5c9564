"""The promotion rules (BEM_SPEC.md section 7, stats.promotion): drift levels and the window rule, the
canary gate, the live-versus-shadow Kayenta judge, and thresholds read from a mission's TOML table."""

from __future__ import annotations

import tomllib

import msgspec
import numpy as np
import pytest

from stats.canary import CanaryReport, judge
from stats.promotion import PromotionRules, PromotionWatch

OK = {"kl_per_token": 0.01, "grad_norm": 1.0}
WARN = {"kl_per_token": 0.06, "grad_norm": 1.0}
CRIT = {"kl_per_token": 0.12, "grad_norm": 1.0}


def canary(step: int, rate: float, prompts: float = 5000.0, **extra: list[tuple[int, float]]) -> dict:
    return {
        "canary/pass_rate": [(step, rate)],
        "canary/prompts_since_promotion": [(step, prompts)],
        **extra,
    }


def samples(step: int, live: np.ndarray, shadow: np.ndarray) -> dict[str, list[tuple[int, float]]]:
    """The judge's points: per-prompt scores of both arms at the canary step."""
    return {
        f"judge/{arm}/{metric}": [(step, float(v)) for v in values]
        for arm, values in (("live", live), ("shadow", shadow))
        for metric in ("aggregate", "quality")
    }


def test_drift_window_rule() -> None:
    watch = PromotionWatch()
    for _ in range(4):
        assert watch.on_drift(WARN)[1] is None
    assert "5 drift warnings" in str(watch.on_drift(WARN)[1])  # a rollback, which starts a new window
    for _ in range(2):
        assert watch.on_drift(CRIT)[1] is None
    assert watch.on_drift(OK)[1] is None
    assert "3 critical" in str(watch.on_drift(CRIT)[1])
    level, why = watch.on_drift({"grad_norm": 25.0})
    assert level == "emergency" and "grad_norm" in str(why)
    for _ in range(20):
        watch.on_drift(OK)
    watch.on_drift(CRIT)
    watch.on_drift(CRIT)
    for _ in range(18):
        watch.on_drift(OK)
    assert watch.on_drift(CRIT)[1] is None  # the first two criticals fell out of the 20-check window


def test_canary_pass_rate_and_gate_streak() -> None:
    gate = PromotionRules().gate
    results = {"basic": [(0.97, 0.97)] * 9 + [(0.90, 0.97)], "format": [(0.99, 0.95)] * 10}
    assert gate.pass_rate(results) == pytest.approx(19 / 20)
    assert gate.pass_rate({"safety": [(0.99, 1.0), (0.99, 1.06)]}) == 0.5  # baseline − score > .05
    watch = PromotionWatch()
    decide = lambda rate, prompts=5000, level=None: watch.on_canary(rate, prompts, level)[0]  # noqa: E731
    assert [decide(0.96) for _ in range(4)] == ["accept", "accept", "promote", "accept"]
    assert decide(0.92) == "accept" and watch.streak == 0  # the streak starts again
    assert [decide(0.97, 500) for _ in range(3)][-1] == "accept"  # too few prompts since the last promotion
    watch = PromotionWatch()
    assert [decide(0.97, 5000, "critical") for _ in range(3)][-1] == "accept"  # critical drift blocks it
    assert decide(0.88) == "reject"
    assert decide(0.84) == "rollback"


def test_observe_judges_a_canary_with_the_drift_check_of_its_own_step() -> None:
    watch = PromotionWatch()
    for step in (50, 100):
        assert watch.observe(canary(step, 0.97)) == []
    # The third pass arrives in the same batch as a critical drift check: no promotion.
    batch = {**canary(150, 0.97), **{f"drift/{k}": [(150, v)] for k, v in CRIT.items()}}
    assert watch.observe(batch) == []
    watch = PromotionWatch()
    watch.observe(canary(50, 0.97))
    watch.observe(canary(100, 0.97))
    # An emergency at the canary's step rolls back, restarts the streak, and the canary is not a promotion.
    batch = {**canary(150, 0.97), "drift/grad_norm": [(150, 25.0)]}
    actions = watch.observe(batch)
    assert [(a.service, a.decision, a.step) for a in actions] == [("drift", "rollback", 150)]
    assert watch.streak == 0
    acted = [watch.observe(canary(s, 0.97)) for s in (200, 250, 300)]
    assert [a.decision for a in acted[-1]] == ["promote"] and acted[0] == acted[1] == []


def test_the_judge_fails_a_shadow_that_serves_worse_and_that_rolls_it_back() -> None:
    rng = np.random.default_rng(0)
    live = rng.uniform(0.5, 0.9, 50)
    worse = np.clip(live - 0.3 + rng.normal(0, 0.02, 50), 0, 1)
    watch = PromotionWatch()
    actions = watch.observe(canary(50, 0.99, **samples(50, live, worse)))
    assert [(a.service, a.decision) for a in actions] == [("canary", "rollback")]
    assert "judge: Fail" in actions[0].reason
    step, report = watch.judged[-1]
    # The watch's report is the Kayenta judge's, shadow as canary and live as baseline.
    direct = judge(
        PromotionRules().judge,
        {m: live for m in ("aggregate", "quality")},
        {m: worse for m in ("aggregate", "quality")},
    )
    assert step == 50 and report.decision == direct.decision == "Fail" and report.score == direct.score


def test_only_the_judges_pass_counts_toward_a_promotion() -> None:
    rng = np.random.default_rng(1)
    live = rng.uniform(0.5, 0.9, 50)
    same = live + rng.normal(0, 1e-3, 50)
    better = np.clip(live + 0.3, 0, 1)  # a shadow that learnt: an increase is allowed
    watch = PromotionWatch()
    for step in (50, 100):
        assert watch.observe(canary(step, 0.97, **samples(step, live, same))) == []
    actions = watch.observe(canary(150, 0.97, **samples(150, live, better)))
    assert [a.decision for a in actions] == ["promote"]
    assert [r.decision for _, r in watch.judged] == ["Pass", "Pass", "Pass"]
    # A Marginal judgement (hold, or ask a person) is not a pass: the streak restarts.
    marginal = CanaryReport((), (), 80.0, "Marginal", "score 80.00 ≥ marginal 75, < pass 95")
    watch = PromotionWatch()
    assert watch.on_canary(0.97, 5000)[0] == watch.on_canary(0.97, 5000)[0] == "accept"
    assert watch.on_canary(0.97, 5000, None, marginal)[0] == "accept" and watch.streak == 0
    assert [watch.on_canary(0.97, 5000)[0] for _ in range(3)][-1] == "promote"


def test_thresholds_come_from_the_mission_table() -> None:
    table = tomllib.loads(
        """
        [drift]
        window = 10
        warnings = 2
        levels.kl_per_token = [0.5, 1.0, 2.0]
        levels.grad_norm = [5.0, 10.0, 20.0]
        [gate]
        accept_at = 0.5
        promote_at = 0.6
        rollback_below = 0.4
        passes_to_promote = 1
        min_prompts = 10
        [judge]
        pass_threshold = 90.0
        metrics = [{ name = "quality", direction = "decrease" }]
        """
    )
    watch = PromotionWatch.from_config(table)
    assert watch.on_drift({"kl_per_token": 0.06, "grad_norm": 1.0}) == ("ok", None)  # spec: a warning
    assert watch.on_drift({"kl_per_token": 0.6, "grad_norm": 1.0})[1] is None
    assert "2 drift warnings" in str(watch.on_drift({"kl_per_token": 0.6, "grad_norm": 1.0})[1])
    assert watch.on_canary(0.61, 10)[0] == "promote"  # one pass at .6 suffices here
    assert watch.on_canary(0.45, 10)[0] == "reject" and watch.on_canary(0.39, 10)[0] == "rollback"
    assert [m.name for m in watch.rules.judge.metrics] == ["quality"]
    assert PromotionWatch.from_config(None).rules == PromotionRules()  # the spec's values by default


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"gate": {"accept_at": 0.99}}, "$.gate"),  # accept above promote
        ({"gate": {"acept_at": 0.9}}, "acept_at"),  # a typo is refused, not ignored
        ({"drift": {"levels": {"kl_per_token": [0.2, 0.1, 0.3]}}}, "$.drift"),
        ({"judge": {"metrics": [{"name": "q", "direction": "up"}]}}, "$.judge.metrics[0]"),
    ],
)
def test_a_bad_table_is_refused_naming_the_field(table: dict, where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=where.replace("$", r"\$").replace("[", r"\[")):
        PromotionRules.from_config(table)


def test_an_unknown_drift_signal_is_an_error_not_ok() -> None:
    with pytest.raises(ValueError, match="drift signal 'kl' has no levels"):
        PromotionWatch().on_drift({"kl": 0.3})


def test_a_batch_of_several_checks_is_judged_in_step_order() -> None:
    """The worker may batch two checks: a canary run at step 100 comes before a rollback at 105, so
    it belongs to the streak the rollback ends, not to the new one."""
    watch = PromotionWatch()
    watch.observe(canary(50, 0.97))
    batch = {**canary(100, 0.97), "drift/grad_norm": [(105, 25.0)]}
    assert [(a.step, a.decision) for a in watch.observe(batch)] == [(105, "rollback")]
    assert watch.streak == 0
    assert [a.decision for s in (150, 200) for a in watch.observe(canary(s, 0.97))] == []
    assert [a.decision for a in watch.observe(canary(250, 0.97))] == ["promote"]


def test_samples_the_judge_cannot_judge_hold_the_streak_and_say_why() -> None:
    watch = PromotionWatch()
    odd = {"judge/live/unknown": [(50, 0.5)] * 5, "judge/shadow/unknown": [(50, 0.5)] * 5}
    for step in (50, 100, 150):
        batch = canary(step, 0.97, **{k: [(step, v) for _, v in pts] for k, pts in odd.items()})
        assert watch.observe(batch) == []  # never a promotion on unjudged samples
    assert len(watch.unjudged) == 3 and "no MetricSpec" in watch.unjudged[0][1]


def test_partial_tables_change_the_spec_levels_and_suites_without_dropping_any() -> None:
    rules = PromotionRules.from_config({"drift": {"levels": {"grad_norm": [1.0, 2.0, 3.0]}},
                                        "gate": {"suites": {"safety": 0.99}}})  # fmt: skip
    assert rules.drift.levels["grad_norm"] == (1.0, 2.0, 3.0)
    assert rules.drift.levels["kl_per_token"] == PromotionRules().drift.levels["kl_per_token"]
    assert rules.gate.suites == {**PromotionRules().gate.suites, "safety": 0.99}
