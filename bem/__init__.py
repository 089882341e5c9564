"""bem: controller-generated low-rank adapters (BEMs) on frozen Hugging Face transformers.

A library first: nothing here imports the fleet, NATS or DuckDB. See BEM_SPEC.md for the maths.
"""
