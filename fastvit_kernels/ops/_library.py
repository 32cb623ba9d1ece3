"""The dispatcher ops behind every public op, defined the same way for all five.

Each op `<op>` has two pairs of torch.library ops in the `fastvit_kernels` namespace:

  <op>_forward / <op>_backward                 the C++ CPU kernels: schema and CPU kernel are
                                               registered from C++ (csrc/ops/<op>.cpp) when the
                                               extension loads, so Inductor's C++ wrapper and
                                               AOTInductor call them without Python;
  <op>_forward_python / <op>_backward_python   the same schemas plus a last argument
                                               `str backend` ("reference" or "triton"): the
                                               backends written in Python, on any device.

Python registers the fake (meta) implementations of both pairs and the autograd of the Python
pair; the native pair's autograd is C++ (csrc/ops/<op>.cpp), so a native op never calls back into
Python. The public function (ops/<op>.py) chooses the backend once per call and calls the matching
forward; autograd records which one ran, so the backward runs on the forward's backend even when
the backward happens outside a `use_backend` block or in another thread.
"""

from typing import Callable, Optional, Sequence

import torch

from fastvit_kernels import _native
from fastvit_kernels.backends import NATIVE_BACKEND, OpBackends

NAMESPACE = "fastvit_kernels"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def _with_backend(schema: str) -> str:
    """'(args) -> out' with a last argument `str backend`."""
    head, _, out = schema.rpartition(") ->")
    return f"{head}, str backend) ->{out}"


class DispatcherOps:
    """The forward and backward ops of one op, native and Python (see the module docstring).

    forward(backend, *args) / backward(backend, *args) call the op of `backend` ("cpu" is the
    native pair, any other name the Python pair). overloads(backend) gives the OpOverloads and
    the extra trailing arguments, for opcheck and tests.
    """

    def __init__(self, backends: OpBackends, forward_schema: str, backward_schema: str, *,
                 fake_forward: Callable, fake_backward: Callable, setup_context: Callable,
                 backward: Callable, value_checks: Optional[Callable] = None):
        self.name = backends.op
        self.backends = backends
        self.forward_schema, self.backward_schema = forward_schema, backward_schema
        python_forward, python_backward = f"{self.name}_forward_python", f"{self.name}_backward_python"
        _LIBRARY.define(python_forward + _with_backend(forward_schema))
        _LIBRARY.define(python_backward + _with_backend(backward_schema))

        def run_forward(*args):
            *inputs, backend = args
            if value_checks is not None:  # the C++ kernels check the same values themselves
                value_checks(*inputs)
            return self.backends.backends[backend].load().forward(*inputs)

        def run_backward(*args):
            *inputs, backend = args
            return self.backends.backends[backend].load().backward(*inputs)

        _LIBRARY.impl(python_forward, run_forward, "CompositeExplicitAutograd")
        _LIBRARY.impl(python_backward, run_backward, "CompositeExplicitAutograd")
        ops = getattr(torch.ops, NAMESPACE)
        self.python_forward = getattr(ops, python_forward).default
        self.python_backward = getattr(ops, python_backward).default
        torch.library.register_fake(self.python_forward, lambda *args: fake_forward(*args[:-1]))
        torch.library.register_fake(self.python_backward, lambda *args: fake_backward(*args[:-1]))

        def setup_python(ctx, inputs, output):
            ctx.backend = inputs[-1]
            setup_context(ctx, inputs[:-1], output)

        def backward_python(ctx, *grads):
            return (*backward(ctx, *grads), None)

        torch.library.register_autograd(self.python_forward, backward_python, setup_context=setup_python)

        self.native_forward = self.native_backward = None
        if _native.has_kernel(f"{self.name}_forward"):
            self.native_forward = getattr(ops, f"{self.name}_forward").default
            self.native_backward = getattr(ops, f"{self.name}_backward").default
            # Attributed to the op's module (the caller), which the C++ registration names as the
            # home of the fakes (m.set_python_module in csrc/ops/<op>.cpp).
            torch.library.register_fake(self.native_forward, fake_forward, _stacklevel=2)
            torch.library.register_fake(self.native_backward, fake_backward, _stacklevel=2)
            # Their autograd is C++ too (csrc/ops/<op>.cpp), so that no call of a native op, with
            # grad mode on or off, enters Python: `backward` and `setup_context` serve the Python
            # pair only.

    def overloads(self, backend: str):
        """(forward OpOverload, backward OpOverload, extra trailing arguments) of `backend`."""
        if backend == NATIVE_BACKEND:
            if self.native_forward is None:
                raise RuntimeError(f"{self.name}: the native extension was built without {self.name} (rebuild it)")
            return self.native_forward, self.native_backward, ()
        return self.python_forward, self.python_backward, (backend,)

    def forward(self, backend: str, *args):
        forward, _, extra = self.overloads(backend)
        return forward(*args, *extra)

    def backward(self, backend: str, *args):
        _, backward, extra = self.overloads(backend)
        return backward(*args, *extra)


def all_overloads(ops: Sequence[DispatcherOps]):
    """Every OpOverload the ops define (for FLOP formulas and tests)."""
    for op in ops:
        yield from (op.python_forward, op.python_backward)
        if op.native_forward is not None:
            yield from (op.native_forward, op.native_backward)
