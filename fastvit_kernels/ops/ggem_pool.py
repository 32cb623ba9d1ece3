"""GGeM: group generalized-mean pooling over tokens (docs/ggem_pool.md, "Definition").

Order of this file (the same in every op file):
  1. the public function and its input checks,
  2. the dispatcher ops' schemas and fake implementations (ops/_library.py defines the ops),
  3. the autograd glue,
  4. the backend declarations used for dispatch, errors and `python -m fastvit_kernels.info`.

The math and the backend contract are in `fastvit_kernels/reference/ggem_pool.py`.
"""

import math
from typing import List

import torch
from torch import Tensor

from fastvit_kernels.backends import Backend, standard_backends
from fastvit_kernels.ops._library import DispatcherOps
from fastvit_kernels.reference import ggem_pool as reference

OP_NAME = "ggem_pool"
LAYOUTS = reference.LAYOUTS
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 runs on the reference backend only: it is there for gradcheck and oracles.
DTYPES_WITH_REFERENCE = DTYPES + (torch.float64,)
# Inputs are clamped to >= eps before their logarithm, which the kernels take in float32.
MIN_EPS = 1.1754943508222875e-38


# ---------------------------------------------------------------------------------------------
# 1. Public function
# ---------------------------------------------------------------------------------------------


def ggem_pool(x: Tensor, p: Tensor, *, groups: int, eps: float = 1e-6, layout: str = "contiguous",
              num_prefix_tokens: int = 0) -> Tensor:
    """Group generalized-mean pooling: y[b, c] = (mean_n max(x[b, n, c], eps) ^ p_g) ^ (1 / p_g).

    Args:
        x: [B, N, C] tokens; any strides (a slice of a bigger buffer is read in place).
            float32, bfloat16 or float16 (float64 on the reference backend).
        p: [groups] exponents, one per channel group, all > 0 (in x's dtype or float32).
        groups: number of channel groups G; C must be divisible by G.
        eps: lower clamp of x (> 0).
        layout: "contiguous" (channel c is in group c // (C / G)) or "interleaved" (c % G).
        num_prefix_tokens: leading tokens (cls / register tokens) to skip, in [0, N).

    Returns:
        [B, C] in x's dtype. Differentiable with respect to x and p; accumulation is in float32
        and in the log domain, so large p (10) and x near eps stay finite.
    """
    _check_inputs(x, p, groups, eps, layout, num_prefix_tokens)
    if torch.onnx.is_in_onnx_export():
        # ONNX exporters trace the reference math into standard ONNX operators (docs/patching.md, "ONNX").
        return reference.ggem_pool_stable(x, p, groups, eps, layout, num_prefix_tokens)
    backend = select_backend(x, p)
    y, _ = OPS.forward(backend.name, x, p, int(groups), float(eps), layout == "interleaved", int(num_prefix_tokens))
    return y


def _fail(argument: str, expected: str, given) -> None:
    raise ValueError(f"ggem_pool: {argument} must be {expected}, got {given}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_inputs(x, p, groups, eps, layout, num_prefix_tokens) -> None:
    """Checks that need only metadata, so they also run while torch.compile traces.
    (p > 0 needs p's values: it is checked inside the op, see _check_p_values.)"""
    if not isinstance(x, Tensor):
        _fail("x", "a torch.Tensor", type(x).__name__)
    if x.dim() != 3:
        _fail("x", "3-D [B, N, C]", f"{x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.dtype not in DTYPES_WITH_REFERENCE:
        _fail("x", "of dtype float32, bfloat16 or float16", x.dtype)
    if not _is_int(groups):
        _fail("groups", "an int", type(groups).__name__)
    B, N, C = x.shape
    if groups < 1:
        _fail("groups", ">= 1", groups)
    if C % groups != 0:
        _fail("x.shape[2] (C)", f"divisible by groups={groups}", C)
    if not isinstance(p, Tensor):
        _fail("p", "a torch.Tensor", type(p).__name__)
    if tuple(p.shape) != (groups,):
        _fail("p.shape", f"[groups={groups}]", list(p.shape))
    if p.dtype not in (x.dtype, torch.float32):
        _fail("p.dtype", f"x's dtype {x.dtype} or torch.float32", p.dtype)
    if p.device != x.device:
        _fail("p.device", f"x's device {x.device}", p.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (MIN_EPS <= float(eps) < math.inf):
        _fail("eps", "a finite float >= 1.2e-38 (float32's smallest normal)", repr(eps))
    if layout not in LAYOUTS:
        _fail("layout", f"one of {LAYOUTS}", repr(layout))
    if not _is_int(num_prefix_tokens):
        _fail("num_prefix_tokens", "an int", type(num_prefix_tokens).__name__)
    if not 0 <= num_prefix_tokens < N:
        _fail("num_prefix_tokens", f"in [0, N={N}) (at least one token must be pooled)", num_prefix_tokens)


def _check_p_values(p: Tensor) -> None:
    """Every exponent must be a finite number > 0 (reads p: on CUDA one host synchronisation)."""
    if p.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(p.detach().float()))
    if not (low > 0 and high < math.inf):  # also False for NaN
        raise ValueError(
            f"ggem_pool: every p must be finite and > 0, got values from {low:g} to {high:g}"
        )


# ---------------------------------------------------------------------------------------------
# 2. Dispatcher ops
# ---------------------------------------------------------------------------------------------

# -> (y [B, C], log_mean [B, C] float32)
FORWARD_SCHEMA = (
    "(Tensor x, Tensor p, int groups, float eps, bool interleaved, int num_prefix_tokens) -> (Tensor, Tensor)"
)
# -> (dx [B, N, C] contiguous, dp [groups])
BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor p, Tensor log_mean, int groups, float eps, bool interleaved, "
    "int num_prefix_tokens) -> (Tensor, Tensor)"
)


def _fake_forward(x, p, groups, eps, interleaved, num_prefix_tokens):
    B, _, C = x.shape
    y = x.new_empty(B, C)
    log_mean = x.new_empty(B, C, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return y, log_mean


def _fake_backward(grad_y, x, p, log_mean, groups, eps, interleaved, num_prefix_tokens):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dp = torch.empty_like(p, memory_format=torch.contiguous_format)
    return dx, dp


def _value_checks(x, p, groups, eps, interleaved, num_prefix_tokens):
    """What the Python backends check of the values before running (the C++ kernels check the
    same, with the same message)."""
    _check_p_values(p)


# ---------------------------------------------------------------------------------------------
# 3. Autograd
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, p, groups, eps, interleaved, num_prefix_tokens = inputs
    _, log_mean = output
    ctx.groups = groups
    ctx.eps = eps
    ctx.interleaved = interleaved
    ctx.num_prefix_tokens = num_prefix_tokens
    ctx.save_for_backward(x, p, log_mean)
    ctx.mark_non_differentiable(log_mean)
    ctx.set_materialize_grads(False)  # _backward fills a missing output gradient itself


def _backward(ctx, grad_y, _grad_log_mean):
    x, p, log_mean = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros(log_mean.shape, dtype=x.dtype, device=x.device)
    dx, dp = OPS.backward(
        ctx.backend, grad_y, x, p, log_mean, ctx.groups, ctx.eps, ctx.interleaved, ctx.num_prefix_tokens
    )
    needs = ctx.needs_input_grad
    return dx if needs[0] else None, dp if needs[1] else None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# 4. Backends
# ---------------------------------------------------------------------------------------------


def _native_limits(x, p) -> List[str]:
    reasons = []
    if x.dtype not in DTYPES:
        reasons.append(f"dtype {x.dtype} not in (float32, bfloat16, float16)")
    if p.dtype not in (x.dtype, torch.float32):
        reasons.append(f"p dtype {p.dtype} is neither x's dtype nor float32")
    return reasons


BACKENDS = standard_backends(OP_NAME, reference, DTYPES, _native_limits)
OPS = DispatcherOps(BACKENDS, FORWARD_SCHEMA, BACKWARD_SCHEMA, fake_forward=_fake_forward,
                    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
                    value_checks=_value_checks)


def select_backend(x, p) -> Backend:
    return BACKENDS.select(x.device.type, x, p)
