"""Mission A (BEM_SPEC.md section 6): an agentic router that sequences skill experts per chunk.
`data`: compositional tasks with gold plans and index swaps; `metrics`: EM/F1 and index-swap
monotonicity; `planner`: the macro-policy, composition, BC and PPO; `recipe`: `run_mission_a`.

Outside this folder, because the fleet reads them without importing `bem`: the spec
`schemas/missions/mission_a.toml` and the task-kind glue `workers/kinds/mission_a.py`; the write-up is
`docs/missions/mission_a.md`.
"""
