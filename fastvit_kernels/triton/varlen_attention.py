"""Triton kernels for packed variable-length attention (token dropping; docs/varlen_attention.md, "Definition").

Math and backend contract: `fastvit_kernels/reference/varlen_attention.py`. In short, q, k, v
[T, H, D] hold the images back to back (image b in rows [cu_seqlens[b], cu_seqlens[b + 1])) and
every row attends to the rows of its own image: O = softmax(q kᵀ · scale) v per (image, head).

Kernels (flash-attention varlen style; q, k, v, grad_out and out are read through their strides,
so views of one packed qkv projection need no copy). Every grid is 1-D over
(block, head, image) with the block index fastest, sized by max_seqlen: a program whose block
starts past its image's length returns at once.
  _fwd_kernel        one program per (query block, head, image): online softmax over the
                     image's key blocks; writes out and lse (natural log, fp32).
  _bwd_pre_kernel    δ = rowsum(dO · O) over blocks of packed rows, all heads of a row at once.
  _bwd_dkdv_kernel   one program per (key block, head, image), looping over the image's query
                     blocks (keys on rows: dk, dv come out without transposes).
  _bwd_dq_kernel     one program per (query block, head, image), looping over the key blocks.
Every output element has one writer (no atomics): results are reproducible.

Softmax runs in base 2 (exp2 is the native instruction): scores are multiplied by log2(e) and the
stored lse is converted back to natural log. Statistics and accumulators are fp32; for fp32 inputs
the dots use input_precision="ieee" (no TF32), for half inputs they take half operands (P and dS
rounded to the input dtype, as flash-attention does), except bf16 under the interpreter (its bf16
tl.dot is wrong), which runs in fp32. Block sizes are powers of two >= 16 (the GPU's minimum dot
size); padding is masked, so any segment length >= 1 and any head width up to 256 run.
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

from fastvit_kernels.reference._outputs import new_output

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------




@triton.jit
def _fwd_kernel(
    Q, K, V, CU, OUT, LSE,
    s_qt, s_qh, s_qd,
    s_kt, s_kh, s_kd,
    s_vt, s_vh, s_vd,
    H, D: tl.constexpr, NUM_M, scale,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    tl.static_assert(BM >= 16)
    tl.static_assert(BN >= 16)
    tl.static_assert(BD >= 16)
    log2e = 1.4426950408889634
    pid = tl.program_id(0)
    pid_m = pid % NUM_M
    rest = pid // NUM_M
    h = (rest % H).to(tl.int64)
    seg = rest // H
    start = tl.load(CU + seg)
    L = (tl.load(CU + seg + 1) - start).to(tl.int32)
    if pid_m * BM >= L:
        return

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_mask = offs_m < L
    d_mask = offs_d < D
    rows = start + offs_m
    q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :] * s_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + start * s_kt + h * s_kh
    v_base = V + start * s_vt + h * s_vh
    qk_scale = scale * log2e

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start_n in range(0, L, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_mask = offs_n < L
        kt = tl.load(k_base + offs_n[None, :] * s_kt + offs_d[:, None] * s_kd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = dot(q, kt, IEEE) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds a real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(OUT + (rows[:, None] * H + h) * D + offs_d[None, :],
             o.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + rows * H + h, (m_i + tl.log2(l_i)) / log2e, mask=m_mask)


@triton.jit
def _bwd_pre_kernel(
    GO, OUT, DELTA,
    s_gt, s_gh, s_gd,
    T, H, D: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):
    """δ[t, h] = Σ_d dO[t, h, d] · O[t, h, d] for a block of BT rows and BH heads."""
    pid = tl.program_id(0)
    num_h = tl.cdiv(H, BH)
    pid_h = pid % num_h
    pid_t = pid // num_h
    offs_t = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    offs_h = pid_h * BH + tl.arange(0, BH)
    offs_d = tl.arange(0, BD)
    th_mask = (offs_t[:, None] < T) & (offs_h[None, :] < H)
    mask = th_mask[:, :, None] & (offs_d < D)[None, None, :]
    g = tl.load(GO + offs_t[:, None, None] * s_gt + offs_h[None, :, None] * s_gh
                + offs_d[None, None, :] * s_gd, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(OUT + (offs_t[:, None, None] * H + offs_h[None, :, None]) * D
                + offs_d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + offs_t[:, None] * H + offs_h[None, :], tl.sum(g * o, 2), mask=th_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, GO, LSE, DELTA, CU, DK, DV,
    s_qt, s_qh, s_qd,
    s_kt, s_kh, s_kd,
    s_vt, s_vh, s_vd,
    s_gt, s_gh, s_gd,
    H, D: tl.constexpr, NUM_N, scale,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    tl.static_assert(BM >= 16)
    tl.static_assert(BN >= 16)
    tl.static_assert(BD >= 16)
    log2e = 1.4426950408889634
    pid = tl.program_id(0)
    pid_n = pid % NUM_N
    rest = pid // NUM_N
    h = (rest % H).to(tl.int64)
    seg = rest // H
    start = tl.load(CU + seg)
    L = (tl.load(CU + seg + 1) - start).to(tl.int32)
    if pid_n * BN >= L:
        return

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    n_mask = offs_n < L
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    rows_n = start + offs_n
    k = tl.load(K + rows_n[:, None] * s_kt + h * s_kh + offs_d[None, :] * s_kd, mask=nd_mask, other=0.0)
    v = tl.load(V + rows_n[:, None] * s_vt + h * s_vh + offs_d[None, :] * s_vd, mask=nd_mask, other=0.0)
    q_base = Q + start * s_qt + h * s_qh
    do_base = GO + start * s_gt + h * s_gh
    stat_base = start * H + h
    qk_scale = scale * log2e

    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    for start_m in range(0, L, BM):
        offs_m = start_m + tl.arange(0, BM)
        m_mask = offs_m < L
        md_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd, mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_gt + offs_d[None, :] * s_gd,
                     mask=md_mask, other=0.0).to(q.dtype)
        lse = tl.load(LSE + stat_base + offs_m * H, mask=m_mask, other=0.0) * log2e
        delta = tl.load(DELTA + stat_base + offs_m * H, mask=m_mask, other=0.0)
        st = dot(k, tl.trans(q), IEEE) * qk_scale
        pt = tl.where(n_mask[:, None] & m_mask[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += dot(pt.to(q.dtype), do, IEEE)
        dpt = dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += dot(dst.to(q.dtype), q, IEEE)

    dk = dk * scale
    out_off = (rows_n[:, None] * H + h) * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, GO, LSE, DELTA, CU, DQ,
    s_qt, s_qh, s_qd,
    s_kt, s_kh, s_kd,
    s_vt, s_vh, s_vd,
    s_gt, s_gh, s_gd,
    H, D: tl.constexpr, NUM_M, scale,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    tl.static_assert(BM >= 16)
    tl.static_assert(BN >= 16)
    tl.static_assert(BD >= 16)
    log2e = 1.4426950408889634
    pid = tl.program_id(0)
    pid_m = pid % NUM_M
    rest = pid // NUM_M
    h = (rest % H).to(tl.int64)
    seg = rest // H
    start = tl.load(CU + seg)
    L = (tl.load(CU + seg + 1) - start).to(tl.int32)
    if pid_m * BM >= L:
        return

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_mask = offs_m < L
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    rows = start + offs_m
    q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :] * s_qd, mask=md_mask, other=0.0)
    do = tl.load(GO + rows[:, None] * s_gt + h * s_gh + offs_d[None, :] * s_gd,
                 mask=md_mask, other=0.0).to(q.dtype)
    lse = tl.load(LSE + rows * H + h, mask=m_mask, other=0.0) * log2e
    delta = tl.load(DELTA + rows * H + h, mask=m_mask, other=0.0)
    k_base = K + start * s_kt + h * s_kh
    v_base = V + start * s_vt + h * s_vh
    qk_scale = scale * log2e

    dq = tl.zeros([BM, BD], tl.float32)
    for start_n in range(0, L, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_mask = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * s_kt + offs_d[None, :] * s_kd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * s_vt + offs_d[:, None] * s_vd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.where(m_mask[:, None] & n_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (dot(do, vt, IEEE) - delta[:, None])
        dq += dot(ds.to(q.dtype), k, IEEE)

    dq = dq * scale
    tl.store(DQ + (rows[:, None] * H + h) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_MAX_HEAD_DIM = 256




def _config(kernel: str, max_seqlen: int, bd: int, dtype: torch.dtype) -> dict:
    """Block sizes (BM query rows, BN key rows) and launch options for 'fwd', 'dq' or 'dkdv'.

    From ptxas register/spill reports for sm_80 and sm_90 (no timings yet; the kernels were never
    run on a GPU). fp32 dots run on FMA units with ieee precision: 32×32 tiles, two stages (dk/dv
    at widths 128: 16 queries × 32 keys); 16×16 for 256-wide heads. Half precision: 64×64
    forward tiles, 64×32 for dq, 32×64 for dk/dv; narrower at width 256.
    """
    if dtype == torch.float32:
        if bd >= 256:
            bm, bn, warps = 16, 16, 4
        elif bd >= 128 and kernel == "dkdv":
            bm, bn, warps = 16, 32, 4
        else:
            bm, bn, warps = 32, 32, 8 if bd >= 64 else 4
    elif bd >= 256:
        bm, bn, warps = (16, 32, 4) if kernel == "dq" else (32, 32, 8)
    elif kernel == "fwd":
        bm, bn, warps = 64, 64, 4 if bd < 128 else 8
    elif kernel == "dkdv":
        bm, bn, warps = 32, 64, 4 if bd < 128 else 8
    else:
        bm, bn, warps = 64, 32, 4 if bd < 128 else 8
    bm, bn = pow2(max_seqlen, bm), pow2(max_seqlen, bn)
    if dtype == torch.float32:
        stages = 2
    else:
        stage_bytes = (bm if kernel == "dkdv" else bn) * 2 * bd * 2
        stages = 3 if 3 * stage_bytes <= 64 * 1024 else (2 if 2 * stage_bytes <= 64 * 1024 else 1)
    return {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}




def _prep_cu(cu_seqlens: Tensor, device: torch.device) -> Tensor:
    return cu_seqlens.to(device=device, dtype=torch.int64).contiguous()


def forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
            scale: float) -> Tuple[Tensor, Tensor]:
    T, H, D = q.shape
    out = new_output((T, H, D), q)
    lse = new_output((T, H), q, dtype=torch.float32)
    num_seg = cu_seqlens.numel() - 1
    if T * H == 0 or num_seg <= 0 or max_seqlen <= 0:
        return out, lse
    cu = _prep_cu(cu_seqlens, q.device)
    bd = pow2(D)
    cfg = _config("fwd", max_seqlen, bd, q.dtype)
    num_m = triton.cdiv(max_seqlen, cfg["BM"])
    _fwd_kernel[(num_m * H * num_seg,)](
        q, k, v, cu, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        H, D, num_m, float(scale),
        IEEE=fp32_dots(q.dtype), BD=bd, **cfg,
    )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             cu_seqlens: Tensor, max_seqlen: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    T, H, D = q.shape
    dq, dk, dv = (new_output((T, H, D), q) for _ in range(3))
    num_seg = cu_seqlens.numel() - 1
    if T * H == 0 or num_seg <= 0 or max_seqlen <= 0:
        return dq, dk, dv
    if grad_out.dtype != q.dtype:  # the dots and delta must see the same dO
        grad_out = grad_out.to(q.dtype)
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    cu = _prep_cu(cu_seqlens, q.device)
    bd = pow2(D)
    ieee = fp32_dots(q.dtype)

    # 1. δ = rowsum(dO · O).
    delta = torch.empty((T, H), dtype=torch.float32, device=q.device)
    bh = min(triton.next_power_of_2(H), max(1, 2048 // bd))
    bt = max(1, min(64, 4096 // (bh * bd)))
    _bwd_pre_kernel[(triton.cdiv(T, bt) * triton.cdiv(H, bh),)](
        grad_out, out, delta, *grad_out.stride(), T, H, D,
        BT=bt, BH=bh, BD=bd, num_warps=4,
    )

    # 2. dk, dv.
    cfg = _config("dkdv", max_seqlen, bd, q.dtype)
    num_n = triton.cdiv(max_seqlen, cfg["BN"])
    _bwd_dkdv_kernel[(num_n * H * num_seg,)](
        q, k, v, grad_out, lse, delta, cu, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
        H, D, num_n, float(scale),
        IEEE=ieee, BD=bd, **cfg,
    )

    # 3. dq.
    cfg = _config("dq", max_seqlen, bd, q.dtype)
    num_m = triton.cdiv(max_seqlen, cfg["BM"])
    _bwd_dq_kernel[(num_m * H * num_seg,)](
        q, k, v, grad_out, lse, delta, cu, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
        H, D, num_m, float(scale),
        IEEE=ieee, BD=bd, **cfg,
    )
    return dq, dk, dv


def compile_variants() -> Iterator[CompileVariant]:
    """Every kernel configuration forward and backward launch, recorded on meta tensors: each
    dtype; head widths D of every padded width 16..256 (_MAX_HEAD_DIM), both D = pow2(D) and a
    narrower D (3/4 of it: D is a constexpr); max_seqlen of SEQ_LENGTHS (every block size _config
    can choose); and, for the backward's delta kernel, whose head block depends on H, head counts
    with every power of two pow2(H) up to 128. q, k, v are laid out as MaskedTokenAttention's packed
    path passes them: views of one qkv projection [T, 3, H, D] (two images of max_seqlen and 5
    tokens); cu_seqlens int64."""

    def run(dtype, H, D, max_seqlen):
        T = max_seqlen + 5
        q, k, v = meta(T, 3, H, D, dtype=dtype).unbind(1)
        cu = meta(3, dtype=torch.int64)
        out, lse = forward(q, k, v, cu, max_seqlen, 0.125)
        backward(out, q, k, v, out, lse, cu, max_seqlen, 0.125)

    with recorded_launches() as variants:
        for dtype, width in itertools.product(FLOAT_DTYPES, head_widths(_MAX_HEAD_DIM)):
            for D in (width, width * 3 // 4):
                for max_seqlen in SEQ_LENGTHS:
                    run(dtype, 3, D, max_seqlen)
                for H in (1, 2, 4, 8, 16, 32, 64, 128):
                    run(dtype, H, D, SEQ_LENGTHS[-1])
    yield from variants


# ---------------------------------------------------------------------------------------------
# Capability check
# ---------------------------------------------------------------------------------------------




def why_not(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
            scale: float) -> List[str]:
    """Reasons these Triton kernels cannot run the inputs ([] when they can)."""
    reasons: List[str] = []
    tensors = [("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)]
    reasons += device_reasons("varlen_attention", tensors, q.dtype)
    reasons += dtype_reasons(q.dtype, q.shape[-1], _MAX_HEAD_DIM)
    if int(max_seqlen) > 2 ** 31 - 1:
        reasons.append(f"max_seqlen {max_seqlen} >= 2**31")
    return reasons
