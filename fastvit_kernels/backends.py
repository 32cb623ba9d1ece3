"""Backend selection shared by every op.

Each op declares its backends once (name, the function that runs it, and `why_not`, which lists
the reasons a backend cannot take given inputs). The same declarations drive dispatch, the error
text when nothing fits, `python -m fastvit_kernels.info` and the tests' parametrisation.

Choosing a backend, strongest first:
  1. `with fastvit_kernels.use_backend("triton"):` (thread- and task-local),
  2. the environment variable FASTVIT_KERNELS_BACKEND=reference|cpu|triton|cuda,
  3. the default order for the inputs' device.
A forced backend that cannot run the inputs raises (it never silently falls back); the default
order takes the first backend that fits.

GPU code that has not passed the test suite on a GPU is not in the default order for CUDA
tensors: it runs only when forced. `VERIFIED_ON_GPU` records what has been verified.
"""

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from fastvit_kernels import _native

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "FASTVIT_KERNELS_BACKEND"

# Backends that have passed the full test suite on a GPU (device name recorded in the README).
# Empty until a GPU run verifies them: on CUDA tensors the reference runs unless one is forced.
VERIFIED_ON_GPU: Dict[str, Sequence[str]] = {}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fastvit_kernels_backend", default=None
)


def _check_name(name: str, where: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"fastvit_kernels: unknown backend {name!r} in {where}; expected one of {BACKEND_NAMES}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for the ops called inside the block (None: back to automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend()")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by use_backend() or the environment variable, if any."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"the environment variable {ENV_VAR}")
    return None


@dataclass
class Backend:
    name: str
    # why_not(*inputs) -> reasons this backend cannot run the inputs ([] when it can).
    why_not: Callable[..., List[str]]
    # load() -> the module holding forward/backward; imported lazily (triton is heavy).
    load: Callable[[], object]


@dataclass
class OpBackends:
    op: str
    backends: Dict[str, Backend] = field(default_factory=dict)
    # Automatic order per device type.
    default_order: Dict[str, Sequence[str]] = field(default_factory=dict)
    # dtypes the native CPU kernel takes. When the automatic choice falls back to the reference
    # for one of them because the extension is missing, warn once: otherwise a broken build is
    # a silent, large slowdown. (The first input is the op's main tensor.)
    native_dtypes: Sequence[object] = ()

    def add(self, backend: Backend) -> None:
        self.backends[backend.name] = backend

    def order_for(self, device_type: str) -> List[str]:
        order = list(self.default_order.get(device_type, ("reference",)))
        if device_type == "cuda":
            verified = [name for name in VERIFIED_ON_GPU.get(self.op, ()) if name in self.backends]
            order = verified + [name for name in order if name not in verified]
        return order

    def reasons(self, *inputs) -> Dict[str, List[str]]:
        """Every backend's reasons for refusing the inputs (for info and error messages)."""
        return {name: b.why_not(*inputs) for name, b in self.backends.items()}

    def select(self, device_type: str, *inputs) -> Backend:
        forced = forced_backend()
        if forced is not None:
            backend = self.backends.get(forced)
            if backend is None:
                raise RuntimeError(f"{self.op}: backend {forced!r} is not implemented for this op")
            reasons = backend.why_not(*inputs)
            if reasons:
                raise RuntimeError(
                    f"{self.op}: the forced backend {forced!r} cannot run these inputs: "
                    + "; ".join(reasons)
                )
            return backend
        tried = {}
        for name in self.order_for(device_type):
            backend = self.backends[name]
            reasons = backend.why_not(*inputs)
            if not reasons:
                if (name == "reference" and device_type == "cpu" and not _native.available()
                        and inputs[0].dtype in self.native_dtypes):
                    _native.warn_fallback(self.op)
                return backend
            tried[name] = reasons
        details = "; ".join(f"{n}: {', '.join(r)}" for n, r in tried.items())
        raise RuntimeError(f"{self.op}: no backend can run these inputs ({details})")
