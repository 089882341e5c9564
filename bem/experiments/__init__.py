"""Experiments: recipes that compose the bem components into end-to-end runs (BEM_SPEC §5 onward)."""
