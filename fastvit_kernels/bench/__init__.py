"""Benchmarks of fastvit_kernels: `python -m fastvit_kernels.bench` and one module per op or model.

Nothing is imported here, so `python -m fastvit_kernels.bench.<name>` runs its module fresh.
"""
