"""Mission B (BEM_SPEC.md section 7): a living model that learns online behind a drift monitor and a
canary gate. `data`: the prompt stream with injected failures; `metrics`: per-prompt scores and
time-to-fix; `online`: the learner's parts (EWC, replay, checkpoints); `learner`: the shadow learner;
`recipe`: `run_mission_b`. The promotion and rollback rules are `stats.promotion`.

Outside this folder, because the fleet reads them without importing `bem`: the spec
`schemas/missions/mission_b.toml` and the task-kind glue `workers/kinds/mission_b.py`; the write-up is
`docs/missions/mission_b.md`.
"""
