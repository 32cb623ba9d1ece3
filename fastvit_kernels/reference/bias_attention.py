"""Plain-PyTorch reference for attention with a learned relative-position bias (docs/bias_attention.md, "Definition").

This file is the specification of the op: the test oracle (run it in float64), the fallback
backend when no native kernel fits, and the path that exports (ONNX, TorchScript) because it is
ordinary tensor code.

Shapes: q [B, H, Nq, Dk], k [B, H, Nk, Dk], v [B, H, Nk, Dv], table [H, T], index [Nq, Nk],
mask [W, Nq, Nk] (B a multiple of W).

    S[b, h, i, j] = (q_i . k_j) * scale + table[h, index[i, j]] + mask[b % W, i, j]
    P = softmax_j(S)
    O = P @ v
    out = activation(O)          # activation is None, hardswish or silu

Backend contract (shared by the reference, the C++ and the Triton backends; the arguments are
the op schema's, passed on unchanged — activation is the string "none", "hardswish" or "silu"):
    forward(q, k, v, table, index, mask, scale, activation, save_pre_activation)
        -> out     [B, H, Nq, Dv] in q's dtype, memory laid out [B, Nq, H, Dv]
           o_pre   same layout, the output before the activation; a 0-element tensor unless
                   activation is not "none" and save_pre_activation is True
           lse     [B, H, Nq] float32, log(sum_j exp(S[i, j])): the softmax statistics
    backward(grad_out, q, k, v, table, index, mask, o_pre, lse, scale, activation)
        -> dq, dk, dv  shaped like q, k, v, memory laid out [B, N, H, D]
           dtable      [H, T] in table's dtype (a 0-element tensor when table is None); the mask
                       gets no gradient
       o_pre is the forward's output before the activation (the forward's `out` when no activation).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit_kernels.reference._outputs import empty_bhnd

def gather_bias(table: Tensor, index: Tensor) -> Tensor:
    """table[h, index[i, j]] as a dense [H, Nq, Nk] tensor."""
    return table[:, index]


def add_mask(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    """scores [B, H, Nq, Nk] + mask[b % W] for each b (mask [W, Nq, Nk]; windows of one image are
    consecutive in the batch, as Swin lays them out)."""
    if mask is None:
        return scores
    B, H, Nq, Nk = scores.shape
    W = mask.shape[0]
    return (scores.reshape(B // W, W, H, Nq, Nk) + mask.to(scores.dtype)[:, None]).reshape(B, H, Nq, Nk)


def bias_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Optional[Tensor] = None,
    index: Optional[Tensor] = None,
    scale: Optional[float] = None,
    activation: Optional[str] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """The op as differentiable tensor code, in the inputs' dtype (use float64 for an oracle)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    if table is not None:
        scores = scores + gather_bias(table, index).to(scores.dtype)
    scores = add_mask(scores, mask)
    return activate(scores.softmax(dim=-1) @ v, activation)


# Activation names of the backend contract (the public function's None is "none").
ACTIVATIONS = ("none", "hardswish", "silu")


def _check_activation(activation: Optional[str]) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"bias_attention: activation must be one of {ACTIVATIONS}, got {activation!r}")


def activate(x: Tensor, activation: Optional[str]) -> Tensor:
    """The epilogue: x (None or "none"), hardswish(x) or silu(x) = x · sigmoid(x)."""
    _check_activation(activation)
    if activation == "hardswish":
        return F.hardswish(x)
    if activation == "silu":
        return F.silu(x)
    return x


def hardswish_grad(x: Tensor) -> Tensor:
    """d hardswish(x) / dx = 0 below -3, 1 above 3, (2x + 3) / 6 between (PyTorch's convention)."""
    return torch.where(x < -3, 0.0, torch.where(x > 3, 1.0, (2 * x + 3) / 6))


def silu_grad(x: Tensor) -> Tensor:
    """d silu(x) / dx = s · (1 + x · (1 − s)) with s = sigmoid(x)."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Optional[Tensor],
    index: Optional[Tensor],
    mask: Optional[Tensor],
    scale: float,
    activation: str,
    save_pre_activation: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backend forward: fp32 math for every input dtype (float64 stays float64)."""
    _check_activation(activation)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, Nq, _ = q.shape
    Dv = v.shape[-1]
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if table is not None:
        scores = scores + gather_bias(table, index).to(acc)
    scores = add_mask(scores, mask)
    lse = torch.logsumexp(scores, dim=-1)
    o = torch.exp(scores - lse[..., None]) @ v.to(acc)
    out = empty_bhnd(B, H, Nq, Dv, q)
    out.copy_(activate(o, activation))
    o_pre = q.new_empty(0)
    if activation != "none" and save_pre_activation:
        o_pre = empty_bhnd(B, H, Nq, Dv, q)
        o_pre.copy_(o)
    return out, o_pre, lse.to(torch.float32) if acc == torch.float32 else lse


def backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Optional[Tensor],
    index: Optional[Tensor],
    mask: Optional[Tensor],
    o_pre: Tensor,
    lse: Tensor,
    scale: float,
    activation: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backend backward, written out (the kernels implement these same formulas)."""
    _check_activation(activation)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, Nq, Dk = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    qa, ka, va, o = q.to(acc), k.to(acc), v.to(acc), o_pre.to(acc)
    do = grad_out.to(acc)
    if activation == "hardswish":
        do = do * hardswish_grad(o)
    elif activation == "silu":
        do = do * silu_grad(o)
    scores = (qa @ ka.transpose(-2, -1)) * scale
    if table is not None:
        scores = scores + gather_bias(table, index).to(acc)
    scores = add_mask(scores, mask)
    # P from the scores' own softmax, not exp(scores - lse): an fp32 lse of magnitude ~30 carries
    # ~1e-6 of rounding into every P (docs/bias_attention.md, "Backward"). lse is unused here.
    p = torch.softmax(scores, dim=-1)
    dv = p.transpose(-2, -1) @ do
    dp = do @ va.transpose(-2, -1)
    # delta = rowsum(P * dP) (= dO · O): from the same P and dP, so dP - delta keeps its accuracy
    # when a row of P is nearly one-hot (docs/bias_attention.md, "Backward").
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ ka) * scale
    dk = (ds.transpose(-2, -1) @ qa) * scale
    if table is not None:
        dtable = torch.zeros(table.shape, dtype=acc, device=q.device)
        dtable.index_add_(1, index.reshape(-1).long(), ds.sum(0).reshape(H, -1))
        dtable = dtable.to(table.dtype)
    else:
        dtable = q.new_empty(0)
    grads = []
    for g, n, d in ((dq, Nq, Dk), (dk, Nk, Dk), (dv, Nk, Dv)):
        t = empty_bhnd(B, H, n, d, q)
        t.copy_(g)
        grads.append(t)
    return grads[0], grads[1], grads[2], dtable
