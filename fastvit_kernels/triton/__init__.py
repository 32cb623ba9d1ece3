"""Triton backends. Submodules import triton; this package itself must not (keeps CPU-only installs importable)."""
