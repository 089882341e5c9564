"""A sweep mission's fleet side: the median rule fed by the recorder, the ranking at its end, and the
winner as overrides for a gated run (`fleetctl submit NAME --sweep`, `fleetctl sweep ID`)."""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd

from fleetd.scheduler import Changes, Scheduler
from schemas import messages as m
from schemas import missions as specs
from stats.sweep import MedianStop, TrialRank, best, rank_trials


class EarlyStops:
    """Each running sweep's median rule (`[sweep.early_stop]`), fed with its tasks' curves."""

    def __init__(self) -> None:
        self.rules: dict[str, tuple[str, MedianStop]] = {}  # mission -> (metric, rule)
        self.attempts: dict[str, int] = {}  # task -> the attempt its curve is from

    def forget(self, mission_id: str) -> None:
        """The sweep has ended: its curves go."""
        if self.rules.pop(mission_id, None) is not None:
            prefix = f"{mission_id}/"
            self.attempts = {t: a for t, a in self.attempts.items() if not t.startswith(prefix)}

    def add(self, mission_id: str, rule: specs.EarlyStop) -> None:
        self.rules[mission_id] = (
            rule.metric,
            MedianStop(goal=rule.goal, after_steps=rule.after_steps, min_trials=rule.min_trials),
        )

    def observe(self, events: list[m.Event], sched: Scheduler, ch: Changes) -> list[tuple[str, int, str]]:
        """Feed the new metric points of current attempts; stop the trials the rule condemns (in
        `ch`). Returns (mission, trial, reason) for each trial stopped."""
        stops = []
        for ev in events:
            if not isinstance(ev, m.Metrics) or ev.mission_id not in self.rules:
                continue
            metric, rule = self.rules[ev.mission_id]
            series, task = ev.series.get(metric), sched.tasks.get(ev.task_id)
            if series is None or task is None or task.trial is None or task.mission_id != ev.mission_id:
                continue
            if ev.attempt != task.attempt:
                continue  # a stale attempt's late points
            group = _group(task)
            if self.attempts.setdefault(task.task_id, ev.attempt) != ev.attempt:  # a retry starts over
                rule.reset(group, task.trial)
                self.attempts[task.task_id] = ev.attempt
            for step, value in zip(series.steps, series.values, strict=True):
                reason = rule.observe(group, task.trial, step, value)
                if reason is not None and sched.stop_trial(task.mission_id, task.trial, reason, ch):
                    stops.append((task.mission_id, task.trial, reason))
        return stops

    def metric(self, mission_id: str) -> str:
        return self.rules[mission_id][0]

    def replay(self, mission_id: str, points: list[dict[str, Any]], sched: Scheduler) -> None:
        """After a restart: the stored points of the mission's current attempts, in time order."""
        _, rule = self.rules[mission_id]
        for p in points:
            task = sched.tasks.get(p["task_id"])
            if task is not None and task.trial is not None:
                self.attempts[task.task_id] = task.attempt
                rule.observe(_group(task), task.trial, int(p["step"]), float(p["value"]))


def _group(task: specs.Task) -> str:
    """The tasks a task's curve is compared with: the same stage, arm and seed in the other trials."""
    return "-".join(str(x) for x in (task.stage, task.arm, task.seed) if x is not None)


def stopped_trials(sched: Scheduler, mission_id: str) -> dict[int, str]:
    """Trial -> why the median rule stopped it (its own tasks' error, not a dependent's)."""
    out: dict[int, str] = {}
    for t in sched.mission_tasks(mission_id):
        if t.state == "stopped" and t.trial is not None and t.error and not t.error.startswith("dependency"):
            out.setdefault(t.trial, t.error)
    return out


def rank(
    mission_id: str, spec: specs.MissionSpec, scores: pd.DataFrame, stopped: dict[int, str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(sweep_trials rows, the missions row's fields): the trials ranked, and a reason naming the
    winner. No verdict: a sweep is never gated."""
    sw = spec.sweep
    assert sw is not None
    ranks = rank_trials(
        scores,
        specs.trials(sw),
        metric=sw.metric,
        arm=sw.arm,
        baseline=sw.baseline,
        goal=sw.goal,
        stopped=stopped,
    )
    now = time.time()
    rows = [
        {
            "mission_id": mission_id,
            "trial": r.trial,
            "params": json.dumps(r.params),
            "rank": r.rank,
            "metric": sw.metric,
            "n": r.n,
            "estimate": r.estimate,
            "ci_low": r.low,
            "ci_high": r.high,
            "level": r.level,
            "stopped": r.stopped or None,
            "note": r.note or None,
            "ranked_at": now,
        }
        for r in ranks
    ]
    return rows, {"verdict": None, "reason": _reason(sw, best(ranks), len(ranks))}


def ranked_by(sw: specs.Sweep) -> str:
    """What the trials are ranked by, in words: `score of b − a`."""
    what = sw.metric if sw.arm is None else f"{sw.metric} of {sw.arm}"
    return what + (f" − {sw.baseline}" if sw.baseline else "")


def _reason(sw: specs.Sweep, winner: TrialRank | None, n: int) -> str:
    if winner is None:
        return f"sweep of {n} trials: no trial has {sw.metric} scores to rank"
    what = ranked_by(sw)
    values = ", ".join(f"{k}={v}" for k, v in winner.params.items())
    return (
        f"sweep of {n} trials, never gated: best is trial {winner.trial} ({values}), {what} "
        f"{winner.estimate:.4g} [{winner.low:.4g}, {winner.high:.4g}]; run it gated on fresh seeds"
    )


def winner(
    spec: specs.MissionSpec, row: dict[str, Any], trials: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The best-ranked trial that ran to its end, with the overrides that run it as a gated mission
    (the sweep's own overrides, then the winner's values) and the command to do so."""
    ranked = [t for t in trials if t["rank"] is not None and not t["stopped"]]
    if not ranked:
        return None
    top = min(ranked, key=lambda t: t["rank"])
    params = json.loads(top["params"])
    overrides = {
        **json.loads(row["overrides"] or "{}"),
        **specs.winner_overrides(spec, row["profile"], params),
    }
    command = f"fleetctl submit {row['name']} --profile {row['profile']} --overrides best.toml"
    return {"trial": top["trial"], "params": params, "overrides": overrides, "command": command}
