"""Mission B (BEM_SPEC.md section 7): a living model that learns online behind a drift monitor and a
canary gate. `data`: the prompt stream with injected failures; `metrics`: per-prompt scores and
time-to-fix; `online`: the learner's parts (EWC, replay, checkpoints); `learner`: the shadow learner;
`recipe`: `run_mission_b`. The promotion and rollback rules are `stats.promotion`."""
