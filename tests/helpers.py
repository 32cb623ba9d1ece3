"""Shared test helpers: which backends can run here, and dtype-aware comparison with an oracle."""

import contextlib
import os
from typing import List

import pytest
import torch

import fastvit_kernels
from fastvit_kernels import _native

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def triton_runs_here() -> List[str]:
    """Reasons the Triton kernels cannot run here ([] when they can, on GPU or in the interpreter)."""
    try:
        from fastvit_kernels.triton import bias_attention as triton_kernels
    except Exception as error:
        return [f"{type(error).__name__}: {error}"]
    x = torch.randn(1, 1, 1, 16, device=DEVICE)
    return triton_kernels.why_not(x, x, x, None, None)


def backend_params(include_reference: bool = True):
    """(backend, cpu ISA, device) triples: every CPU ISA path this machine runs, Triton, reference."""
    params = []
    if include_reference:
        params.append(pytest.param(("reference", None, "cpu"), id="reference"))
        if GPU:
            params.append(pytest.param(("reference", None, "cuda"), id="reference-cuda"))
    if _native.available():
        for isa in _native.native.supported_isas():
            if isa in _native.native.compiled_isas():
                params.append(pytest.param(("cpu", isa, "cpu"), id=f"cpu-{isa}"))
    else:
        params.append(pytest.param(("cpu", None, "cpu"), id="cpu",
                                   marks=pytest.mark.skip(reason=f"native not built: {_native.load_error}")))
    reasons = triton_runs_here()
    params.append(pytest.param(("triton", None, DEVICE), id=f"triton-{DEVICE}",
                               marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))))
    return params


@contextlib.contextmanager
def running_on(backend: str, isa):
    """Force a backend (and for the C++ backend an ISA path) for the block."""
    if isa is not None:
        _native.native.set_cpu_isa(isa)
    try:
        with fastvit_kernels.use_backend(backend):
            yield
    finally:
        if isa is not None:
            _native.native.set_cpu_isa("auto")


def is_interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# Error allowed relative to the largest reference magnitude when PyTorch's own low-precision
# result is not a useful yardstick (e.g. it is exact by chance).
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def assert_matches(name: str, got: torch.Tensor, oracle: torch.Tensor, same_dtype_torch=None, dtype=None) -> None:
    """got vs a float64 oracle. In half precision the error may be up to twice the error that
    plain PyTorch makes in the same dtype (flash-attention's rule), or the dtype's floor.
    dtype: the precision the inputs came in (a float32 result computed from bf16 inputs is
    judged as bf16)."""
    dtype = dtype or got.dtype
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(got).all(), f"{name}: NaN/inf in the result (an element left unwritten?)"
    magnitude = oracle.abs().max().item() or 1.0
    error = (got.double() - oracle).abs().max().item()
    allowed = FLOOR[dtype] * magnitude
    if same_dtype_torch is not None and dtype in (torch.bfloat16, torch.float16):
        allowed = max(allowed, 2 * (same_dtype_torch.double() - oracle).abs().max().item())
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g} (|ref| max {magnitude:.3g})"
