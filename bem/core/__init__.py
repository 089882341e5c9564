"""The BEM library core (BEM_SPEC.md sections 1-4, 11 and 12): what every mission builds on.

- `layers`: the BEM layer, y = W0·x + s·U·diag(c)·Vᵀ·x; `attach`: sites by role (W_O, W_down).
- `controllers`: codes from context (simple, hierarchical, token); `routing`: the chunk-sticky router;
  `chunked`: the causal chunk-by-chunk forward; `cache`: cache safety and KV-hit.
- `governance`: composition of BEMs on one basis (orthogonality, σ-clamp, trust region);
  `export`: a frozen code as a peft LoRA, BEM checkpoints; `parity`: adapter parameters and FLOPs.
- `models`: offline bases (tiny test models, the demo base); `train`, `generate`, `metrics`: training
  batches and LM loss, greedy decoding, SQuAD-style EM/F1 and chrF.
- `reporter`: how a long job reports (a notebook, the CLI, a fleet worker), phase timings, score files.
- `dryrun`: a recipe's model and adapters on the meta device from a config.json, and its peak memory.
"""
