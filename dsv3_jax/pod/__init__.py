"""Pod-scale planning: compile the real train or decode step for compile-only TPU devices (libtpu on any
machine) and read its memory, FLOPs and collectives. Entry point: `python -m dsv3_jax plan` (see plan.py)."""
