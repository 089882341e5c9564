"""The validation experiment (BEM_SPEC.md section 5): can a controller route between two frozen skill
LoRAs? `data`: JSON and summary tasks; `metrics`: per-example scores; `recipe`: `run_validation`.

Outside this folder, because the fleet reads them without importing `bem`: the spec
`schemas/missions/demo.toml` and the task-kind glue `workers/kinds/demo.py`; the write-up is the
README's Quick start.
"""
