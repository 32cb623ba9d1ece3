"""QnA learned-query local attention (docs/qna_attention.md, "Definition").

Order of this file (the same in every op file):
  1. the public function and its input checks,
  2. the dispatcher ops' schemas and fake implementations (ops/_library.py defines the ops),
  3. the autograd glue,
  4. the backend declarations used for dispatch, errors and `python -m fastvit_kernels.info`.

The math and the backend contract are in `fastvit_kernels/reference/qna_attention.py`.
"""

from typing import List, Optional

import torch
from torch import Tensor

from fastvit_kernels.backends import Backend, standard_backends
from fastvit_kernels.ops._library import DispatcherOps
from fastvit_kernels.reference import qna_attention as reference

OP_NAME = "qna_attention"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 runs on the reference backend only: it is there for gradcheck and oracles.
DTYPES_WITH_REFERENCE = DTYPES + (torch.float64,)
# Limits of the native kernels (the reference has none): windows up to 15x15 (the paper uses
# 3 and 7), heads of up to 256 channels.
MAX_KERNEL_SIZE = 15
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# 1. Public function
# ---------------------------------------------------------------------------------------------


def qna_attention(
    cost: Tensor,
    v: Tensor,
    rpe: Optional[Tensor] = None,
    attn_scale: Optional[Tensor] = None,
    *,
    kernel_size: int,
    stride: int = 1,
) -> Tensor:
    """Local attention of learned queries over k x k windows, summed over the queries.

    out[o, h] = sum_q sum_t softmax_t(cost[p_t, q, h] + rpe[t, q, h]) * attn_scale[t, q, h] * v[p_t, h]
    where p_t = o * stride - pad + t runs over the in-bounds pixels of the window (pad = (k-1)//2).

    Args:
        cost: [B, Hi, Wi, Q, h] score of each learned query (Q queries, h heads) at every pixel,
            i.e. x @ (W_k q̂) computed outside the op (K is never materialised). Any strides.
        v: [B, Hi, Wi, h, d] values. Any strides (e.g. a slice of one fused projection).
        rpe: [k*k, Q, h] relative position bias added to the scores (None: zeros).
        attn_scale: [k*k, Q, h] per-position weights of each query's attention (None: ones).
            rpe and attn_scale are in cost's dtype or float32.
        kernel_size: odd window size k.
        stride: output pixel o reads the window centred on input pixel o * stride.

    Returns:
        [B, Ho, Wo, h, d] contiguous, in v's dtype; Ho = (Hi + 2 * pad - k) // stride + 1.
    """
    _check_inputs(cost, v, rpe, attn_scale, kernel_size, stride)
    kk, Q, H = kernel_size * kernel_size, cost.shape[3], cost.shape[4]
    # Missing parameters become constants: the kernels have a single code path, and these
    # [k*k, Q, h] tensors are tiny next to the activations.
    if rpe is None:
        rpe = torch.zeros(kk, Q, H, dtype=torch.float32, device=cost.device)
    if attn_scale is None:
        attn_scale = torch.ones(kk, Q, H, dtype=torch.float32, device=cost.device)
    if torch.onnx.is_in_onnx_export():
        # ONNX exporters trace the reference math into standard ONNX operators (docs/patching.md, "ONNX").
        return reference.qna_attention(cost, v, rpe, attn_scale, kernel_size, stride)
    backend = select_backend(cost, v, rpe, attn_scale, kernel_size, stride)
    out, _ = OPS.forward(backend.name, cost, v, rpe, attn_scale, int(kernel_size), int(stride))
    return out


def _fail(argument: str, expected: str, given) -> None:
    raise ValueError(f"qna_attention: {argument} must be {expected}, got {given}")


def _check_inputs(cost, v, rpe, attn_scale, kernel_size, stride) -> None:
    """Checks that need only metadata, so they also run while torch.compile traces."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        _fail("kernel_size", "an int", type(kernel_size).__name__)
    if kernel_size < 1 or kernel_size % 2 == 0:
        _fail("kernel_size", "odd and >= 1 (the window is centred on a pixel)", kernel_size)
    if isinstance(stride, bool) or not isinstance(stride, int):
        _fail("stride", "an int", type(stride).__name__)
    if stride < 1:
        _fail("stride", ">= 1", stride)
    for name, t, layout in (("cost", cost, "[B, Hi, Wi, Q, h]"), ("v", v, "[B, Hi, Wi, h, d]")):
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 5:
            _fail(name, f"5-D {layout}", f"{t.dim()}-D tensor of shape {tuple(t.shape)}")
    if cost.dtype not in DTYPES_WITH_REFERENCE:
        _fail("cost", "of dtype float32, bfloat16 or float16", cost.dtype)
    if v.dtype != cost.dtype:
        _fail("v.dtype", f"cost's dtype {cost.dtype}", v.dtype)
    if v.device != cost.device:
        _fail("v.device", f"cost's device {cost.device}", v.device)
    B, Hi, Wi, Q, H = cost.shape
    if tuple(v.shape[:3]) != (B, Hi, Wi):
        _fail("v.shape[:3] (B, Hi, Wi)", f"{(B, Hi, Wi)} as in cost", tuple(v.shape[:3]))
    if v.shape[3] != H:
        _fail("v.shape[3] (heads h)", f"{H} as in cost.shape[4]", v.shape[3])
    # (one comparison per size: min() over symbolic sizes would pin a dynamic batch in torch.export)
    if any(size < 1 for size in (B, Hi, Wi, Q, H, v.shape[4])):
        _fail("every dimension of cost and v", ">= 1", f"cost {tuple(cost.shape)}, v {tuple(v.shape)}")
    expected = [kernel_size * kernel_size, Q, H]
    for name, t in (("rpe", rpe), ("attn_scale", attn_scale)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor or None", type(t).__name__)
        if list(t.shape) != expected:
            _fail(f"{name}.shape", f"[k*k={expected[0]}, Q={Q}, h={H}]", list(t.shape))
        if t.dtype not in (cost.dtype, torch.float32):
            _fail(f"{name}.dtype", f"cost's dtype {cost.dtype} or torch.float32", t.dtype)
        if t.device != cost.device:
            _fail(f"{name}.device", f"cost's device {cost.device}", t.device)


# ---------------------------------------------------------------------------------------------
# 2. Dispatcher ops
# ---------------------------------------------------------------------------------------------

# -> (out [B, Ho, Wo, h, d], lse [B, Ho, Wo, Q, h] float32)
FORWARD_SCHEMA = (
    "(Tensor cost, Tensor v, Tensor rpe, Tensor attn_scale, int kernel_size, int stride) -> (Tensor, Tensor)"
)
# -> (dcost, dv, drpe, dattn_scale)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor cost, Tensor v, Tensor rpe, Tensor attn_scale, Tensor lse, int kernel_size, "
    "int stride) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fake_forward(cost, v, rpe, attn_scale, kernel_size, stride):
    B, Hi, Wi, Q, H = cost.shape
    Ho, Wo = reference.output_size(Hi, kernel_size, stride), reference.output_size(Wi, kernel_size, stride)
    out = v.new_empty(B, Ho, Wo, H, v.shape[4])
    lse = cost.new_empty(B, Ho, Wo, Q, H, dtype=torch.float64 if cost.dtype == torch.float64 else torch.float32)
    return out, lse


def _fake_backward(grad_out, cost, v, rpe, attn_scale, lse, kernel_size, stride):
    return (
        torch.empty_like(cost, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty_like(rpe, memory_format=torch.contiguous_format),
        torch.empty_like(attn_scale, memory_format=torch.contiguous_format),
    )


# ---------------------------------------------------------------------------------------------
# 3. Autograd
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    cost, v, rpe, attn_scale, kernel_size, stride = inputs
    _, lse = output
    ctx.kernel_size = kernel_size
    ctx.stride = stride
    ctx.save_for_backward(cost, v, rpe, attn_scale, lse)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # _backward fills a missing output gradient itself


def _backward(ctx, grad_out, _grad_lse):
    cost, v, rpe, attn_scale, lse = ctx.saved_tensors
    if grad_out is None:
        B, Ho, Wo, Q, H = lse.shape
        grad_out = v.new_zeros(B, Ho, Wo, H, v.shape[4])
    dcost, dv, drpe, dattn_scale = OPS.backward(
        ctx.backend, grad_out, cost, v, rpe, attn_scale, lse, ctx.kernel_size, ctx.stride
    )
    needs = ctx.needs_input_grad
    return (
        dcost if needs[0] else None,
        dv if needs[1] else None,
        drpe if needs[2] else None,
        dattn_scale if needs[3] else None,
        None,
        None,
    )


# ---------------------------------------------------------------------------------------------
# 4. Backends
# ---------------------------------------------------------------------------------------------


def _native_limits(cost, v, rpe, attn_scale, kernel_size, stride) -> List[str]:
    reasons = []
    if cost.dtype not in DTYPES:
        reasons.append(f"dtype {cost.dtype} not in (float32, bfloat16, float16)")
    if kernel_size > MAX_KERNEL_SIZE:
        reasons.append(f"kernel_size {kernel_size} > {MAX_KERNEL_SIZE}")
    if v.shape[4] > MAX_HEAD_DIM:
        reasons.append(f"head width {v.shape[4]} > {MAX_HEAD_DIM}")
    return reasons


BACKENDS = standard_backends(OP_NAME, reference, DTYPES, _native_limits)
OPS = DispatcherOps(BACKENDS, FORWARD_SCHEMA, BACKWARD_SCHEMA, fake_forward=_fake_forward,
                    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward)


def select_backend(cost, v, rpe, attn_scale, kernel_size, stride) -> Backend:
    return BACKENDS.select(cost.device.type, cost, v, rpe, attn_scale, kernel_size, stride)
