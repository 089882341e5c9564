"""The research missions: one folder each, built on `bem.core` (docs/architecture.md).

A mission folder holds its data generators (`data.py`), its metrics (`metrics.py`), the model parts
only it uses, and its recipe (`recipe.py`: `run_*`, split into its phases). `validation` is the
experiment of BEM_SPEC section 5, `mission_a` the agentic router (section 6), `mission_b` the living
model (section 7); Missions C, D and E go in `mission_c`, `mission_d` and `mission_e` the same way.
"""
