"""The validation experiment (BEM_SPEC.md section 5): can a controller route between two frozen skill
LoRAs? `data`: JSON and summary tasks; `metrics`: per-example scores; `recipe`: `run_validation`."""
