"""Packed variable-length attention for token-dropping inference (docs/varlen_attention.md, "Definition").

Order of this file (the same in every op file):
  1. the public function and its input checks,
  2. the dispatcher ops' schemas and fake implementations (ops/_library.py defines the ops),
  3. the autograd glue,
  4. the backend declarations used for dispatch, errors and `python -m fastvit_kernels.info`.

The math and the backend contract are in `fastvit_kernels/reference/varlen_attention.py`.
"""

import math
from typing import List, Optional

import torch
from torch import Tensor

from fastvit_kernels.backends import Backend, standard_backends
from fastvit_kernels.ops._library import DispatcherOps
from fastvit_kernels.reference import varlen_attention as reference

OP_NAME = "varlen_attention"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 runs on the reference backend only: it is there for gradcheck and oracles.
DTYPES_WITH_REFERENCE = DTYPES + (torch.float64,)
# Limits of the native kernels (the reference has none).
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# 1. Public function
# ---------------------------------------------------------------------------------------------


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    scale: Optional[float] = None,
) -> Tensor:
    """Softmax attention within each image of a packed, unpadded batch.

    Image b owns rows [cu_seqlens[b], cu_seqlens[b + 1]) of q, k, v; its rows attend to its
    own rows only. Images may keep different numbers of tokens (e.g. DynamicViT with a score
    threshold instead of a fixed keep ratio) and nothing is padded.

    Args:
        q, k, v: [T, H, D] of one dtype (float32, bfloat16, float16; float64 runs on the
            reference). Any strides, e.g. `qkv.reshape(T, 3, H, D).unbind(1)`.
        cu_seqlens: [num_images + 1] int32 or int64 on q's device: 0, strictly increasing
            (every image keeps at least one token), last entry T.
        max_seqlen: the longest segment, max_b (cu_seqlens[b + 1] - cu_seqlens[b]), or more.
        scale: score scale, default D ** -0.5.

    Returns:
        [T, H, D] contiguous in q's dtype (so `.reshape(T, H * D)` is free). Differentiable
        with respect to q, k and v. cu_seqlens's values are checked on every call (one host
        sync on CUDA).
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale)
    scale = float(q.shape[2] ** -0.5) if scale is None else float(scale)
    cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
    backend = select_backend(q, k, v, cu_seqlens, max_seqlen, scale)
    out, _ = OPS.forward(backend.name, q, k, v, cu_seqlens, int(max_seqlen), scale)
    return out


def _fail(argument: str, expected: str, given) -> None:
    raise ValueError(f"varlen_attention: {argument} must be {expected}, got {given}")


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale) -> None:
    """Checks that need only metadata, so they also run while torch.compile traces.
    (cu_seqlens's values are checked inside the op, see check_cu_seqlens.)"""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
    if q.dim() != 3:
        _fail("q", "3-D [T, H, D] (packed tokens)", f"{q.dim()}-D tensor of shape {tuple(q.shape)}")
    if q.dtype not in DTYPES_WITH_REFERENCE:
        _fail("q.dtype", "float32, bfloat16 or float16", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != tuple(q.shape):
            _fail(f"{name}.shape", f"q's shape {tuple(q.shape)} [T, H, D]", tuple(t.shape))
        if t.dtype != q.dtype:
            _fail(f"{name}.dtype", f"q's dtype {q.dtype}", t.dtype)
        if t.device != q.device:
            _fail(f"{name}.device", f"q's device {q.device}", t.device)
    T, H, D = q.shape
    if min(T, H, D) < 1:
        _fail("every dimension of q", ">= 1", tuple(q.shape))
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        _fail("cu_seqlens.shape", "[num_images + 1] with at least one image", tuple(cu_seqlens.shape))
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        _fail("cu_seqlens.dtype", "torch.int32 or torch.int64", cu_seqlens.dtype)
    if cu_seqlens.device != q.device:
        _fail("cu_seqlens.device", f"q's device {q.device}", cu_seqlens.device)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        _fail("max_seqlen", "an int >= 1", repr(max_seqlen))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        _fail("scale", "a finite float or None", repr(scale))


def check_cu_seqlens(cu_seqlens: Tensor, total_tokens: int, max_seqlen: int) -> None:
    """The checks that need cu_seqlens's values (run inside the op, at run time)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        _fail("cu_seqlens[0]", "0", bounds[0])
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    for b, length in enumerate(lengths):
        if length < 1:
            _fail("cu_seqlens", "strictly increasing (every image keeps >= 1 token)",
                  f"cu_seqlens[{b}] = {bounds[b]} >= cu_seqlens[{b + 1}] = {bounds[b + 1]}")
    if bounds[-1] != total_tokens:
        _fail("cu_seqlens[-1]", f"the number of packed tokens q.shape[0] = {total_tokens}", bounds[-1])
    if max(lengths) > max_seqlen:
        _fail("max_seqlen", f">= the longest segment ({max(lengths)})", max_seqlen)


# ---------------------------------------------------------------------------------------------
# 2. Dispatcher ops
# ---------------------------------------------------------------------------------------------

# -> (out [T, H, D] contiguous, lse [T, H] float32)
FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor)"
)
# -> (dq, dk, dv), [T, H, D] contiguous
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, int max_seqlen, "
    "float scale) -> (Tensor, Tensor, Tensor)"
)


def _fake_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=stat)


def _fake_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _value_checks(q, k, v, cu_seqlens, max_seqlen, scale):
    """What the Python backends check of the values before running (the C++ kernels check the
    same, with the same messages)."""
    check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)


# ---------------------------------------------------------------------------------------------
# 3. Autograd
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # _backward fills a missing output gradient itself


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = OPS.backward(ctx.backend, grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None)


# ---------------------------------------------------------------------------------------------
# 4. Backends
# ---------------------------------------------------------------------------------------------


def _native_limits(q, k, v, cu_seqlens, max_seqlen, scale) -> List[str]:
    reasons = []
    if q.dtype not in DTYPES:
        reasons.append(f"dtype {q.dtype} not in (float32, bfloat16, float16)")
    if q.shape[2] > MAX_HEAD_DIM:
        reasons.append(f"head width {q.shape[2]} > {MAX_HEAD_DIM}")
    return reasons


BACKENDS = standard_backends(OP_NAME, reference, DTYPES, _native_limits)
OPS = DispatcherOps(BACKENDS, FORWARD_SCHEMA, BACKWARD_SCHEMA, fake_forward=_fake_forward,
                    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
                    value_checks=_value_checks)


def select_backend(q, k, v, cu_seqlens, max_seqlen, scale) -> Backend:
    return BACKENDS.select(q.device.type, q, k, v, cu_seqlens, max_seqlen, scale)
