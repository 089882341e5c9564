"""Mission E (BEM_SPEC.md section 10): long memory, with BEM-gated compressive memory and BEM-biased KV
eviction."""
