"""The live-versus-shadow judge in Mission B's results: the commands behind docs/missions/mission_b.md.

python docs/missions/mission_b_judge.py recompute .fleet/fleet.duckdb MISSION_ID
    every canary run's judgement, recomputed from the samples the learner stored (fleetd stopped)
python docs/missions/mission_b_judge.py sabotage .fleet/cache/demo-base-HASH OUT_DIR
    the judge alone: a 400-prompt smoke soak, clean and with one update at 1,000x the learning
    rate (prompt 152), the drift monitor and the pass-rate floor set never to fire
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np

from bem.core.reporter import MemoryReporter
from bem.missions.mission_b.recipe import PROFILES, run_mission_b
from stats.canary import judge
from stats.promotion import PromotionRules

SIGNALS = ("kl_per_token", "param_distance", "sigma_max", "probe_drop", "grad_norm")


def recompute(db: str, mission: str) -> None:
    con = duckdb.connect(db, read_only=True)
    rows = con.execute(
        "SELECT split_part(m.task_id, '/', 2), m.step, m.name, list(m.value) FROM metrics m "
        "JOIN tasks t ON t.task_id = m.task_id AND t.attempt = m.attempt "
        "WHERE t.mission_id = ? AND m.name LIKE 'judge/%' GROUP BY ALL ORDER BY ALL",
        [mission],
    ).fetchall()
    runs: dict[tuple[str, int], dict[str, dict[str, list[float]]]] = {}
    for task, step, name, values in rows:
        _, arm, metric = name.split("/")
        runs.setdefault((task, step), {"live": {}, "shadow": {}})[arm][metric] = values
    rules = PromotionRules()  # mission_b.toml's [services.promotion] holds the spec's values
    decisions: dict[str, dict[str, int]] = {}
    shifts: dict[str, list[tuple[float, float, float]]] = {"aggregate": [], "quality": []}
    for (task, _), arms in sorted(runs.items()):
        report = judge(rules.judge, arms["live"], arms["shadow"])
        per = decisions.setdefault(task, {})
        per[report.decision] = per.get(report.decision, 0) + 1
        for m in report.metrics:
            if m.name in shifts and m.ci_low is not None and m.ci_high is not None and m.hl is not None:
                shifts[m.name].append((m.hl, m.ci_low, m.ci_high))
    for task, counts in sorted(decisions.items()):
        print(f"{task}: {counts}")
    for name, vals in shifts.items():
        hl, low, high = (np.array(v) for v in zip(*vals, strict=True))
        print(
            f"{name}: {len(hl)} tested runs; HL shadow - live from {hl.min():+.4f} to {hl.max():+.4f} "
            f"(median {np.median(hl):+.4f}); 98% CI wholly below 0 in {(high < 0).sum()}, "
            f"wholly above 0 in {(low > 0).sum()}"
        )


def sabotage(base: str, out: str) -> None:
    prof = replace(PROFILES["smoke"], soak=400)
    never = [1e9, 1e9, 1e9]
    rules = {
        "drift": {"levels": dict.fromkeys(SIGNALS, never)},
        "gate": {"rollback_below": 0.0, "accept_at": 0.0},
    }
    for at in (None, 152):
        s = run_mission_b(
            base, mode="soak", profile=prof, seed=1, out_dir=Path(out) / f"sabotage-{at}",
            reporter=MemoryReporter(), local_services=True, rules=rules, sabotage_at=at,
        )  # fmt: skip
        print(f"sabotage at {at}: judged {[(j['step'], j['decision']) for j in s['judged']]}")
        for d in s["decisions"]:
            print(f"  {d['service']} {d['decision']} at prompt {d['step']}: {d['reason']}")
        for e in s["events"]:
            shadow, live = e["to"][:12], e["live"][:12]
            print(f"  applied {e['action']} at prompt {e['prompt']}: shadow now {shadow}, live {live}")


if __name__ == "__main__":
    {"recompute": recompute, "sabotage": sabotage}[sys.argv[1]](*sys.argv[2:])
