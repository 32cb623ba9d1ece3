"""DynamicViT masked (keep-policy) attention, fused (docs/policy_attention.md, "Definition").

Order of this file (the same in every op file):
  1. the public function and its input checks,
  2. the dispatcher ops' schemas and fake implementations (ops/_library.py defines the ops),
  3. the autograd glue,
  4. the backend declarations used for dispatch, errors and `python -m fastvit_kernels.info`.

The math and the backend contract are in `fastvit_kernels/reference/policy_attention.py`.
"""

import math
from typing import List, Optional

import torch
from torch import Tensor

from fastvit_kernels.backends import Backend, standard_backends
from fastvit_kernels.ops._library import DispatcherOps
from fastvit_kernels.reference import policy_attention as reference

OP_NAME = "policy_attention"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 runs on the reference backend only: it is there for gradcheck and oracles.
DTYPES_WITH_REFERENCE = DTYPES + (torch.float64,)
# Limits of the native kernels (the reference has none).
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# 1. Public function
# ---------------------------------------------------------------------------------------------


def policy_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    policy: Tensor,
    *,
    scale: Optional[float] = None,
    eps: float = 1e-6,
) -> Tensor:
    """DynamicViT's `softmax_with_policy` attention, fused: the N x N matrix is never formed.

    out_i = (Σ_j A[i, j] v_j + (eps / N) Σ_j v_j) / (Σ_j A[i, j] + eps),
    A[i, j] = exp(S[i, j] − max_j S[i, j]) · (policy[j] if j != i else 1), S = q·kᵀ·scale.

    Args:
        q, k, v: [B, H, N, D] of one dtype (float32, bfloat16, float16; float64 runs on the
            reference). Any strides, e.g. `qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`.
        policy: [B, N] or [B, N, 1] keep decision per token (1 keep, 0 drop), in any float
            dtype; it carries a gradient (DynamicViT's straight-through Gumbel output). Values
            other than 0 / 1 enter the formula linearly. Dropped tokens still see themselves.
        scale: score scale, default D ** -0.5.
        eps: the formula's eps (DynamicViT uses 1e-6), >= 0.

    Returns:
        [B, H, N, D] in q's dtype; its memory is [B, N, H, D] contiguous, so
        `out.transpose(1, 2).reshape(B, N, H * D)` is free. Softmax statistics are float32 for
        every input dtype. Key blocks whose policy is all zero skip the exp / P·V work.
        Differentiable with respect to q, k, v and policy.
    """
    _check_inputs(q, k, v, policy, scale, eps)
    D = q.shape[3]
    scale = float(D ** -0.5) if scale is None else float(scale)
    if torch.onnx.is_in_onnx_export():
        # ONNX exporters trace the reference math into standard ONNX operators (docs/patching.md, "ONNX").
        return reference.policy_attention_eager(q, k, v, policy, scale, eps)
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The kernels read a float32 [B, N] policy; autograd carries dpolicy back through .to().
    policy = policy.reshape(policy.shape[0], policy.shape[1]).to(stat_dtype).contiguous()
    backend = select_backend(q, k, v, policy, scale, eps)
    out, _, _, _ = OPS.forward(backend.name, q, k, v, policy, scale, float(eps))
    return out


def _fail(argument: str, expected: str, given) -> None:
    raise ValueError(f"policy_attention: {argument} must be {expected}, got {given}")


def _check_inputs(q, k, v, policy, scale, eps) -> None:
    """Checks that need only metadata, so they also run while torch.compile traces."""
    for name, t in (("q", q), ("k", k), ("v", v), ("policy", policy)):
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
    if q.dim() != 4:
        _fail("q", "4-D [B, H, N, D]", f"{q.dim()}-D tensor of shape {tuple(q.shape)}")
    if q.dtype not in DTYPES_WITH_REFERENCE:
        _fail("q.dtype", "float32, bfloat16 or float16", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != tuple(q.shape):
            _fail(f"{name}.shape", f"q's shape {tuple(q.shape)} [B, H, N, D]", tuple(t.shape))
        if t.dtype != q.dtype:
            _fail(f"{name}.dtype", f"q's dtype {q.dtype}", t.dtype)
        if t.device != q.device:
            _fail(f"{name}.device", f"q's device {q.device}", t.device)
    B, H, N, D = q.shape
    if any(size < 1 for size in (B, H, N, D)):  # (min() would pin a dynamic batch in torch.export)
        _fail("every dimension of q", ">= 1", tuple(q.shape))
    if not (policy.dim() == 2 or (policy.dim() == 3 and policy.shape[2] == 1)) or tuple(policy.shape[:2]) != (B, N):
        _fail("policy.shape", f"[B, N] = [{B}, {N}] or [B, N, 1]", tuple(policy.shape))
    if not policy.dtype.is_floating_point:
        _fail("policy.dtype", "a floating dtype (it carries a gradient)", policy.dtype)
    if policy.device != q.device:
        _fail("policy.device", f"q's device {q.device}", policy.device)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        _fail("scale", "a finite float or None", repr(scale))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        _fail("eps", "a finite float >= 0", repr(eps))


# ---------------------------------------------------------------------------------------------
# 2. Dispatcher ops
# ---------------------------------------------------------------------------------------------

# -> (out [B, H, N, D] over a [B, N, H, D] buffer, row_max, denom [B, H, N] float32,
#     row_argmax [B, H, N] int32)
FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor policy, float scale, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
)
# -> (dq, dk, dv [B, H, N, D] contiguous, dpolicy [B, N] float32)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor policy, Tensor out, Tensor row_max, Tensor denom, "
    "Tensor row_argmax, float scale, float eps, bool need_dpolicy) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fake_forward(q, k, v, policy, scale, eps):
    B, H, N, D = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(B, N, H, D).transpose(1, 2)
    return (out, q.new_empty(B, H, N, dtype=stat), q.new_empty(B, H, N, dtype=stat),
            q.new_empty(B, H, N, dtype=torch.int32))


def _fake_backward(grad_out, q, k, v, policy, out, row_max, denom, row_argmax, scale, eps, need_dpolicy):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    return grads[0], grads[1], grads[2], torch.empty_like(policy, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# 3. Autograd
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, policy, scale, eps = inputs
    out, row_max, denom, row_argmax = output
    ctx.scale, ctx.eps = scale, eps
    ctx.save_for_backward(q, k, v, policy, out, row_max, denom, row_argmax)
    ctx.mark_non_differentiable(row_max, denom, row_argmax)
    ctx.set_materialize_grads(False)  # _backward fills a missing output gradient itself


def _backward(ctx, grad_out, _grad_max, _grad_denom, _grad_argmax):
    q, k, v, policy, out, row_max, denom, row_argmax = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    needs = ctx.needs_input_grad
    dq, dk, dv, dpolicy = OPS.backward(
        ctx.backend, grad_out, q, k, v, policy, out, row_max, denom, row_argmax, ctx.scale, ctx.eps, bool(needs[3])
    )
    return (
        dq if needs[0] else None,
        dk if needs[1] else None,
        dv if needs[2] else None,
        dpolicy if needs[3] else None,
        None,
        None,
    )


# ---------------------------------------------------------------------------------------------
# 4. Backends
# ---------------------------------------------------------------------------------------------


def _native_limits(q, k, v, policy, scale, eps) -> List[str]:
    reasons = []
    if q.dtype not in DTYPES:
        reasons.append(f"dtype {q.dtype} not in (float32, bfloat16, float16)")
    if q.shape[3] > MAX_HEAD_DIM:
        reasons.append(f"head width {q.shape[3]} > {MAX_HEAD_DIM}")
    return reasons


BACKENDS = standard_backends(OP_NAME, reference, DTYPES, _native_limits)
OPS = DispatcherOps(BACKENDS, FORWARD_SCHEMA, BACKWARD_SCHEMA, fake_forward=_fake_forward,
                    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward)


def select_backend(q, k, v, policy, scale, eps) -> Backend:
    return BACKENDS.select(q.device.type, q, k, v, policy, scale, eps)
