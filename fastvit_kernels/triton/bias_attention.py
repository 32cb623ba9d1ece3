"""Triton kernels for attention with a learned relative-position bias (LeViT; docs/bias_attention.md, "Definition").

Math and backend contract: `fastvit_kernels/reference/bias_attention.py`. In short, per (b, h):
    S = q kᵀ · scale + table[h, index] + mask[b % W],  P = softmax(S),  O = P v,
    out = activation(O).
The optional additive mask [W, Nq, Nk] (Swin's shifted windows; the reference's add_mask) joins
each score tile after the bias, read per batch (image b adds window b % W); it gets no gradient.

Kernels (all read q, k, v, grad_out, o_pre, index, table and mask through their strides, so
per-head views of LeViT's fused qkv buffer need no copy):
  _fwd_kernel        one program per (query block, b·h): online softmax over key blocks, bias
                     gathered and mask added in the kernel, Hardswish or SiLU fused; writes out,
                     o_pre (optional), lse.
  _bwd_pre_kernel    delta = rowsum(dO' · o_pre) with dO' = grad_out · act'(o_pre); also
                     stores dO' when there is an activation so the next two kernels read it once.
  _bwd_dkdv_kernel   one program per (key block, b·h), looping over query blocks.
  _bwd_dq_kernel     one program per (query block, h, batch chunk), looping over the chunk's
                     batches and the key blocks; also sums dS over the chunk's batches (dtable).

Softmax runs in base 2 (exp2 is the native instruction): scores (bias and mask included) are
multiplied by log2(e) and the stored lse is converted back to natural log. All statistics and
accumulators are fp32; for fp32 inputs the dots use input_precision="ieee" (no TF32), for half
inputs they take half operands.
Block sizes are powers of two >= 16 (the GPU's minimum dot size); padding is masked.
"""

import itertools
from typing import Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastvit_kernels.triton._common import (
    FLOAT_DTYPES, SEQ_LENGTHS, CompileVariant, device_reasons, dot, dtype_reasons, fp32_dots, head_widths, meta,
    pow2, recorded_launches,
)

from fastvit_kernels.reference._outputs import empty_bhnd

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------




@triton.jit
def _bias_tile(TABLE, INDEX, h, rows, cols, mask, s_th, s_tt, s_iq, s_ik):
    """table[h, index[rows, cols]] in fp32 (0 where masked). rows/cols broadcast to the tile."""
    idx = tl.load(INDEX + rows * s_iq + cols * s_ik, mask=mask, other=0)
    bias = tl.load(TABLE + h * s_th + idx * s_tt, mask=mask, other=0.0)
    return bias.to(tl.float32)


@triton.jit
def _mask_tile(MASK, w, rows, cols, inside, s_mw, s_mq, s_mk):
    """mask[w, rows, cols] in fp32 (0 outside `inside`). rows/cols broadcast to the tile."""
    m = tl.load(MASK + w * s_mw + rows * s_mq + cols * s_mk, mask=inside, other=0.0)
    return m.to(tl.float32)


@triton.jit
def _hardswish(x):
    return x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0


@triton.jit
def _hardswish_grad(x):
    # PyTorch's convention at the kinks: 0 below -3, 1 above 3, (2x + 3) / 6 in between.
    return tl.where(x < -3.0, 0.0, tl.where(x > 3.0, 1.0, (2.0 * x + 3.0) / 6.0))


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _silu_grad(x):
    # s · (1 + x · (1 − s)), s = sigmoid(x) (docs/bias_attention.md, "Backward").
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def _fwd_kernel(
    Q, K, V, TABLE, INDEX, MASK, OUT, OPRE, LSE,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_th, s_tt, s_iq, s_ik,
    s_mw, s_mq, s_mk,
    s_ob, s_oh, s_on, s_od,
    s_pb, s_ph, s_pn, s_pd,
    H, W, NQ, NK, DK, DV, scale,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HARDSWISH: tl.constexpr, SILU: tl.constexpr,
    SAVE_PRE: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):
    tl.static_assert(BM >= 16)  # the GPU's minimum dot size
    tl.static_assert(BN >= 16)
    tl.static_assert(BDK >= 16)
    tl.static_assert(BDV >= 16)
    log2e = 1.4426950408889634
    # 1-D grid (no 65535 limit on B·H); a b·h's query blocks are neighbours so they share k, v in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(NQ, BM)
    pid_m = pid % num_m
    bh = (pid // num_m).to(tl.int64)
    b = bh // H
    h = bh % H

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_dk = tl.arange(0, BDK)
    offs_dv = tl.arange(0, BDV)
    m_mask = offs_m < NQ
    dk_mask = offs_dk < DK
    dv_mask = offs_dv < DV

    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_dk[None, :] * s_qd,
        mask=m_mask[:, None] & dk_mask[None, :], other=0.0,
    )
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    qk_scale = scale * log2e

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    for start_n in range(0, NK, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_mask = offs_n < NK
        kt = tl.load(
            k_base + offs_n[None, :] * s_kn + offs_dk[:, None] * s_kd,
            mask=n_mask[None, :] & dk_mask[:, None], other=0.0,
        )
        s = dot(q, kt, IEEE) * qk_scale
        if HAS_BIAS:
            s += _bias_tile(TABLE, INDEX, h, offs_m[:, None], offs_n[None, :],
                            m_mask[:, None] & n_mask[None, :], s_th, s_tt, s_iq, s_ik) * log2e
        if HAS_MASK:
            s += _mask_tile(MASK, b % W, offs_m[:, None], offs_n[None, :],
                            m_mask[:, None] & n_mask[None, :], s_mw, s_mq, s_mk) * log2e
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every key block holds at least one real key, so without a mask m_new is finite for
        # every row.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if HAS_MASK:
            # A mask of -inf can hide all of a row's keys so far: subtract 0 instead of -inf
            # there, so alpha and p are 0, not NaN (m_i itself stays -inf).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd,
            mask=n_mask[:, None] & dv_mask[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(LSE + bh * NQ + offs_m, (m_i + tl.log2(l_i)) / log2e, mask=m_mask)
    o_mask = m_mask[:, None] & dv_mask[None, :]
    if SAVE_PRE:
        tl.store(OPRE + b * s_pb + h * s_ph + offs_m[:, None] * s_pn + offs_dv[None, :] * s_pd,
                 o.to(OPRE.dtype.element_ty), mask=o_mask)
    if HARDSWISH:
        o = _hardswish(o)
    if SILU:
        o = _silu(o)
    tl.store(OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_dv[None, :] * s_od,
             o.to(OUT.dtype.element_ty), mask=o_mask)


@triton.jit
def _bwd_pre_kernel(
    GO, OPRE, DO, DELTA,
    s_gb, s_gh, s_gn, s_gd,
    s_pb, s_ph, s_pn, s_pd,
    H, NQ, DV,
    HARDSWISH: tl.constexpr, SILU: tl.constexpr, BM: tl.constexpr, BDV: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(NQ, BM)
    pid_m = pid % num_m
    bh = (pid // num_m).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_dv = tl.arange(0, BDV)
    m_mask = offs_m < NQ
    mask = m_mask[:, None] & (offs_dv[None, :] < DV)
    g = tl.load(GO + b * s_gb + h * s_gh + offs_m[:, None] * s_gn + offs_dv[None, :] * s_gd,
                mask=mask, other=0.0).to(tl.float32)
    o = tl.load(OPRE + b * s_pb + h * s_ph + offs_m[:, None] * s_pn + offs_dv[None, :] * s_pd,
                mask=mask, other=0.0).to(tl.float32)
    if HARDSWISH or SILU:
        # dO' laid out contiguous [B, H, NQ, DV], in the dtype the dots take.
        if HARDSWISH:
            g = g * _hardswish_grad(o)
        else:
            g = g * _silu_grad(o)
        g = g.to(DO.dtype.element_ty)
        tl.store(DO + (bh * NQ + offs_m[:, None]) * DV + offs_dv[None, :], g, mask=mask)
        g = g.to(tl.float32)
    # delta = rowsum(dO' * o) = rowsum(P * dP), from the same (rounded) dO' the dots use, so that
    # dS = P * (dP - delta) keeps summing to ~0 over each row (exactly 0 when Nk = 1).
    tl.store(DELTA + bh * NQ + offs_m, tl.sum(g * o, 1), mask=m_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, TABLE, INDEX, MASK, DO, LSE, DELTA, DK_OUT, DV_OUT,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_th, s_tt, s_iq, s_ik,
    s_mw, s_mq, s_mk,
    s_db, s_dh, s_dn, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    H, W, NQ, NK, DK, DV, scale,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):
    tl.static_assert(BM >= 16)  # the GPU's minimum dot size
    tl.static_assert(BN >= 16)
    tl.static_assert(BDK >= 16)
    tl.static_assert(BDV >= 16)
    log2e = 1.4426950408889634
    pid = tl.program_id(0)
    num_n = tl.cdiv(NK, BN)
    pid_n = pid % num_n
    bh = (pid // num_n).to(tl.int64)
    b = bh // H
    h = bh % H

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_dk = tl.arange(0, BDK)
    offs_dv = tl.arange(0, BDV)
    n_mask = offs_n < NK
    dk_mask = offs_dk < DK
    dv_mask = offs_dv < DV

    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_dk[None, :] * s_kd,
                mask=n_mask[:, None] & dk_mask[None, :], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd,
                mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    qk_scale = scale * log2e

    dk = tl.zeros([BN, BDK], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    # Transposed formulation (keys on rows): sT = k qᵀ, so dk and dv come out without transposes.
    for start_m in range(0, NQ, BM):
        offs_m = start_m + tl.arange(0, BM)
        m_mask = offs_m < NQ
        q = tl.load(q_base + offs_m[:, None] * s_qn + offs_dk[None, :] * s_qd,
                    mask=m_mask[:, None] & dk_mask[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_dn + offs_dv[None, :] * s_dd,
                     mask=m_mask[:, None] & dv_mask[None, :], other=0.0).to(q.dtype)
        lse = tl.load(LSE + bh * NQ + offs_m, mask=m_mask, other=0.0) * log2e
        delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_mask, other=0.0)
        mask_t = n_mask[:, None] & m_mask[None, :]
        st = dot(k, tl.trans(q), IEEE) * qk_scale
        if HAS_BIAS:
            st += _bias_tile(TABLE, INDEX, h, offs_m[None, :], offs_n[:, None], mask_t,
                             s_th, s_tt, s_iq, s_ik) * log2e
        if HAS_MASK:
            st += _mask_tile(MASK, b % W, offs_m[None, :], offs_n[:, None], mask_t,
                             s_mw, s_mq, s_mk) * log2e
        pt = tl.where(mask_t, tl.exp2(st - lse[None, :]), 0.0)
        dv += dot(pt.to(q.dtype), do, IEEE)
        dpt = dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += dot(dst.to(q.dtype), q, IEEE)

    dk = dk * scale
    tl.store(DK_OUT + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_dk[None, :] * s_dkd,
             dk.to(DK_OUT.dtype.element_ty), mask=n_mask[:, None] & dk_mask[None, :])
    tl.store(DV_OUT + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvn + offs_dv[None, :] * s_dvd,
             dv.to(DV_OUT.dtype.element_ty), mask=n_mask[:, None] & dv_mask[None, :])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, TABLE, INDEX, MASK, DO, LSE, DELTA, DQ_OUT, DS_SUM,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_th, s_tt, s_iq, s_ik,
    s_mw, s_mq, s_mk,
    s_db, s_dh, s_dn, s_dd,
    s_dqb, s_dqh, s_dqn, s_dqd,
    B, H, W, NQ, NK, DK, DV, scale, BATCH_PER_PROG,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, ONE_KBLOCK: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
):
    """dq for the chunk's batches; with a bias, also DS_SUM[chunk, h] = Σ_{b in chunk} dS[b, h].

    dtable needs dS summed over b before the scatter into [H, T]. A program owns rows
    (query block) × all keys of head h for its batch chunk, so it sums its batches itself and
    writes its own slice of DS_SUM [chunks, H, NQ, NK] with plain stores. Chosen over fp32 atomics
    into [H, NQ, NK] because it is deterministic and has no B-way contention on the same
    addresses; the cost is the chunk buffer (the launcher bounds it) and, for NK > BN, a
    read-modify-write of the program's own L2-resident slice per batch. The launcher then sums the
    chunks and scatters the [H, NQ·NK] values into [H, T] with one index_add_.
    """
    tl.static_assert(BM >= 16)  # the GPU's minimum dot size
    tl.static_assert(BN >= 16)
    tl.static_assert(BDK >= 16)
    tl.static_assert(BDV >= 16)
    log2e = 1.4426950408889634
    pid = tl.program_id(0)
    num_m = tl.cdiv(NQ, BM)
    pid_m = pid % num_m
    rest = pid // num_m
    h = (rest % H).to(tl.int64)
    chunk = (rest // H).to(tl.int64)
    b_start = chunk * BATCH_PER_PROG
    b_end = tl.minimum(b_start + BATCH_PER_PROG, B)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n0 = tl.arange(0, BN)
    offs_dk = tl.arange(0, BDK)
    offs_dv = tl.arange(0, BDV)
    m_mask = offs_m < NQ
    dk_mask = offs_dk < DK
    dv_mask = offs_dv < DV
    qk_scale = scale * log2e
    ds_base = DS_SUM + (chunk * H + h) * NQ * NK

    # Single key block (Nk <= BN): the bias tile is the same for every batch, so it is gathered
    # once, and the dS sum stays in registers until the end. (The mask is not: it is
    # mask[b % W], loaded per batch in the loop below.)
    if ONE_KBLOCK:
        n_mask1 = offs_n0 < NK
        mask1 = m_mask[:, None] & n_mask1[None, :]
        if HAS_BIAS:
            bias1 = _bias_tile(TABLE, INDEX, h, offs_m[:, None], offs_n0[None, :], mask1,
                               s_th, s_tt, s_iq, s_ik) * log2e
    ds_sum = tl.zeros([BM, BN], tl.float32)

    for b in range(b_start, b_end):
        bh = b * H + h
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_dk[None, :] * s_qd,
                    mask=m_mask[:, None] & dk_mask[None, :], other=0.0)
        do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dn + offs_dv[None, :] * s_dd,
                     mask=m_mask[:, None] & dv_mask[None, :], other=0.0).to(q.dtype)
        lse = tl.load(LSE + bh * NQ + offs_m, mask=m_mask, other=0.0) * log2e
        delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_mask, other=0.0)
        k_base = K + b * s_kb + h * s_kh
        v_base = V + b * s_vb + h * s_vh
        dq = tl.zeros([BM, BDK], tl.float32)
        for start_n in range(0, NK, BN):
            offs_n = start_n + offs_n0
            n_mask = offs_n < NK
            mask = m_mask[:, None] & n_mask[None, :]
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_dk[None, :] * s_kd,
                        mask=n_mask[:, None] & dk_mask[None, :], other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * s_vn + offs_dv[:, None] * s_vd,
                         mask=n_mask[None, :] & dv_mask[:, None], other=0.0)
            s = dot(q, tl.trans(k), IEEE) * qk_scale
            if HAS_BIAS:
                if ONE_KBLOCK:
                    s += bias1
                else:
                    s += _bias_tile(TABLE, INDEX, h, offs_m[:, None], offs_n[None, :], mask,
                                    s_th, s_tt, s_iq, s_ik) * log2e
            if HAS_MASK:  # per batch, ONE_KBLOCK or not
                s += _mask_tile(MASK, b % W, offs_m[:, None], offs_n[None, :], mask,
                                s_mw, s_mq, s_mk) * log2e
            p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
            dp = dot(do, vt, IEEE)
            ds = p * (dp - delta[:, None])
            dq += dot(ds.to(q.dtype), k, IEEE)
            if HAS_BIAS:
                if ONE_KBLOCK:
                    ds_sum += ds
                else:
                    # Read-modify-write of this program's own slice (skip the read for the
                    # chunk's first batch, the buffer is uninitialised).
                    ds_ptr = ds_base + offs_m[:, None] * NK + offs_n[None, :]
                    if b > b_start:
                        ds += tl.load(ds_ptr, mask=mask, other=0.0)
                    tl.store(ds_ptr, ds, mask=mask)
                    tl.debug_barrier()  # the next batch's read of this tile sees this write
        dq = dq * scale
        tl.store(DQ_OUT + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqn + offs_dk[None, :] * s_dqd,
                 dq.to(DQ_OUT.dtype.element_ty), mask=m_mask[:, None] & dk_mask[None, :])

    if HAS_BIAS:
        if ONE_KBLOCK:
            tl.store(ds_base + offs_m[:, None] * NK + offs_n0[None, :], ds_sum, mask=mask1)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_MAX_HEAD_DIM = 256
_ACTIVATIONS = ("none", "hardswish", "silu")  # the schema's names (reference/bias_attention.py)




def _config(kernel: str, Nq: int, Nk: int, bdk: int, bdv: int, dtype: torch.dtype) -> dict:
    """Block sizes (BM query rows, BN key rows) and launch options for 'fwd', 'dkdv' or 'dq'.

    Chosen from ptxas register/spill reports for sm_90 (not yet from timings): the in-kernel bias
    gather costs ~100 registers per thread at 64×64 tiles, so the half-precision kernels use
    64×32 tiles (32×64 for dk/dv, whose loop runs over queries); fp32 dots run on FMA units with
    ieee precision and take 32×32 tiles over 8 warps. Heads of width 256 take smaller tiles.
    """
    wide = max(bdk, bdv)
    if dtype == torch.float32:
        bm, bn, warps = (16, 16, 4) if wide >= 256 else (32, 32, 8)
    elif wide >= 256:
        bm, bn, warps = 32, 32, 8
    elif kernel == "dkdv":
        bm, bn, warps = 32, 64, 4 if wide < 128 else 8
    else:
        bm, bn, warps = 64, 32, 4 if wide < 128 else 8
    bm, bn = pow2(Nq, bm), pow2(Nk, bn)
    # The tiles the loop streams (k/v, or q/dO for dk/dv) are pipelined through shared memory.
    elem = 4 if dtype == torch.float32 else 2
    stage_bytes = (bm if kernel == "dkdv" else bn) * (bdk + bdv) * elem
    stages = 3 if 3 * stage_bytes <= 64 * 1024 else (2 if 2 * stage_bytes <= 64 * 1024 else 1)
    return {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}




def _check_activation(activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"bias_attention (triton): activation must be one of {_ACTIVATIONS}, "
                         f"got {activation!r}")


def _bias_args(table: Optional[Tensor], index: Optional[Tensor], dummy: Tensor):
    """(table, index, 4 strides); a dummy pointer when there is no bias (never read)."""
    if table is None:
        return dummy, dummy, (0, 0, 0, 0)
    return table, index, (table.stride(0), table.stride(1), index.stride(0), index.stride(1))


def _mask_args(mask: Optional[Tensor], dummy: Tensor):
    """(mask, its window count W, 3 strides); a dummy pointer, W = 1 and zero strides when there
    is no mask (never read)."""
    if mask is None:
        return dummy, 1, (0, 0, 0)
    return mask, mask.shape[0], tuple(mask.stride())


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
    _check_activation(activation)
    B, H, Nq, Dk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    save_pre = activation != "none" and bool(save_pre_activation)
    out = empty_bhnd(B, H, Nq, Dv, q)
    o_pre = empty_bhnd(B, H, Nq, Dv, q) if save_pre else q.new_empty(0)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    if B * H * Nq == 0:
        return out, o_pre, lse
    if Nk == 0:
        raise ValueError("bias_attention (triton): softmax over no keys (Nk == 0)")

    bdk, bdv = pow2(Dk), pow2(Dv)
    cfg = _config("fwd", Nq, Nk, bdk, bdv, q.dtype)
    tbl, idx, t_strides = _bias_args(table, index, q)
    msk, W, m_strides = _mask_args(mask, q)
    pre = o_pre if save_pre else out
    grid = (triton.cdiv(Nq, cfg["BM"]) * B * H,)
    _fwd_kernel[grid](
        q, k, v, tbl, idx, msk, out, pre, lse,
        *q.stride(), *k.stride(), *v.stride(), *t_strides, *m_strides, *out.stride(),
        *pre.stride(),
        H, W, Nq, Nk, Dk, Dv, float(scale),
        HAS_BIAS=table is not None, HAS_MASK=mask is not None,
        HARDSWISH=activation == "hardswish", SILU=activation == "silu", SAVE_PRE=save_pre,
        IEEE=fp32_dots(q.dtype), BDK=bdk, BDV=bdv, **cfg,
    )
    return out, o_pre, lse


def _dtable_chunks(B: int, H: int, num_m: int, Nq: int, Nk: int, device: torch.device) -> int:
    """How many batch chunks the dq kernel splits B into (each has its own dS-sum slice).

    More chunks: more programs in flight; fewer: less memory for the [chunks, H, Nq, Nk] buffer
    and less to sum afterwards. Aim for ~4 programs per SM, at most 256 MiB of buffer.
    """
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another: parallelism buys nothing
        target = 1
    chunks = min(B, max(1, triton.cdiv(target, num_m * H)))
    max_chunks = max(1, (256 << 20) // max(1, 4 * H * Nq * Nk))
    return max(1, min(chunks, max_chunks))


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
    _check_activation(activation)
    act = activation != "none"
    B, H, Nq, Dk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    dq = empty_bhnd(B, H, Nq, Dk, q)
    dk = empty_bhnd(B, H, Nk, Dk, q)
    dv = empty_bhnd(B, H, Nk, Dv, q)
    dtable = q.new_empty(0) if table is None else torch.zeros_like(table)
    if B * H == 0 or Nk == 0:
        return dq, dk, dv, dtable
    if Nq == 0:  # no queries: nothing flows back to the keys or the table
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, dtable
    if o_pre.numel() == 0 or tuple(o_pre.shape) != (B, H, Nq, Dv):
        raise ValueError(
            "bias_attention (triton): backward needs o_pre [B, H, Nq, Dv] (the forward's output "
            "before the activation; run the forward with save_pre_activation=True)"
        )
    if grad_out.dtype != q.dtype:  # the dots and delta must see the same dO
        grad_out = grad_out.to(q.dtype)
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        lse = lse.to(torch.float32).contiguous()

    bdk, bdv = pow2(Dk), pow2(Dv)
    ieee = fp32_dots(q.dtype)
    tbl, idx, t_strides = _bias_args(table, index, q)
    msk, W, m_strides = _mask_args(mask, q)
    has_bias, has_mask = table is not None, mask is not None

    # 1. delta (and dO' when there is an activation).
    delta = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    do = torch.empty(B, H, Nq, Dv, dtype=q.dtype, device=q.device) if act else grad_out
    bm_pre = pow2(Nq, 64)
    _bwd_pre_kernel[(triton.cdiv(Nq, bm_pre) * B * H,)](
        grad_out, o_pre, do, delta,
        *grad_out.stride(), *o_pre.stride(),
        H, Nq, Dv,
        HARDSWISH=activation == "hardswish", SILU=activation == "silu", BM=bm_pre, BDV=bdv,
        num_warps=8 if bdv >= 128 else 4,
    )

    # 2. dk, dv.
    cfg = _config("dkdv", Nq, Nk, bdk, bdv, q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(Nk, cfg["BN"]) * B * H,)](
        q, k, v, tbl, idx, msk, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *t_strides, *m_strides, *do.stride(),
        *dk.stride(), *dv.stride(),
        H, W, Nq, Nk, Dk, Dv, float(scale),
        HAS_BIAS=has_bias, HAS_MASK=has_mask, IEEE=ieee, BDK=bdk, BDV=bdv, **cfg,
    )

    # 3. dq and the batch-summed dS.
    cfg = _config("dq", Nq, Nk, bdk, bdv, q.dtype)
    num_m = triton.cdiv(Nq, cfg["BM"])
    if has_bias:
        chunks = _dtable_chunks(B, H, num_m, Nq, Nk, q.device)
        per_prog = triton.cdiv(B, chunks)
        chunks = triton.cdiv(B, per_prog)  # no empty chunk: every slice of ds_sum gets written
        ds_sum = torch.empty(chunks, H, Nq, Nk, dtype=torch.float32, device=q.device)
    else:
        per_prog, chunks, ds_sum = 1, B, delta  # dummy pointer, never written
    _bwd_dq_kernel[(num_m * H * chunks,)](
        q, k, v, tbl, idx, msk, do, lse, delta, dq, ds_sum,
        *q.stride(), *k.stride(), *v.stride(), *t_strides, *m_strides, *do.stride(),
        *dq.stride(),
        B, H, W, Nq, Nk, Dk, Dv, float(scale), per_prog,
        HAS_BIAS=has_bias, HAS_MASK=has_mask, ONE_KBLOCK=Nk <= cfg["BN"], IEEE=ieee, BDK=bdk, BDV=bdv, **cfg,
    )

    # 4. dtable[h, r] = Σ_{i,j: index[i,j] = r} ds_sum[h, i, j]: one scatter of H·Nq·Nk values.
    if has_bias:
        ds_heads = ds_sum.sum(0) if chunks > 1 else ds_sum[0]
        acc = torch.zeros(table.shape, dtype=torch.float32, device=q.device)
        acc.index_add_(1, index.reshape(-1), ds_heads.reshape(H, Nq * Nk))
        dtable = acc.to(table.dtype)
    return dq, dk, dv, dtable


def _levit_inputs(B: int, H: int, Nq: int, Nk: int, Dk: int, Dv: int, dtype: torch.dtype,
                  conv: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v as LeViT's modules pass them (meta tensors): per-head views of one fused qkv
    projection [B, N, H, 2·Dk + Dv] (Nq == Nk) or of a kv projection beside q [B, Nq, H, Dk]
    (shrink attention); with conv, of the channel-major [B, H, ·, N] projections (levit_conv_*)."""
    if conv:
        q = meta(B, H, Dk, Nq, dtype=dtype).transpose(2, 3)
        k, v = (t.transpose(2, 3) for t in meta(B, H, Dk + Dv, Nk, dtype=dtype).split([Dk, Dv], 2))
    elif Nq == Nk:
        qkv = meta(B, Nq, H, 2 * Dk + Dv, dtype=dtype)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([Dk, Dk, Dv], 3))
    else:
        q = meta(B, Nq, H, Dk, dtype=dtype).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in meta(B, Nk, H, Dk + Dv, dtype=dtype).split([Dk, Dv], 3))
    return q, k, v


# Swin-like mask launches (tokens per window, with a table, mask dtype; None: the inputs'):
# 7×7 windows (several key blocks in dq) with a float32 mask and one in the inputs' dtype, 4×4
# windows (dq's ONE_KBLOCK path: the bias gathered once, the mask per batch), a mask alone.
_MASK_VARIANTS = ((49, True, torch.float32), (49, True, None), (16, True, torch.float32),
                  (49, False, None))


def compile_variants() -> Iterator[CompileVariant]:
    """Every kernel configuration forward and backward launch, recorded on meta tensors: each
    dtype; head widths Dk and Dv each of every padded width 16..256 (_MAX_HEAD_DIM); Nq and Nk
    of SEQ_LENGTHS (every block size _config can choose, and one or several key blocks for dq);
    without and with a bias; no activation, and hardswish and silu each with and without o_pre.
    Inputs are laid out as LeViT's linear modules pass them (_levit_inputs), the bias in the
    inputs' dtype with int64 indices. Pointer types and strides that change no configuration are
    recorded for one LeViT shrink shape per dtype: a float32 table (autocast), int32 indices, the
    conv layout. The mask (HAS_MASK) only adds a tile load, so it is recorded for a few Swin
    window shapes per dtype rather than across the whole product (see _MASK_VARIANTS)."""

    def run(q, k, v, table_dtype, index_dtype, activation, save_pre, mask_dtype=None, windows=1):
        Nq, Nk = q.shape[2], k.shape[2]
        table = index = mask = None
        if table_dtype is not None:
            table = meta(q.shape[1], max(Nk, 3), dtype=table_dtype)
            index = meta(Nq, Nk, dtype=index_dtype)
        if mask_dtype is not None:
            mask = meta(windows, Nq, Nk, dtype=mask_dtype)
        out, o_pre, lse = forward(q, k, v, table, index, mask, 0.25, activation, save_pre)
        if activation == "none" or save_pre:
            backward(out, q, k, v, table, index, mask, out if activation == "none" else o_pre, lse,
                     0.25, activation)

    activations = [("none", False), ("hardswish", False), ("hardswish", True), ("silu", False),
                   ("silu", True)]
    widths = head_widths(_MAX_HEAD_DIM)
    with recorded_launches() as variants:
        for dtype in FLOAT_DTYPES:
            for Dk, Dv, Nq, Nk in itertools.product(widths, widths, SEQ_LENGTHS, SEQ_LENGTHS):
                q, k, v = _levit_inputs(2, 4, Nq, Nk, Dk, Dv, dtype)
                for table_dtype, (activation, save_pre) in itertools.product((None, dtype), activations):
                    run(q, k, v, table_dtype, torch.int64, activation, save_pre)
            for table_dtype, index_dtype in ((torch.float32, torch.int64), (dtype, torch.int32)):
                q, k, v = _levit_inputs(2, 4, 49, 196, 16, 64, dtype)
                run(q, k, v, table_dtype, index_dtype, "hardswish", True)
            variants.case = "conv"
            q, k, v = _levit_inputs(2, 4, 49, 196, 16, 64, dtype, conv=True)
            run(q, k, v, dtype, torch.int64, "hardswish", True)
            variants.case = ""
            for N, with_table, mask_dtype in _MASK_VARIANTS:
                q, k, v = _levit_inputs(8, 3, N, N, 32, 32, dtype)  # 2 images of 4 windows
                run(q, k, v, dtype if with_table else None, torch.int64, "none", False,
                    mask_dtype=mask_dtype or dtype, windows=4)
    yield from variants


# ---------------------------------------------------------------------------------------------
# Capability check
# ---------------------------------------------------------------------------------------------




def why_not(q: Tensor, k: Tensor, v: Tensor, table: Optional[Tensor], index: Optional[Tensor],
            mask: Optional[Tensor] = None) -> List[str]:
    """Reasons these Triton kernels cannot run the inputs ([] when they can)."""
    reasons: List[str] = []
    tensors = [("q", q), ("k", k), ("v", v)]
    if table is not None:
        tensors.append(("bias_table", table))
    if index is not None:
        tensors.append(("bias_index", index))
    if mask is not None:
        tensors.append(("mask", mask))
    reasons += device_reasons("bias_attention", tensors, q.dtype)
    reasons += dtype_reasons(q.dtype, max(q.shape[-1], v.shape[-1]), _MAX_HEAD_DIM)
    return reasons
