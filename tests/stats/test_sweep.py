"""A sweep's ranking against a direct computation (pandas means, scipy's BCa), and the median rule
against its definition, point by point."""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

from stats.sweep import MedianStop, best, rank_trials


def _scores(effects: list[float], n: int = 150, seeds: tuple[int, ...] = (1, 2)) -> pd.DataFrame:
    rows = []
    difficulty = np.random.default_rng(0).uniform(0.2, 0.8, n)
    for t, effect in enumerate(effects):
        for seed in seeds:
            for arm in ("a", "b"):
                noise = np.random.default_rng([t, seed, ord(arm)]).normal(0, 0.1, n)
                values = difficulty + noise + (effect if arm == "b" else 0.0)
                rows += [(f"ex{i}", arm, seed, "score", v, t) for i, v in enumerate(values)]
    return pd.DataFrame(rows, columns=["example_id", "arm", "seed", "metric", "value", "trial"])


def test_trials_rank_by_the_paired_difference_with_scipy_s_interval() -> None:
    effects = [0.0, 0.2, 0.1, -0.05]
    scores = _scores(effects)
    ranks = rank_trials(scores, [{"effect": e} for e in effects], metric="score", arm="b", baseline="a")
    assert [r.trial for r in ranks] == [1, 2, 0, 3] and [r.rank for r in ranks] == [1, 2, 3, 4]
    for r in ranks:
        mine = scores[scores.trial == r.trial]
        per = mine.groupby(["arm", "example_id"])["value"].mean()  # each example's mean over the seeds
        d = (per.loc["b"] - per.loc["a"]).to_numpy()
        assert r.n == 150 and r.estimate == pytest.approx(d.mean(), abs=1e-12)
        ref = sp.bootstrap((d,), np.mean, n_resamples=10_000, method="BCa", random_state=0)
        assert r.low == pytest.approx(ref.confidence_interval.low, abs=4e-3)
        assert r.high == pytest.approx(ref.confidence_interval.high, abs=4e-3)
        assert r.low < effects[r.trial] < r.high  # the truth is covered for each of these draws
    assert best(ranks) is ranks[0]


def test_min_goal_no_baseline_and_trials_without_scores_come_last() -> None:
    scores = _scores([0.3, 0.0, 0.1])
    scores = scores[scores.trial != 2]  # trial 2 was stopped before it scored
    ranks = rank_trials(
        scores,
        [{"x": 1}, {"x": 2}, {"x": 3}],
        metric="score",
        arm="b",
        goal="min",
        stopped={2: "stopped at step 3"},
    )
    assert [(r.trial, r.rank) for r in ranks] == [(1, 1), (0, 2), (2, None)]
    assert ranks[0].estimate == pytest.approx(scores[(scores.trial == 1) & (scores.arm == "b")].value.mean())
    assert ranks[2].stopped == "stopped at step 3" and "no score scores" in ranks[2].note
    stopped_winner = rank_trials(
        scores, [{}, {}], metric="score", arm="b", goal="min", stopped={1: "stopped"}
    )
    assert stopped_winner[0].trial == 1 and stopped_winner[0].stopped  # it ranks first, but was stopped:
    assert best(stopped_winner) is not None and best(stopped_winner).trial == 0  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="trial"):
        rank_trials(scores.drop(columns="trial"), [{}], metric="score")


def _by_definition(
    curves: dict[int, dict[int, float]], trial: int, step: int, goal: str, k: int, m: int
) -> bool:
    if step < k:
        return False
    mine = [v for s, v in curves[trial].items() if s <= step]
    best_so_far = max(mine) if goal == "max" else min(mine)
    others = [
        statistics.fmean(v for s, v in c.items() if s <= step)
        for t, c in curves.items()
        if t != trial and max(c) >= step
    ]
    if len(others) < m:
        return False
    med = statistics.median(others)
    return best_so_far < med if goal == "max" else best_so_far > med


@pytest.mark.parametrize("goal", ["max", "min"])
def test_the_median_rule_stops_exactly_where_its_definition_says(goal: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        rule = MedianStop(goal=goal, after_steps=3, min_trials=2)  # type: ignore[arg-type]
        curves: dict[int, dict[int, float]] = {}
        stopped: set[int] = set()
        # 5 trials, interleaved: each step of each trial in a random order, levels far apart or not.
        level = rng.normal(0, 1, 5)
        order = [(t, s) for s in range(10) for t in range(5)]
        order += [order[i] for i in rng.integers(0, len(order), 10)]  # some steps sent again: the last counts
        rng.shuffle(order)
        order.sort(key=lambda ts: ts[1] + rng.uniform(0, 3))  # roughly in step order, trials out of step
        for t, s in order:
            if t in stopped:
                continue
            value = float(level[t] + rng.normal(0, 0.3))
            curves.setdefault(t, {})[s] = value
            expected = _by_definition(curves, t, s, goal, 3, 2)
            got = rule.observe("g", t, s, value)
            assert (got is not None) == expected, (t, s)
            if got:
                stopped.add(t)
                assert f"step {s}" in got
        assert stopped == set(rule.stopped)


def test_groups_are_compared_apart_and_ties_do_not_stop() -> None:
    rule = MedianStop(goal="max", after_steps=0, min_trials=1)
    assert rule.observe("score-a", 0, 0, 0.5) is None  # alone: nothing to compare with
    assert rule.observe("score-b", 1, 0, 0.1) is None  # another group: still alone in its own
    assert rule.observe("score-a", 1, 0, 0.5) is None  # equal to the median is not worse
    assert rule.observe("score-a", 2, 0, 0.4) is not None
    rule.reset("score-a", 2)  # trial 2's task runs again: its earlier curve no longer counts
    assert rule.observe("score-a", 3, 0, 0.45) is not None  # median of 0.5 and 0.5
    assert rule.curves["score-a"].keys() == {0, 1, 3}
    with pytest.raises(ValueError, match="min_trials"):
        MedianStop(min_trials=0)
