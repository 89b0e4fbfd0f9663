"""Parallelism and memory planning for HARPE runs (tools/plan_parallelism.py)."""
