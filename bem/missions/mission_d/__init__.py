"""Mission D, SEP: scramble-equivariant training (BEM_SPEC.md section 9)."""
