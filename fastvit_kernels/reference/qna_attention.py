"""Plain-PyTorch reference for QnA learned-query local attention (docs/qna_attention.md, "Definition").

This file is the specification of the op: the test oracle (run it in float64), the fallback
backend when no native kernel fits, and the path that exports because it is ordinary tensor code.

Shapes: cost [B, Hi, Wi, Q, h], v [B, Hi, Wi, h, d], rpe and attn_scale [k*k, Q, h].
Window of output pixel o = (oy, ox): input pixels p_t = o * stride - pad + (ty, tx),
t = ty * k + tx, pad = (k - 1) // 2, Ho = (Hi + 2 * pad - k) // stride + 1 (same for W).

    s[o, q, h, t] = cost[p_t, q, h] + rpe[t, q, h]       only for p_t inside the image:
                                                         out-of-bounds keys are masked, not zeros
    w[o, q, h, t] = softmax_t(s)                         with the per-window max subtracted
    out[o, h, :]  = sum_q sum_t w[o, q, h, t] * attn_scale[t, q, h] * v[p_t, h, :]

Every window holds its centre pixel o * stride (always in bounds), so no softmax is empty.

Backend contract (shared by the reference, the C++ and the Triton backends):
    forward(cost, v, rpe, attn_scale, kernel_size, stride)
        -> out  [B, Ho, Wo, h, d] contiguous, in v's dtype
           lse  [B, Ho, Wo, Q, h] contiguous float32 (float64 for float64 inputs):
                log(sum_t exp(s[o, q, h, t])), the softmax statistics the backward reuses
    backward(grad_out, cost, v, rpe, attn_scale, lse, kernel_size, stride)
        -> dcost        [B, Hi, Wi, Q, h] contiguous, in cost's dtype
           dv           [B, Hi, Wi, h, d] contiguous, in v's dtype
           drpe         [k*k, Q, h] contiguous, in rpe's dtype
           dattn_scale  [k*k, Q, h] contiguous, in attn_scale's dtype
    cost and v may be any strided views (e.g. slices of one fused projection); rpe and
    attn_scale are in cost's dtype or float32. Backward formulas, with g = grad_out[o, h, :]:
        u[o, q, h, t]      = g . v[p_t, h]
        dattn_scale[t,q,h] = sum_o w * u
        ds[o, q, h, t]     = w * (attn_scale * u - D[o, q, h]),  D = sum_t w * attn_scale * u
        dcost[p, q, h]     = sum of ds over the windows (o, t) with p_t = p;  drpe[t] = sum_o ds
        dv[p, h, :]        = sum over the same (o, t) of sum_q w * attn_scale * g
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor



def output_size(size: int, kernel_size: int, stride: int) -> int:
    """Ho (or Wo) for an input of `size` pixels: (size + 2 * pad - k) // stride + 1."""
    pad = (kernel_size - 1) // 2
    return (size + 2 * pad - kernel_size) // stride + 1


def _windows(x: Tensor, kernel_size: int, stride: int, fill: float) -> Tensor:
    """[B, Hi, Wi, *rest] -> [B, Ho, Wo, *rest, k*k]: every output pixel's window, t = ty*k + tx,
    with out-of-bounds positions set to `fill`."""
    pad = (kernel_size - 1) // 2
    rest = x.dim() - 3
    # F.pad pads the last dimensions first: leave `rest` alone, then W, then H.
    x = F.pad(x, (0, 0) * rest + (pad, pad, pad, pad), value=fill)
    # One strided slice per window position (not Tensor.unfold, which the TorchScript ONNX exporter
    # cannot export when the batch size is dynamic).
    rows = (x.shape[1] - kernel_size) // stride * stride + 1  # input rows spanned by the Ho outputs
    cols = (x.shape[2] - kernel_size) // stride * stride + 1
    return torch.stack([x[:, ty:ty + rows:stride, tx:tx + cols:stride]
                        for ty in range(kernel_size) for tx in range(kernel_size)], dim=-1)


def attention_weights(cost: Tensor, rpe: Tensor, kernel_size: int, stride: int) -> Tensor:
    """softmax_t(cost[p_t] + rpe[t]) over in-bounds window positions: [B, Ho, Wo, Q, h, k*k]."""
    scores = _windows(cost, kernel_size, stride, float("-inf")) + rpe.permute(1, 2, 0).to(cost.dtype)
    return scores.softmax(dim=-1)  # subtracts the window max; -inf (outside) gets weight 0


def qna_attention(
    cost: Tensor, v: Tensor, rpe: Tensor, attn_scale: Tensor, kernel_size: int, stride: int = 1
) -> Tensor:
    """The op as differentiable tensor code, in the inputs' dtype (use float64 for an oracle)."""
    weights = attention_weights(cost, rpe, kernel_size, stride)  # [B, Ho, Wo, Q, h, T]
    # Queries share the values: fold attn_scale in and sum over q before touching v.
    mixed = (weights * attn_scale.permute(1, 2, 0).to(cost.dtype)).sum(dim=3)  # [B, Ho, Wo, h, T]
    value_windows = _windows(v, kernel_size, stride, 0.0)  # [B, Ho, Wo, h, d, T]
    return torch.einsum("byxht,byxhdt->byxhd", mixed, value_windows)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- backend contract (half inputs are computed in float32, like the kernels) ----


def forward(cost, v, rpe, attn_scale, kernel_size, stride) -> Tuple[Tensor, Tensor]:
    dtype = _compute_dtype(cost)
    c, vv, r, a = (t.to(dtype) for t in (cost, v, rpe, attn_scale))
    out = qna_attention(c, vv, r, a, kernel_size, stride)
    scores = _windows(c, kernel_size, stride, float("-inf")) + r.permute(1, 2, 0)
    lse = scores.logsumexp(dim=-1)
    return out.to(v.dtype).contiguous(), lse.contiguous()


def _scatter_windows(windows: Tensor, size: Tuple[int, int], kernel_size: int, stride: int) -> Tensor:
    """Adjoint of _windows: [B, Ho, Wo, *rest, k*k] -> [B, Hi, Wi, *rest], summing the
    contributions of every window a pixel belongs to (out-of-bounds positions are dropped)."""
    pad = (kernel_size - 1) // 2
    B, Ho, Wo = windows.shape[:3]
    rest = windows.shape[3:-1]
    padded = windows.new_zeros(B, size[0] + 2 * pad + stride, size[1] + 2 * pad + stride, *rest)
    for ty in range(kernel_size):
        for tx in range(kernel_size):
            rows = slice(ty, ty + stride * (Ho - 1) + 1, stride)
            cols = slice(tx, tx + stride * (Wo - 1) + 1, stride)
            padded[:, rows, cols] += windows[..., ty * kernel_size + tx]
    return padded[:, pad : pad + size[0], pad : pad + size[1]]


def backward(grad_out, cost, v, rpe, attn_scale, lse, kernel_size, stride):
    # Explicit formulas (those of the module docstring): custom-op implementations run below
    # autograd, so this cannot call autograd on the forward.
    dtype = _compute_dtype(cost)
    c, vv, r, a, g = (t.to(dtype) for t in (cost, v, rpe, attn_scale, grad_out))
    size = (cost.shape[1], cost.shape[2])
    weights = attention_weights(c, r, kernel_size, stride)  # [B, Ho, Wo, Q, h, T]
    scale = a.permute(1, 2, 0)  # [Q, h, T]
    value_windows = _windows(vv, kernel_size, stride, 0.0)  # [B, Ho, Wo, h, d, T]
    u = torch.einsum("byxhd,byxhdt->byxht", g, value_windows).unsqueeze(3)  # [B, Ho, Wo, 1, h, T]
    dscale = (weights * u).sum(dim=(0, 1, 2))
    scaled_u = scale * u
    ds = weights * (scaled_u - (weights * scaled_u).sum(dim=-1, keepdim=True))
    drpe = ds.sum(dim=(0, 1, 2))
    dcost = _scatter_windows(ds, size, kernel_size, stride)
    mixed = (weights * scale).sum(dim=3)  # [B, Ho, Wo, h, T]
    dv = _scatter_windows(mixed.unsqueeze(4) * g.unsqueeze(-1), size, kernel_size, stride)
    grads = (dcost, dv, drpe.permute(2, 0, 1), dscale.permute(2, 0, 1))
    return tuple(grad.to(t.dtype).contiguous() for grad, t in zip(grads, (cost, v, rpe, attn_scale)))
