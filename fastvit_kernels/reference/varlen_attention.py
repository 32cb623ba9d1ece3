"""Plain-PyTorch reference for packed variable-length attention (token dropping; docs/varlen_attention.md, "Definition").

This file is the specification of the op: the test oracle (run it in float64) and the fallback
backend when no native kernel fits.

After DynamicViT drops tokens, image b keeps its own number of tokens n_b. The images are packed
without padding: q, k, v [T, H, D] with T = Σ_b n_b, image b in rows
[cu_seqlens[b], cu_seqlens[b + 1]). Every row attends to the rows of its own image only:

    S[i, j] = (q_i · k_j) · scale          i, j in the same segment
    lse_i   = log Σ_j exp(S[i, j])
    O_i     = Σ_j exp(S[i, j] − lse_i) v_j

Gradients (P = exp(S − lse), δ_i = dO_i · O_i):
    dS = P ⊙ (dO · vᵀ − δ),  dq = scale · dS · k,  dk = scale · dSᵀ · q,  dv = Pᵀ · dO

Backend contract (shared by the reference, the C++ and the Triton backends):
    forward(q, k, v, cu_seqlens, max_seqlen, scale)
        -> out  [T, H, D] contiguous, in q's dtype
           lse  [T, H] contiguous float32 (float64 for float64 inputs)
    backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
        -> dq, dk, dv  [T, H, D] contiguous, in q's dtype
    q, k, v, grad_out may have any strides (views of one packed qkv projection); they share a
    dtype (float32, bfloat16, float16; float64 on the reference only). cu_seqlens is int64,
    contiguous, [num_images + 1], starts at 0, strictly increasing, ends at T; max_seqlen is
    max_b n_b (the op checks all of this before a backend runs). Accumulation in float32.
"""

from typing import List, Tuple

import torch
from torch import Tensor

from fastvit_kernels.reference._outputs import new_output


def _segments(cu_seqlens: Tensor) -> List[Tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
            scale: float) -> Tuple[Tensor, Tensor]:
    T, H, D = q.shape
    acc = _acc(q)
    out = new_output((T, H, D), q)
    lse = new_output((T, H), q, dtype=acc)
    for start, end in _segments(cu_seqlens):
        qs, ks, vs = (t[start:end].to(acc).transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        s = (qs @ ks.transpose(-2, -1)) * scale
        row_lse = torch.logsumexp(s, dim=-1)                                     # [H, n]
        out[start:end] = (torch.exp(s - row_lse[..., None]) @ vs).transpose(0, 1)
        lse[start:end] = row_lse.transpose(0, 1)
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             cu_seqlens: Tensor, max_seqlen: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    T, H, D = q.shape
    acc = _acc(q)
    dq, dk, dv = (new_output((T, H, D), q) for _ in range(3))
    for start, end in _segments(cu_seqlens):
        qs, ks, vs, go, os_ = (t[start:end].to(acc).transpose(0, 1) for t in (q, k, v, grad_out, out))
        s = (qs @ ks.transpose(-2, -1)) * scale
        p = torch.exp(s - lse[start:end].to(acc).transpose(0, 1)[..., None])
        delta = (go * os_).sum(-1, keepdim=True)
        ds = p * (go @ vs.transpose(-2, -1) - delta)
        dq[start:end] = ((ds @ ks) * scale).transpose(0, 1)
        dk[start:end] = ((ds.transpose(-2, -1) @ qs) * scale).transpose(0, 1)
        dv[start:end] = (p.transpose(-2, -1) @ go).transpose(0, 1)
    return dq, dk, dv


def varlen_attention_eager(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """Per-image softmax attention with autograd (the tests' oracle): [T, H, D]."""
    outs = []
    for start, end in _segments(cu_seqlens):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        attn = ((qs @ ks.transpose(-2, -1)) * scale).softmax(dim=-1)
        outs.append((attn @ vs).transpose(0, 1))
    return torch.cat(outs, dim=0)
