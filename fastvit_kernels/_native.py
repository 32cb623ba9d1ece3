"""Loads the compiled extension `fastvit_kernels._C` if it was built.

Loading it registers the C++ CPU kernels with PyTorch's dispatcher (csrc/ops/<op>.cpp) as
`torch.ops.fastvit_kernels.<op>_forward` / `_backward` (ops/_library.py adds their fake
implementations and autograd); `kernel(name)` returns one. The module itself holds the build and
CPU ISA functions (cpu_isa, set_cpu_isa, build_info, ...).

A missing or broken native build must never break `import fastvit_kernels`: the ops then run on
the PyTorch reference, and the first call says so once (and `python -m fastvit_kernels.info`
says why).
"""

import importlib
import importlib.util
import warnings
from typing import Optional

import torch

native = None
load_error: Optional[str] = None
if importlib.util.find_spec("fastvit_kernels._C") is None:
    load_error = "fastvit_kernels._C was not built (no compiled extension beside the package)"
else:
    try:
        native = importlib.import_module("fastvit_kernels._C")
    except ImportError as error:  # built against another torch, or missing symbols
        load_error = f"fastvit_kernels._C failed to load: {error}"

_warned = set()


def available() -> bool:
    return native is not None


def has_kernel(name: str) -> bool:
    """Whether the loaded extension registered the C++ kernel `name` (e.g. "bias_attention_forward")."""
    return native is not None and hasattr(torch.ops.fastvit_kernels, name)


def kernel(name: str):
    """The C++ CPU kernel `name` (e.g. "bias_attention_forward"), as a dispatcher op."""
    return getattr(torch.ops.fastvit_kernels, name)


def require_for_script(module: str, name: str) -> None:
    """Raise, naming `module`, unless the C++ kernel `name` that its TorchScript forward calls is loaded."""
    if not has_kernel(name):
        raise RuntimeError(
            f"torch.jit.script of {module} needs the native CPU kernels (TorchScript calls "
            f"torch.ops.fastvit_kernels.{name}), which are not available: {load_error}. Rebuild the "
            "package, or use torch.compile / torch.export instead."
        )


def warn_fallback(op: str) -> None:
    """Warn once per op that the native CPU kernel is missing and the reference runs instead."""
    if op in _warned:
        return
    _warned.add(op)
    warnings.warn(
        f"fastvit_kernels: the native CPU kernels are not available ({load_error}); "
        f"{op} runs on the plain-PyTorch reference (correct, but slow). Rebuild with "
        "`pip install --no-build-isolation -e .` and check `python -m fastvit_kernels.info`.",
        RuntimeWarning,
        stacklevel=3,
    )
