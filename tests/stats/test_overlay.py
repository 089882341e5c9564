"""The overlay service's rule: a one-sided Clopper–Pearson bound (checked against scipy's exact binomial
interval) above the ceiling raises κ by a step, once per κ."""

from __future__ import annotations

import msgspec
import pytest
from scipy.stats import binomtest

from stats.overlay import KNOB, VIOLATION, OverlayRules, OverlayWatch, rate_lower_bound


def check(step: int, violated: int, n: int, kappa: float) -> dict[str, list[tuple[int, float]]]:
    return {
        VIOLATION: [(step, 1.0)] * violated + [(step, 0.0)] * (n - violated),
        KNOB: [(step, kappa)],
    }


@pytest.mark.parametrize(
    ("k", "n", "conf"), [(1, 10, 0.9), (5, 10, 0.9), (9, 10, 0.95), (3, 40, 0.8), (7, 7, 0.9)]
)
def test_the_lower_bound_is_scipys_exact_interval_end(k: int, n: int, conf: float) -> None:
    # A one-sided bound at `conf` is the low end of the equal-tailed exact interval at 2·conf − 1.
    expected = binomtest(k, n).proportion_ci(confidence_level=2 * conf - 1, method="exact").low
    assert rate_lower_bound(k, n, conf) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert rate_lower_bound(0, n, conf) == 0.0


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="violations <= n"):
        rate_lower_bound(3, 2, 0.9)


def test_a_spike_raises_the_knob_by_a_step_and_a_check_in_flight_does_not_repeat_it() -> None:
    watch = OverlayWatch(OverlayRules(ceiling=0.1, confidence=0.9, raise_by=0.2))
    assert watch.observe(check(5, 2, 10, 0.0)) == []  # 2/10: the bound (.055) does not clear .1
    (action,) = watch.observe(check(10, 9, 10, 0.0))
    assert (action.decision, action.step, action.value) == ("raise", 10, 0.2)
    assert "9/10" in action.reason and "ceiling 0.1" in action.reason
    # The next check ran before the raise arrived: still at κ 0, not judged again.
    assert watch.observe(check(11, 9, 10, 0.0)) == []
    (again,) = watch.observe(check(20, 8, 10, 0.2))  # landed, still spiking: one more step
    assert again.value == 0.4
    assert watch.observe(check(30, 10, 10, 1.0)) == []  # nothing left to raise


def test_a_raise_that_never_lands_is_sent_again() -> None:
    watch = OverlayWatch()
    assert [a.value for a in watch.observe(check(1, 9, 10, 0.0))] == [0.2]
    assert watch.observe(check(2, 9, 10, 0.0)) == []  # in flight
    assert [a.value for a in watch.observe(check(3, 9, 10, 0.0))] == [0.2]  # lost: again


def test_after_a_person_lowers_the_knob_a_new_spike_raises_it_again() -> None:
    watch = OverlayWatch()
    assert [a.value for a in watch.observe(check(1, 9, 10, 0.0))] == [0.2]
    assert watch.observe(check(2, 0, 10, 0.2)) == []  # landed, quiet
    # fleetctl knob set 0; the next spike at 0 is a new one, not the old raise in flight.
    assert [a.value for a in watch.observe(check(3, 9, 10, 0.0))] == [0.2]


def test_a_bad_point_raises_before_any_check_of_its_batch_is_decided() -> None:
    watch = OverlayWatch()
    series = {VIOLATION: check(1, 9, 10, 0.0)[VIOLATION] + [(2, 1.0)], KNOB: [(1, 0.0)]}
    with pytest.raises(ValueError, match="step 2 reported no overlay/knob"):
        watch.observe(series)
    assert watch.sent is None  # nothing remembered from the half-read batch


def test_several_checks_in_one_batch_are_judged_in_step_order() -> None:
    series = {k: check(3, 9, 10, 0.4)[k] + check(1, 9, 10, 0.0)[k] for k in (VIOLATION, KNOB)}
    actions = OverlayWatch().observe(series)
    assert [(a.step, a.value) for a in actions] == [(1, 0.2), (3, 0.6)]  # step 3 shows κ .4: landed


def test_points_the_watch_cannot_judge_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        OverlayWatch().observe({VIOLATION: [(1, 0.5)], KNOB: [(1, 0.0)]})
    with pytest.raises(ValueError, match="reported no overlay/knob"):
        OverlayWatch().observe({VIOLATION: [(1, 1.0)]})


def test_the_config_table_is_validated() -> None:
    assert OverlayWatch.from_config({"ceiling": 0.2}).rules.ceiling == 0.2
    with pytest.raises(msgspec.ValidationError, match="raise_by"):
        OverlayWatch.from_config({"raise_by": 0.0})
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        OverlayWatch.from_config({"ceilling": 0.2})
    with pytest.raises(msgspec.ValidationError, match="every and per_check"):
        OverlayWatch.from_config({"every": 0})
    with pytest.raises(msgspec.ValidationError, match="knob must be in"):
        OverlayWatch.from_config({"knob": 1.5})
