"""Triton kernels for DynamicViT's masked keep-policy attention (docs/policy_attention.md, "Definition").

Math and backend contract: `fastvit_kernels/reference/policy_attention.py`. In short, per (b, h),
with S = q kᵀ · scale and G[i, j] = p[j] off the diagonal, 1 on it:
    m_i = max_j S[i, j] (ALL keys),  A = exp(S − m) ⊙ G,  D_i = Σ_j A[i, j] + eps,
    O_i = (Σ_j A[i, j] v_j + (eps / N) Σ_j v_j) / D_i.

Kernels (q, k, v, grad_out and out are read through their strides, so per-head views of a fused
qkv projection need no copy; policy is contiguous fp32 [B, N]):
  _fwd_kernel        one program per (query block, b·h). Online max over every key block (the max
                     and its argmax include dropped keys); rescaled running sums. A key block whose
                     policy is all zero and that holds none of the block's diagonal entries only
                     updates the max: its exp / A·V work is skipped (its A is zero). The sums run
                     relative to a second running max over the kept entries only (folded in at the
                     end), so half-precision A·V keeps its precision when every kept key scores far
                     below the max. Σ_j v_j comes from torch (v.sum in fp32, [B, H, D]).
  _bwd_pre_kernel    per (query block, b·h): δ_i = dO_i · O_i, the argmax correction
                     c_i = eps (δ_i − dO_i · v̄) / D_i, and this block's partial Σ_i dO_i / D_i
                     ([B·H, num_m, D], summed over blocks in torch: deterministic).
  _bwd_dq_kernel     per (query block, b·h), over key blocks: dq_i = scale (Σ_j A dA k_j − c_i k_{argmax_i});
                     zero-policy off-diagonal key blocks are skipped (A = 0 there); the
                     correction is one gathered row of k per query.
  _bwd_dkdv_kernel   per (key block, b·h), over query blocks (keys on rows, no transposes):
                     dv, dk (with the correction scattered as −c_i at row argmax_i, no atomics),
                     and with NEED_DP a per-head dpolicy partial Σ_{i≠j} E dA ([B, H, N], summed
                     over heads in torch). Without NEED_DP, a (key block, query block) pair whose
                     policy is all zero off the diagonal is skipped unless one of the queries'
                     argmax falls in the key block (then only the correction's q dot runs).
Every output element has one writer and every sum has a fixed order: results are reproducible.

Statistics and accumulators are fp32. For fp32 inputs the dots use input_precision="ieee"; for
half inputs the dots take half operands (A, dS rounded to the input dtype, as flash-attention
does), except bf16 under the interpreter (its bf16 tl.dot is wrong), which runs in fp32.
Block sizes are powers of two >= 16 (the GPU's minimum dot size); padding is masked, so any
N >= 1 and any head width up to 256 (non-powers of two padded) run.
"""

import itertools
from typing import Iterator, List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastvit_kernels.triton._common import (
    FLOAT_DTYPES, SEQ_LENGTHS, CompileVariant, device_reasons, dot, dtype_reasons, fp32_dots, head_widths, meta,
    pow2, recorded_launches,
)

from fastvit_kernels.reference._outputs import empty_bhnd, new_output

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------




@triton.jit
def _fwd_kernel(
    Q, K, V, P, VSUM, OUT, MAX, DEN, ARG,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    H, N, D: tl.constexpr, scale, eps,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    tl.static_assert(BM >= 16)
    tl.static_assert(BN >= 16)
    tl.static_assert(BD >= 16)
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BM)
    pid_m = pid % num_m
    bh = (pid // num_m).to(tl.int64)
    b = bh // H
    h = bh % H

    q_lo = pid_m * BM
    q_hi = tl.minimum(q_lo + BM, N)
    offs_m = q_lo + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_mask = offs_m < N
    d_mask = offs_d < D

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    p_base = P + b * N

    m_i = tl.full([BM], float("-inf"), tl.float32)   # max over all keys (the contract's m)
    mk_i = tl.full([BM], float("-inf"), tl.float32)  # max over the kept entries (G != 0)
    l_i = tl.zeros([BM], tl.float32)                 # Σ A, relative to mk_i
    arg = tl.zeros([BM], tl.int32)
    acc = tl.zeros([BM, BD], tl.float32)             # Σ A v, relative to mk_i
    for start_n in range(0, N, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_mask = offs_n < N
        kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = dot(q, kt, IEEE) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # The max runs over every key, dropped ones included; the first maximiser wins.
        b_max = tl.max(s, 1)
        b_arg = tl.argmax(s, 1).to(tl.int32) + start_n
        arg = tl.where(b_max > m_i, b_arg, arg)
        m_i = tl.maximum(m_i, b_max)
        p = tl.load(p_base + offs_n, mask=n_mask, other=0.0)
        has_diag = (start_n < q_hi) & (start_n + BN > q_lo)
        work = (tl.max(tl.abs(p), 0) > 0.0) | has_diag
        if work:  # otherwise A = 0 on the whole tile: only the max above
            g = tl.where(offs_m[:, None] == offs_n[None, :], 1.0, p[None, :])
            sk = tl.where((g != 0.0) & n_mask[None, :], s, float("-inf"))
            mk_new = tl.maximum(mk_i, tl.max(sk, 1))
            mk_safe = tl.where(mk_new == float("-inf"), 0.0, mk_new)  # row without kept keys yet
            alpha = tl.exp(mk_i - mk_safe)
            a = tl.exp(sk - mk_safe[:, None]) * g  # |a| <= |g|: no fp16 / bf16 underflow
            l_i = l_i * alpha + tl.sum(a, 1)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            acc = acc * alpha[:, None] + dot(a.to(v.dtype), v, IEEE)
            mk_i = mk_new

    # The sums run relative to the kept max mk (the diagonal is always kept, so it is finite), so
    # A rounded to a half dtype for the dot keeps its precision even when every kept key scores
    # far below the overall max m; fold the factor exp(mk - m) in at the end.
    f = tl.exp(mk_i - m_i)
    den = l_i * f + eps
    vsum = tl.load(VSUM + bh * D + offs_d, mask=d_mask, other=0.0)
    o = (acc * f[:, None] + (eps / N) * vsum[None, :]) / den[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
             o.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(MAX + bh * N + offs_m, m_i, mask=m_mask)
    tl.store(DEN + bh * N + offs_m, den, mask=m_mask)
    tl.store(ARG + bh * N + offs_m, arg, mask=m_mask)


@triton.jit
def _bwd_pre_kernel(
    GO, OUT, VSUM, DEN, DELTA, CORR, WPART,
    s_gb, s_gh, s_gn, s_gd,
    s_ob, s_oh, s_on, s_od,
    H, N, D: tl.constexpr, eps,
    BM: tl.constexpr, BD: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BM)
    pid_m = pid % num_m
    bh = (pid // num_m).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_mask = offs_m < N
    d_mask = offs_d < D
    mask = m_mask[:, None] & d_mask[None, :]
    g = tl.load(GO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd,
                mask=mask, other=0.0).to(tl.float32)
    o = tl.load(OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
                mask=mask, other=0.0).to(tl.float32)
    den = tl.load(DEN + bh * N + offs_m, mask=m_mask, other=1.0)
    v_mean = tl.load(VSUM + bh * D + offs_d, mask=d_mask, other=0.0) / N
    delta = tl.sum(g * o, 1)
    corr = eps * (delta - tl.sum(g * v_mean[None, :], 1)) / den
    tl.store(DELTA + bh * N + offs_m, delta, mask=m_mask)
    tl.store(CORR + bh * N + offs_m, corr, mask=m_mask)
    tl.store(WPART + (bh * num_m + pid_m) * D + offs_d, tl.sum(g / den[:, None], 0), mask=d_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, P, GO, MAX, DEN, ARG, DELTA, CORR, DQ,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    H, N, D: tl.constexpr, scale,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    tl.static_assert(BM >= 16)
    tl.static_assert(BN >= 16)
    tl.static_assert(BD >= 16)
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BM)
    pid_m = pid % num_m
    bh = (pid // num_m).to(tl.int64)
    b = bh // H
    h = bh % H

    q_lo = pid_m * BM
    q_hi = tl.minimum(q_lo + BM, N)
    offs_m = q_lo + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_mask = offs_m < N
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=md_mask, other=0.0)
    do = tl.load(GO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd,
                 mask=md_mask, other=0.0).to(q.dtype)
    row_max = tl.load(MAX + bh * N + offs_m, mask=m_mask, other=0.0)
    inv_den = 1.0 / tl.load(DEN + bh * N + offs_m, mask=m_mask, other=1.0)
    delta = tl.load(DELTA + bh * N + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    p_base = P + b * N

    dq = tl.zeros([BM, BD], tl.float32)
    for start_n in range(0, N, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_mask = offs_n < N
        p = tl.load(p_base + offs_n, mask=n_mask, other=0.0)
        has_diag = (start_n < q_hi) & (start_n + BN > q_lo)
        work = (tl.max(tl.abs(p), 0) > 0.0) | has_diag
        if work:  # otherwise A = 0 on the whole tile: only the correction below remains
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * s_vn + offs_d[:, None] * s_vd,
                         mask=n_mask[None, :] & d_mask[:, None], other=0.0)
            s = dot(q, tl.trans(k), IEEE) * scale
            e = tl.where(n_mask[None, :], tl.exp(s - row_max[:, None]), 0.0)
            a = e * tl.where(offs_m[:, None] == offs_n[None, :], 1.0, p[None, :])
            da = (dot(do, vt, IEEE) - delta[:, None]) * inv_den[:, None]
            dq += dot((a * da).to(q.dtype), k, IEEE)

    # Gradient through the row max: dS[i, argmax_i] -= c_i, i.e. dq_i -= c_i k_{argmax_i}.
    corr = tl.load(CORR + bh * N + offs_m, mask=m_mask, other=0.0)
    am = tl.load(ARG + bh * N + offs_m, mask=m_mask, other=0)
    k_arg = tl.load(k_base + am[:, None] * s_kn + offs_d[None, :] * s_kd, mask=md_mask, other=0.0)
    dq = (dq - corr[:, None] * k_arg.to(tl.float32)) * scale
    tl.store(DQ + (bh * N + offs_m[:, None]) * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, P, GO, MAX, DEN, ARG, DELTA, CORR, W, DK, DV, DP_PART,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    H, N, D: tl.constexpr, scale, eps,
    NEED_DP: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    tl.static_assert(BM >= 16)
    tl.static_assert(BN >= 16)
    tl.static_assert(BD >= 16)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_n = pid % num_n
    bh = (pid // num_n).to(tl.int64)
    b = bh // H
    h = bh % H

    k_lo = pid_n * BN
    k_hi = tl.minimum(k_lo + BN, N)
    offs_n = k_lo + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    n_mask = offs_n < N
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]

    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=nd_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=nd_mask, other=0.0)
    p = tl.load(P + b * N + offs_n, mask=n_mask, other=0.0)
    any_kept = tl.max(tl.abs(p), 0) > 0.0
    q_base = Q + b * s_qb + h * s_qh
    do_base = GO + b * s_gb + h * s_gh
    row_base = bh * N

    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    dp = tl.zeros([BN], tl.float32)
    for start_m in range(0, N, BM):
        offs_m = start_m + tl.arange(0, BM)
        m_mask = offs_m < N
        am = tl.load(ARG + row_base + offs_m, mask=m_mask, other=-1)
        corr = tl.load(CORR + row_base + offs_m, mask=m_mask, other=0.0)
        in_blk = (am >= k_lo) & (am < k_hi)
        has_arg = tl.max(in_blk.to(tl.int32), 0) > 0
        if NEED_DP:  # dpolicy needs E for every key, dropped ones too
            work = start_m >= 0
        else:
            has_diag = (start_m < k_hi) & (start_m + BM > k_lo)
            work = any_kept | has_diag
        if work | has_arg:
            q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            # dS[i, argmax_i] -= c_i (the gradient through the row max), keys on rows.
            dst = tl.where(am[None, :] == offs_n[:, None], -corr[None, :], 0.0)
            if work:
                do = tl.load(do_base + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd,
                             mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
                row_max = tl.load(MAX + row_base + offs_m, mask=m_mask, other=0.0)
                inv_den = 1.0 / tl.load(DEN + row_base + offs_m, mask=m_mask, other=1.0)
                delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
                st = dot(k, tl.trans(q), IEEE) * scale
                et = tl.where(n_mask[:, None] & m_mask[None, :],
                              tl.exp(st - row_max[None, :]), 0.0)
                is_diag = offs_n[:, None] == offs_m[None, :]
                at = et * tl.where(is_diag, 1.0, p[:, None])
                dat = (dot(v, tl.trans(do), IEEE) - delta[None, :]) * inv_den[None, :]
                dst += at * dat
                dv += dot((at * inv_den[None, :]).to(q.dtype), do, IEEE)
                if NEED_DP:
                    dp += tl.sum(tl.where(is_diag, 0.0, et * dat), 1)
            dk += dot(dst.to(q.dtype), q, IEEE)

    w = tl.load(W + bh * D + offs_d, mask=d_mask, other=0.0)  # Σ_i dO_i / D_i
    dv += (eps / N) * w[None, :]
    dk = dk * scale
    out_off = (row_base + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=nd_mask)
    if NEED_DP:
        tl.store(DP_PART + row_base + offs_n, dp, mask=n_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_MAX_HEAD_DIM = 256




def _config(kernel: str, N: int, bd: int, dtype: torch.dtype) -> dict:
    """Block sizes (BM query rows, BN key rows) and launch options for 'fwd', 'dq' or 'dkdv'.

    From ptxas register/spill reports for sm_80 and sm_90 (no timings yet; the kernels were never
    run on a GPU). fp32 dots run on FMA units with ieee precision: 32×32 tiles, two stages;
    16×16 for 256-wide heads. Half precision: 64×32 (32×64 for dk/dv, whose loop streams
    queries); 32×32 for dq at widths 128 and up, and for everything at 256.
    """
    if dtype == torch.float32:
        if bd >= 256:
            bm, bn, warps = 16, 16, 4
        else:
            bm, bn, warps = 32, 32, 8 if bd >= 64 else 4
    elif bd >= 256:
        bm, bn, warps = 32, 32, 8
    elif kernel == "dkdv":
        bm, bn, warps = 32, 64, 4 if bd < 128 else 8
    elif kernel == "dq" and bd >= 128:
        bm, bn, warps = 32, 32, 4
    else:
        bm, bn, warps = 64, 32, 4 if bd < 128 else 8
    bm, bn = pow2(N, bm), pow2(N, bn)
    if dtype == torch.float32:
        stages = 2
    else:
        stage_bytes = (bm if kernel == "dkdv" else bn) * 2 * bd * 2
        stages = 3 if 3 * stage_bytes <= 64 * 1024 else (2 if 2 * stage_bytes <= 64 * 1024 else 1)
    return {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}




def _v_sum(v: Tensor) -> Tensor:
    """Σ_j v_j per (b, h) in fp32, contiguous [B, H, D]."""
    return v.sum(dim=2, dtype=torch.float32).contiguous()


def forward(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float,
            eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    out = empty_bhnd(B, H, N, D, q)
    row_max = new_output((B, H, N), q, dtype=torch.float32)
    denom = new_output((B, H, N), q, dtype=torch.float32)
    row_argmax = torch.empty((B, H, N), dtype=torch.int32, device=q.device)
    if B * H * N == 0:
        return out, row_max, denom, row_argmax
    policy = policy.to(torch.float32).contiguous()
    vsum = _v_sum(v)
    bd = pow2(D)
    cfg = _config("fwd", N, bd, q.dtype)
    grid = (triton.cdiv(N, cfg["BM"]) * B * H,)
    _fwd_kernel[grid](
        q, k, v, policy, vsum, out, row_max, denom, row_argmax,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, D, float(scale), float(eps),
        IEEE=fp32_dots(q.dtype), BD=bd, **cfg,
    )
    return out, row_max, denom, row_argmax


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, policy: Tensor, out: Tensor,
             row_max: Tensor, denom: Tensor, row_argmax: Tensor, scale: float, eps: float,
             need_dpolicy: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    dq, dk, dv = (new_output((B, H, N, D), q) for _ in range(3))
    dpolicy = torch.zeros((B, N), dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return dq, dk, dv, dpolicy
    if grad_out.dtype != q.dtype:  # the dots and delta must see the same dO
        grad_out = grad_out.to(q.dtype)
    policy = policy.to(torch.float32).contiguous()
    row_max = row_max.to(torch.float32).contiguous()
    denom = denom.to(torch.float32).contiguous()
    row_argmax = row_argmax.to(torch.int32).contiguous()
    vsum = _v_sum(v)
    bd = pow2(D)
    ieee = fp32_dots(q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)

    # 1. δ, the argmax correction c, and Σ_i dO_i / D_i (per-block partials, summed in order).
    bm_pre = pow2(N, 64)
    num_m_pre = triton.cdiv(N, bm_pre)
    delta = torch.empty((B, H, N), **f32)
    corr = torch.empty((B, H, N), **f32)
    w_part = torch.empty((B * H, num_m_pre, D), **f32)
    _bwd_pre_kernel[(num_m_pre * B * H,)](
        grad_out, out, vsum, denom, delta, corr, w_part,
        *grad_out.stride(), *out.stride(),
        H, N, D, float(eps),
        BM=bm_pre, BD=bd, num_warps=4 if bd < 128 else 8,
    )
    w = w_part.sum(1).contiguous()

    # 2. dq.
    cfg = _config("dq", N, bd, q.dtype)
    _bwd_dq_kernel[(triton.cdiv(N, cfg["BM"]) * B * H,)](
        q, k, v, policy, grad_out, row_max, denom, row_argmax, delta, corr, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
        H, N, D, float(scale),
        IEEE=ieee, BD=bd, **cfg,
    )

    # 3. dk, dv, and per-head dpolicy partials.
    need_dp = bool(need_dpolicy)
    dp_part = torch.empty((B, H, N), **f32) if need_dp else delta  # dummy, never written
    cfg = _config("dkdv", N, bd, q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(N, cfg["BN"]) * B * H,)](
        q, k, v, policy, grad_out, row_max, denom, row_argmax, delta, corr, w, dk, dv, dp_part,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
        H, N, D, float(scale), float(eps),
        NEED_DP=need_dp, IEEE=ieee, BD=bd, **cfg,
    )
    if need_dp:
        dpolicy = dp_part.sum(1).contiguous()
    return dq, dk, dv, dpolicy


def compile_variants() -> Iterator[CompileVariant]:
    """Every kernel configuration forward and backward launch, recorded on meta tensors: each
    dtype; head widths D of every padded width 16..256 (_MAX_HEAD_DIM), both D = pow2(D) and a
    narrower D (3/4 of it: D is a constexpr, and the padding masks fold away when D = pow2(D));
    N of SEQ_LENGTHS (every block size _config can choose); backward with and without dpolicy.
    q, k, v are laid out as MaskedTokenAttention passes them: views of one qkv projection
    [B, N, 3, H, D]; policy [B, N] in float32."""
    with recorded_launches() as variants:
        for dtype, width, N in itertools.product(FLOAT_DTYPES, head_widths(_MAX_HEAD_DIM),
                                                 SEQ_LENGTHS):
            for D in (width, width * 3 // 4):
                B, H = 2, 3
                q, k, v = meta(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
                policy = meta(B, N)
                out, row_max, denom, row_argmax = forward(q, k, v, policy, 0.125, 1e-6)
                for need_dpolicy in (False, True):
                    backward(out, q, k, v, policy, out, row_max, denom, row_argmax, 0.125, 1e-6,
                             need_dpolicy)
    yield from variants


# ---------------------------------------------------------------------------------------------
# Capability check
# ---------------------------------------------------------------------------------------------




def why_not(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float, eps: float) -> List[str]:
    """Reasons these Triton kernels cannot run the inputs ([] when they can)."""
    reasons: List[str] = []
    tensors = [("q", q), ("k", k), ("v", v), ("policy", policy)]
    reasons += device_reasons("policy_attention", tensors, q.dtype)
    reasons += dtype_reasons(q.dtype, q.shape[-1], _MAX_HEAD_DIM)
    return reasons
