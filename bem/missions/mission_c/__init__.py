"""Mission C (BEM_SPEC.md section 8): an orthogonal safety basis with a runtime knob, trained under a
Lagrangian and judged on red-team violations that code can count.
`data`: prompts, exact violation predicates and the smoke corpus; `basis`: the safety basis, its
residual-stream update, the knob and the orthogonality measures; `probe`: the constitution score;
`safety`: skill subspaces and the Lagrangian training of the overlays; `baselines`: CAA and the
refusal direction (addition, ablation); `recipe`: `run_mission_c`, every arm on one checkpoint.
"""
