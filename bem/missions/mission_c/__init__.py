"""Mission C (BEM_SPEC.md section 8): an orthogonal safety basis with a runtime knob, trained under a
Lagrangian and judged on red-team violations that code can count.
`basis`: the safety basis, its residual-stream update, the knob and the orthogonality measures.
"""
