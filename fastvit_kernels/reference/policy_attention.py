"""Plain-PyTorch reference for DynamicViT's masked (keep-policy) attention (docs/policy_attention.md, "Definition").

This file is the specification of the op: the test oracle (run it in float64), the fallback
backend when no native kernel fits, and the path that exports because it is ordinary tensor code.

Shapes: q, k, v [B, H, N, D]; policy p [B, N] (1 keeps a token, 0 drops it; any real value is
accepted and enters the formula linearly). With S = (q · kᵀ) · scale, for row i and key j:

    G[b, i, j] = p[b, j] + (1 − p[b, j]) · δ_ij        a token always sees itself
    m_i        = max_j S[i, j]                          over ALL keys, dropped ones included
    E[i, j]    = exp(S[i, j] − m_i)                     fp32 for every input dtype
    A[i, j]    = E[i, j] · G[i, j]
    D_i        = Σ_j A[i, j] + eps
    O_i        = (Σ_j A[i, j] v_j + (eps / N) Σ_j v_j) / D_i

This is `softmax_with_policy` of raoyongming/DynamicViT (P = (A + eps/N) / D, then P @ v),
never forming the N x N matrix P. A −inf-masked softmax is a different function (by up to ~6e-6).

Gradients, with dO the incoming gradient, δ_i = dO_i · O_i and v̄ = (1/N) Σ_j v_j:

    dA[i, j] = (dO_i · v_j − δ_i) / D_i                 ∂L/∂A[i, j]
    dS[i, j] = A[i, j] · dA[i, j] − [j = argmax_i] · eps · (δ_i − dO_i · v̄) / D_i
    dq_i     = scale · Σ_j dS[i, j] k_j,    dk_j = scale · Σ_i dS[i, j] q_i
    dv_j     = Σ_i (A[i, j] / D_i) dO_i + (eps / N) Σ_i dO_i / D_i
    dp[b, j] = Σ_h Σ_{i ≠ j} E[i, j] · dA[i, j]

The argmax term is the gradient through m (the eps terms make O depend on m): it is the
−Σ_k A[i, k] dA[i, k] that autograd of `S − S.max()` sends to the maximising key. It is not
small when every kept key scores far below the max (D_i ≈ eps). dp needs E for dropped keys too
(that is how the score predictor learns to keep a dropped token), so a backward that computes dp
cannot skip dropped key blocks entirely; one that does not can skip their dS and P·dO work.

Backend contract (shared by the reference, the C++ and the Triton backends):
    forward(q, k, v, policy, scale, eps)
        -> out         shape [B, H, N, D] in q's dtype, stored as a [B, N, H, D] contiguous
                       buffer (out.transpose(1, 2) is contiguous: the caller's reshape to
                       [B, N, H·D] is free)
           row_max     [B, H, N] contiguous float32: m_i
           denom       [B, H, N] contiguous float32: D_i
           row_argmax  [B, H, N] contiguous int32: a key j with S[i, j] = m_i
    backward(grad_out, q, k, v, policy, out, row_max, denom, row_argmax, scale, eps, need_dpolicy)
        -> dq, dk, dv  [B, H, N, D] contiguous, in q's dtype
           dpolicy     [B, N] contiguous float32 (all zeros when need_dpolicy is False)
    q, k, v and grad_out may have any strides (views of one fused qkv projection); q, k, v share
    a dtype (float32, bfloat16, float16; float64 on the reference only); policy is float32 and
    contiguous (the op converts it). Statistics and accumulation are float32 (float64 for float64
    inputs). Kernels may skip the exp / P·V work of a key block whose policy is all zero (its
    diagonal entries excepted), since those A[i, j] are zero.
"""

from typing import Tuple

import torch
from torch import Tensor

from fastvit_kernels.reference._outputs import empty_bhnd, new_output


def softmax_with_policy(attn: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's `Attention.softmax_with_policy`: attn [B, H, N, N] scores, policy [B, N] or
    [B, N, 1]; float32 statistics (float64 for float64 scores). Returns the normalised
    [B, H, N, N] matrix in attn's dtype (MaskedTokenAttention applies its dropout to it)."""
    B, H, N, _ = attn.shape
    keep = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=keep.dtype, device=keep.device).view(1, 1, N, N)
    keep = keep + (1.0 - keep) * eye
    attn = attn - attn.max(dim=-1, keepdim=True)[0]
    stat = torch.float64 if attn.dtype == torch.float64 else torch.float32
    out = attn.to(stat).exp() * keep.to(stat)
    out = (out + eps / N) / (out.sum(dim=-1, keepdim=True) + eps)
    return out.to(attn.dtype)


def policy_attention_eager(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float,
                           eps: float = 1e-6) -> Tensor:
    """DynamicViT's own formulation (materialised N x N matrix, autograd through every step):
    the test oracle in float64 and the eager baseline of the benchmarks. Returns [B, H, N, D]."""
    return softmax_with_policy((q @ k.transpose(-2, -1)) * scale, policy, eps) @ v


def _stat_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _keep_matrix(policy: Tensor, N: int, dtype) -> Tensor:
    """G[b, 1, i, j] = p[b, j] off the diagonal, 1 on it."""
    keep = policy.to(dtype)[:, None, None, :].expand(-1, 1, N, N).clone()
    keep.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return keep


def forward(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float,
            eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    acc = _stat_dtype(q)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    row_max, row_argmax = s.max(dim=-1)
    a = torch.exp(s - row_max[..., None]) * _keep_matrix(policy, N, acc)
    denom = a.sum(dim=-1) + eps
    vf = v.to(acc)
    o = (a @ vf + (eps / N) * vf.sum(dim=2, keepdim=True)) / denom[..., None]
    out = empty_bhnd(B, H, N, D, q)
    out.copy_(o)
    return out, row_max.contiguous(), denom.contiguous(), row_argmax.to(torch.int32).contiguous()


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, policy: Tensor, out: Tensor,
             row_max: Tensor, denom: Tensor, row_argmax: Tensor, scale: float, eps: float,
             need_dpolicy: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    acc = _stat_dtype(q)
    qf, kf, vf, go = q.to(acc), k.to(acc), v.to(acc), grad_out.to(acc)
    s = (qf @ kf.transpose(-2, -1)) * scale
    e = torch.exp(s - row_max.to(acc)[..., None])
    a = e * _keep_matrix(policy, N, acc)
    d = denom.to(acc)[..., None]                                   # [B, H, N, 1]
    delta = (go * out.to(acc)).sum(-1, keepdim=True)              # δ_i
    da = (go @ vf.transpose(-2, -1) - delta) / d                  # dA[i, j]
    ds = a * da
    v_mean = vf.mean(dim=2, keepdim=True)                         # [B, H, 1, D]
    correction = eps * (delta - (go * v_mean).sum(-1, keepdim=True)) / d
    ds.scatter_add_(-1, row_argmax.long()[..., None], -correction)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-2, -1) @ qf) * scale
    dv = (a / d).transpose(-2, -1) @ go + (eps / N) * (go / d).sum(dim=2, keepdim=True)
    if need_dpolicy:
        g = e * da
        g.diagonal(dim1=-2, dim2=-1).zero_()                      # G[i, i] does not depend on p
        dpolicy = g.sum(dim=(1, 2)).to(torch.float32 if acc == torch.float32 else acc)
    else:
        dpolicy = torch.zeros(B, N, dtype=policy.dtype, device=q.device)
    outputs = []
    for grad in (dq, dk, dv):
        t = new_output((B, H, N, D), q)
        t.copy_(grad)
        outputs.append(t)
    return outputs[0], outputs[1], outputs[2], dpolicy.contiguous()
