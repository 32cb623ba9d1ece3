"""Backend selection shared by every op.

Each op declares its backends once (name, the function that runs it, and `why_not`, which lists
the reasons a backend cannot take given inputs). The same declarations drive dispatch, the error
text when nothing fits, `python -m fastvit_kernels.info` and the tests' parametrisation.

Choosing a backend, strongest first:
  1. `with fastvit_kernels.use_backend("triton"):` (thread- and task-local),
  2. the environment variable FASTVIT_KERNELS_BACKEND=reference|cpu|triton,
  3. the default order for the inputs' device.
A forced backend that cannot run the inputs raises (it never silently falls back); the default
order takes the first backend that fits.

GPU code that has not passed the test suite on a GPU is not in the default order for CUDA
tensors: it runs only when forced. `VERIFIED_ON_GPU` records what has been verified.
"""

import contextlib
import importlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from fastvit_kernels import _native

BACKEND_NAMES = ("reference", "cpu", "triton")
# The backend whose kernels are registered from C++ (ops/_library.py: the native dispatcher ops).
NATIVE_BACKEND = "cpu"
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
    # load() -> the module holding forward/backward (the backend contract of
    # reference/<op>.py); imported lazily (triton is heavy). None for the native backend, whose
    # kernels are the dispatcher ops <op>_forward / <op>_backward (ops/_library.py).
    load: Optional[Callable[[], object]]


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


_NO_LIMITS: Callable[..., List[str]] = lambda *inputs: []  # noqa: E731


def standard_backends(
    op: str,
    reference: object,
    native_dtypes: Sequence[object],
    native_limits: Callable[..., List[str]] = _NO_LIMITS,
    triton_limits: Optional[Callable[..., List[str]]] = None,
) -> OpBackends:
    """The three backends every op declares the same way; `op` names the C++ kernels
    (`torch.ops.fastvit_kernels.<op>_forward`), the Triton module (`fastvit_kernels.triton.<op>`)
    and the messages.

    The why_not functions take the op's dispatch inputs, the first being its main tensor (its
    device decides). native_limits(*inputs) lists what the C++ kernel cannot take (dtype, sizes);
    triton_limits adds to the Triton module's own why_not (default: native_limits).
    """
    triton_limits = native_limits if triton_limits is None else triton_limits

    def reference_why_not(*inputs) -> List[str]:
        return []

    def cpu_why_not(*inputs) -> List[str]:
        reasons = []
        if inputs[0].device.type != "cpu":
            reasons.append(f"tensors are on {inputs[0].device.type}, the C++ kernel takes CPU tensors")
        if not _native.available():
            reasons.append(f"native extension not built ({_native.load_error})")
        elif not _native.has_kernel(f"{op}_forward"):
            reasons.append(f"the native extension was built without {op} (rebuild it)")
        return reasons + native_limits(*inputs)

    def load_triton():
        return importlib.import_module(f"fastvit_kernels.triton.{op}")

    def triton_why_not(*inputs) -> List[str]:
        try:
            kernels = load_triton()
        except Exception as error:  # triton missing or broken
            return [f"cannot import the Triton kernels ({type(error).__name__}: {error})"]
        return kernels.why_not(*inputs) + triton_limits(*inputs)

    backends = OpBackends(op=op, default_order={"cpu": ("cpu", "reference"), "cuda": ("reference",)},
                          native_dtypes=native_dtypes)
    backends.add(Backend("reference", reference_why_not, lambda: reference))
    backends.add(Backend(NATIVE_BACKEND, cpu_why_not, None))
    backends.add(Backend("triton", triton_why_not, load_triton))
    return backends
