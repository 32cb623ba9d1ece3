"""Triton kernels for QnA learned-query local attention (docs/qna_attention.md, "Definition").

Math and backend contract: `fastvit_kernels/reference/qna_attention.py`. In short, for output
pixel o with window pixels p_t = o * stride - pad + t (in-bounds ones only):
    w[o, q, h, t] = softmax_t(cost[p_t, q, h] + rpe[t, q, h])
    out[o, h, :]  = sum_q sum_t w[o, q, h, t] * attn_scale[t, q, h] * v[p_t, h, :]

Head widths are tiny (d = 8 or 16 in QnA-ViT), so there are no dots: every kernel works on 3-D
register tiles of a block of pixels along one image row, either
    [BW pixels, BQ queries, BH heads]       (cost, scores, weights, lse, D)   or
    [BW pixels, BH heads,   BD channels]    (v, out, grad_out),
all powers of two with the padding masked. Heads are independent in every formula, so wide
layers split their heads over programs (a grid axis of head blocks) to bound the tile size.

Kernels (cost, v and grad_out are read through their strides, so slices of one fused projection
need no copy; rpe and attn_scale are passed as contiguous fp32 [k*k, Q, h], they are tiny):
  _fwd_kernel          one program per (b, output row, block of output columns, head block).
                       Pass 1 over the taps (scores only): online max and sum of exp -> lse.
                       Pass 2: w = exp(score - max) / sum, summed over q with attn_scale into one
                       weight per (pixel, head), times v[p_t]. Writes out and lse.
  _bwd_out_kernel      per OUTPUT pixel o: the softmax statistics again (see below), stored;
                       u = grad_out[o] . v[p_t] and D[o] = sum_t w * attn_scale * u, stored;
                       running sums of w * u per tap (-> dattn_scale).
  _bwd_in_kernel       per INPUT pixel p: gathers the windows (o, t) that contain p, i.e.
                       o * stride = p + pad - t, recomputes w and u, and accumulates
                       dv[p] = sum w * attn_scale * grad_out[o], dcost[p] = sum ds with
                       ds = w * (attn_scale * u - D[o]), and running sums of ds per tap (-> drpe).
                       A block of lanes holds pixels of one residue class p % stride, so which
                       taps hit a window is the same for all lanes and the tap loops step by
                       `stride` without wasted iterations.
Both backward kernels run one program per (chunk of image rows, head block) and loop over the
chunk's rows and column blocks: a few programs per SM, each adding its per-tap sums into its own
[k*k, Q, h] slice, which the launcher then sums in torch in a fixed order. So the backward is
deterministic (no atomics: every dv/dcost element has one writer) and those buffers stay small.

The backward takes the lse of the contract but does not use it: it recomputes the window max and
1 / sum (one pass over cost, Q/d of a pass over v), which give weights as exact as the forward's.
exp(score - lse) would carry lse's fp32 rounding (4e-6 at |lse| ~ 80) into every weight of the
window, and the cancellation in ds amplifies it: 1.4e-5 relative dcost error at scores of
30 * randn, against 1e-6 for the recomputed weights and for PyTorch's own fp32 autograd.

exp is computed as exp2(x * log2(e)) (exp2 is the native instruction) after subtracting the
window max, so the scaled argument is small and the scaling adds no error at large scores. All
loads are converted to fp32 and all math and accumulation is fp32; out, dcost and dv are
rounded to the inputs' dtype only when stored.
"""

import itertools
from typing import Iterator, List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastvit_kernels.triton._common import (
    FLOAT_DTYPES, CompileVariant, device_reasons, dtype_reasons, meta, recorded_launches,
)

from fastvit_kernels.reference._outputs import new_output
from fastvit_kernels.reference.qna_attention import output_size

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _program_tile(pid, num_col_blocks, n_rows, NH, BH: tl.constexpr):
    """Splits a 1-D program id (no 65535 limit) into (b, row, column block, first head).
    Head blocks of the same pixels are neighbours: they share rows in L2."""
    num_head_blocks = tl.cdiv(NH, BH)
    head_block = pid % num_head_blocks
    pixel_program = pid // num_head_blocks
    col_block = pixel_program % num_col_blocks
    image_row = pixel_program // num_col_blocks
    row = image_row % n_rows
    b = (image_row // n_rows).to(tl.int64)  # batch offsets can pass 2**31 elements
    return b, row, col_block, head_block * BH


@triton.jit
def _tap_columns(ox, iy, tx, Hi, Wi, Wo, STRIDE, PAD):
    """Input columns ix of tap column tx for output columns ox, and which are real keys (the
    output pixel exists and (iy, ix) is inside the image)."""
    # A row outside the image has no keys: its width is taken as 0 (combining a scalar and a
    # block condition with & would promote the mask to int32).
    row_width = tl.where((iy >= 0) & (iy < Hi), Wi, 0)
    ix = ox * STRIDE - PAD + tx
    return ix, (ox < Wo) & (ix >= 0) & (ix < row_width)


@triton.jit
def _tap_scores(cost_ptrs, rpe_ptrs, key_ok, param_ok):
    """cost[p_t] + rpe[t] in fp32 [BW, BQ, BH]; -inf where the key is masked out."""
    rpe = tl.load(rpe_ptrs, mask=param_ok, other=0.0)
    cost = tl.load(cost_ptrs, mask=key_ok, other=0.0).to(tl.float32)
    return tl.where(key_ok, cost + rpe, float("-inf"))


@triton.jit
def _window_stats(cost_base, s_cy, s_cx, RPE, param_offset, param_ok, ox, oy,
                  Hi, Wi, Wo, NQ, NH, KSIZE, STRIDE, PAD,
                  BW: tl.constexpr, BQ: tl.constexpr, BH: tl.constexpr):
    """(max_t score, 1 / sum_t exp(score - max)) of every (pixel, q, h) window, online over
    the taps. The weights are then exp(score - max) / sum, exactly as a plain softmax."""
    log2e = 1.4426950408889634
    # The running max starts finite so that leading masked taps (score -inf) add exp(-inf) = 0
    # instead of evaluating inf - inf.
    window_max = tl.full([BW, BQ, BH], -1.0e30, tl.float32)
    window_sum = tl.zeros([BW, BQ, BH], tl.float32)
    for ty in range(0, KSIZE):
        iy = oy * STRIDE - PAD + ty
        for tx in range(0, KSIZE):
            ix, col_ok = _tap_columns(ox, iy, tx, Hi, Wi, Wo, STRIDE, PAD)
            score = _tap_scores(cost_base + iy * s_cy + ix * s_cx,
                                RPE + (ty * KSIZE + tx) * NQ * NH + param_offset,
                                col_ok & param_ok, param_ok)
            new_max = tl.maximum(window_max, score)
            window_sum = (window_sum * tl.exp2((window_max - new_max) * log2e)
                          + tl.exp2((score - new_max) * log2e))
            window_max = new_max
    # The sum is >= 1 in real lanes (the max term adds exp(0)); padding lanes have 0, and the
    # clamp keeps them finite (they are masked everywhere).
    return window_max, 1.0 / tl.maximum(window_sum, 1.0)


@triton.jit
def _fwd_kernel(
    COST, V, RPE, SCALE, OUT, LSE,
    s_cb, s_cy, s_cx, s_cq, s_ch,
    s_vb, s_vy, s_vx, s_vh, s_vd,
    s_ob, s_oy, s_ox, s_oh, s_od,
    s_lb, s_ly, s_lx, s_lq, s_lh,
    Hi, Wi, Ho, Wo, NQ, NH, HD, KSIZE, STRIDE, PAD,
    BW: tl.constexpr, BQ: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):
    log2e = 1.4426950408889634
    b, oy, col_block, head0 = _program_tile(tl.program_id(0), tl.cdiv(Wo, BW), Ho, NH, BH)

    ox = (col_block * BW + tl.arange(0, BW))[:, None, None]  # [BW, 1, 1]: fits both tiles
    heads = head0 + tl.arange(0, BH)
    # Score tiles [BW, BQ, BH].
    q_s = tl.arange(0, BQ)[None, :, None]
    h_s = heads[None, None, :]
    param_ok = (q_s < NQ) & (h_s < NH)
    param_offset = q_s * NH + h_s  # into contiguous [k*k, Q, h]
    # Value tiles [BW, BH, BD].
    h_v = heads[None, :, None]
    d_v = tl.arange(0, BD)[None, None, :]
    value_ok = (h_v < NH) & (d_v < HD)
    cost_base = COST + b * s_cb + q_s * s_cq + h_s * s_ch
    v_base = V + b * s_vb + h_v * s_vh + d_v * s_vd
    num_params = NQ * NH

    # Pass 1: softmax statistics (scores only).
    window_max, inv_sum = _window_stats(cost_base, s_cy, s_cx, RPE, param_offset, param_ok, ox, oy,
                                        Hi, Wi, Wo, NQ, NH, KSIZE, STRIDE, PAD, BW, BQ, BH)
    lse = window_max - tl.log(inv_sum)
    tl.store(LSE + b * s_lb + oy * s_ly + ox * s_lx + q_s * s_lq + h_s * s_lh, lse,
             mask=(ox < Wo) & param_ok)

    # Pass 2: out = sum_t (sum_q w * attn_scale) * v[p_t].
    acc = tl.zeros([BW, BH, BD], tl.float32)
    for ty in range(0, KSIZE):
        iy = oy * STRIDE - PAD + ty
        for tx in range(0, KSIZE):
            tap = ty * KSIZE + tx
            ix, col_ok = _tap_columns(ox, iy, tx, Hi, Wi, Wo, STRIDE, PAD)
            score = _tap_scores(cost_base + iy * s_cy + ix * s_cx,
                                RPE + tap * num_params + param_offset, col_ok & param_ok, param_ok)
            weight = tl.exp2((score - window_max) * log2e) * inv_sum  # 0 where masked
            attn_scale = tl.load(SCALE + tap * num_params + param_offset, mask=param_ok, other=0.0)
            head_weight = tl.sum(weight * attn_scale, axis=1)  # [BW, BH]: the queries share v
            value = tl.load(v_base + iy * s_vy + ix * s_vx, mask=col_ok & value_ok, other=0.0)
            acc += head_weight[:, :, None] * value.to(tl.float32)
    tl.store(OUT + b * s_ob + oy * s_oy + ox * s_ox + h_v * s_oh + d_v * s_od,
             acc.to(OUT.dtype.element_ty), mask=(ox < Wo) & value_ok)


@triton.jit
def _accumulate(ptrs, values, mask):
    """*ptrs += values, on memory only this program touches."""
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + values, mask=mask)
    # Threads holding copies of the same element store it too; the barrier orders every store
    # of this update before any load of the next one.
    tl.debug_barrier()


@triton.jit
def _row_chunk(NH, BH: tl.constexpr):
    """(first head, chunk) of this program in a grid of (chunk of image rows, head block)."""
    num_head_blocks = tl.cdiv(NH, BH)
    return (tl.program_id(0) % num_head_blocks) * BH, tl.program_id(0) // num_head_blocks


@triton.jit
def _bwd_out_kernel(
    GRAD, COST, V, RPE, SCALE, WINDOW_MAX, INV_SUM, DELTA, SUM_WU,
    s_gb, s_gy, s_gx, s_gh, s_gd,
    s_cb, s_cy, s_cx, s_cq, s_ch,
    s_vb, s_vy, s_vx, s_vh, s_vd,
    NB, Hi, Wi, Ho, Wo, NQ, NH, HD, KSIZE, STRIDE, PAD, ROWS_PER_PROGRAM,
    BW: tl.constexpr, BQ: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):
    """Per output pixel: the softmax statistics into WINDOW_MAX, INV_SUM and
    D = sum_t w * attn_scale * u into DELTA (all contiguous [B, Ho, Wo, Q, h]).

    A program takes ROWS_PER_PROGRAM consecutive output rows (of the B * Ho) for one head block
    and adds sum_o w * u over their pixels into its own slice SUM_WU[program] (contiguous
    [programs, k*k, Q, h], zero-initialised).
    """
    log2e = 1.4426950408889634
    head0, chunk = _row_chunk(NH, BH)
    heads = head0 + tl.arange(0, BH)
    q_s = tl.arange(0, BQ)[None, :, None]
    h_s = heads[None, None, :]
    param_ok = (q_s < NQ) & (h_s < NH)
    param_offset = q_s * NH + h_s
    h_v = heads[None, :, None]
    d_v = tl.arange(0, BD)[None, None, :]
    value_ok = (h_v < NH) & (d_v < HD)
    # Per-tap sums are [BQ, BH] tiles (the pixel axis summed away).
    q_p = tl.arange(0, BQ)[:, None]
    h_p = heads[None, :]
    sum_ok = (q_p < NQ) & (h_p < NH)
    num_params = NQ * NH
    sum_base = SUM_WU + chunk.to(tl.int64) * KSIZE * KSIZE * num_params + q_p * NH + h_p

    first_row = chunk * ROWS_PER_PROGRAM
    for image_row in range(first_row, tl.minimum(first_row + ROWS_PER_PROGRAM, NB * Ho)):
        b = (image_row // Ho).to(tl.int64)  # batch offsets can pass 2**31 elements
        oy = image_row % Ho
        cost_base = COST + b * s_cb + q_s * s_cq + h_s * s_ch
        v_base = V + b * s_vb + h_v * s_vh + d_v * s_vd
        for col_block in range(0, tl.cdiv(Wo, BW)):
            ox = (col_block * BW + tl.arange(0, BW))[:, None, None]
            grad = tl.load(GRAD + b * s_gb + oy * s_gy + ox * s_gx + h_v * s_gh + d_v * s_gd,
                           mask=(ox < Wo) & value_ok, other=0.0).to(tl.float32)
            # The softmax statistics, recomputed rather than derived from the forward's lse
            # (whose fp32 rounding would scale every weight of a window; see the module
            # docstring), and stored for _bwd_in_kernel.
            window_max, inv_sum = _window_stats(cost_base, s_cy, s_cx, RPE, param_offset,
                                                param_ok, ox, oy, Hi, Wi, Wo, NQ, NH,
                                                KSIZE, STRIDE, PAD, BW, BQ, BH)
            out_ok = (ox < Wo) & param_ok
            stat_offset = (((b * Ho + oy) * Wo + ox) * NQ + q_s) * NH + h_s
            tl.store(WINDOW_MAX + stat_offset, window_max, mask=out_ok)
            tl.store(INV_SUM + stat_offset, inv_sum, mask=out_ok)

            delta = tl.zeros([BW, BQ, BH], tl.float32)
            for ty in range(0, KSIZE):
                iy = oy * STRIDE - PAD + ty
                for tx in range(0, KSIZE):
                    tap = ty * KSIZE + tx
                    ix, col_ok = _tap_columns(ox, iy, tx, Hi, Wi, Wo, STRIDE, PAD)
                    score = _tap_scores(cost_base + iy * s_cy + ix * s_cx,
                                        RPE + tap * num_params + param_offset,
                                        col_ok & param_ok, param_ok)
                    weight = tl.exp2((score - window_max) * log2e) * inv_sum
                    attn_scale = tl.load(SCALE + tap * num_params + param_offset, mask=param_ok,
                                         other=0.0)
                    value = tl.load(v_base + iy * s_vy + ix * s_vx, mask=col_ok & value_ok,
                                    other=0.0)
                    u = tl.sum(grad * value.to(tl.float32), axis=2)  # [BW, BH]
                    weighted_u = weight * u[:, None, :]
                    delta += weighted_u * attn_scale
                    _accumulate(sum_base + tap * num_params, tl.sum(weighted_u, axis=0), sum_ok)
            tl.store(DELTA + stat_offset, delta, mask=out_ok)


@triton.jit
def _bwd_in_kernel(
    GRAD, COST, V, RPE, SCALE, WINDOW_MAX, INV_SUM, DELTA, DCOST, DV, SUM_DS,
    s_gb, s_gy, s_gx, s_gh, s_gd,
    s_cb, s_cy, s_cx, s_cq, s_ch,
    s_vb, s_vy, s_vx, s_vh, s_vd,
    s_dcb, s_dcy, s_dcx, s_dcq, s_dch,
    s_dvb, s_dvy, s_dvx, s_dvh, s_dvd,
    NB, Hi, Wi, Ho, Wo, NQ, NH, HD, KSIZE, STRIDE, PAD, ROWS_PER_PROGRAM,
    BW: tl.constexpr, BQ: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):
    """dcost and dv of every input pixel, for ROWS_PER_PROGRAM consecutive input rows (of the
    B * Hi) and one head block; also adds sum ds per tap into its own slice SUM_DS[program]
    (contiguous [programs, k*k, Q, h], zero-initialised).

    A row is taken in blocks of pixels px = residue + STRIDE * j of one residue class."""
    log2e = 1.4426950408889634
    head0, chunk = _row_chunk(NH, BH)
    heads = head0 + tl.arange(0, BH)
    q_s = tl.arange(0, BQ)[None, :, None]
    h_s = heads[None, None, :]
    param_ok = (q_s < NQ) & (h_s < NH)
    param_offset = q_s * NH + h_s
    h_v = heads[None, :, None]
    d_v = tl.arange(0, BD)[None, None, :]
    value_ok = (h_v < NH) & (d_v < HD)
    q_p = tl.arange(0, BQ)[:, None]
    h_p = heads[None, :]
    sum_ok = (q_p < NQ) & (h_p < NH)
    num_params = NQ * NH
    sum_base = SUM_DS + chunk.to(tl.int64) * KSIZE * KSIZE * num_params + q_p * NH + h_p
    cols_per_residue = tl.cdiv(Wi, STRIDE)
    blocks_per_residue = tl.cdiv(cols_per_residue, BW)

    first_row = chunk * ROWS_PER_PROGRAM
    for image_row in range(first_row, tl.minimum(first_row + ROWS_PER_PROGRAM, NB * Hi)):
        b = (image_row // Hi).to(tl.int64)
        py = image_row % Hi
        # Tap t reaches p from the window of o = (p + pad - t) / stride when that divides
        # exactly; the lanes of a block share py and px % STRIDE, so the taps that divide are
        # every STRIDE-th from first_ty, first_tx.
        first_ty = (py + PAD) % STRIDE
        for col_block in range(0, STRIDE * blocks_per_residue):
            residue = col_block // blocks_per_residue
            first_tx = (residue + PAD) % STRIDE
            j = ((col_block % blocks_per_residue) * BW + tl.arange(0, BW))[:, None, None]
            px = residue + STRIDE * j  # [BW, 1, 1]
            pixel_ok = (j < cols_per_residue) & (px < Wi)
            cost = tl.load(COST + b * s_cb + py * s_cy + px * s_cx + q_s * s_cq + h_s * s_ch,
                           mask=pixel_ok & param_ok, other=0.0).to(tl.float32)
            value = tl.load(V + b * s_vb + py * s_vy + px * s_vx + h_v * s_vh + d_v * s_vd,
                            mask=pixel_ok & value_ok, other=0.0).to(tl.float32)

            dcost = tl.zeros([BW, BQ, BH], tl.float32)
            dv = tl.zeros([BW, BH, BD], tl.float32)
            for ty in range(first_ty, KSIZE, STRIDE):
                oy_times_stride = py + PAD - ty
                oy = oy_times_stride // STRIDE
                # 0 when this tap row has no window (same scalar-mask caveat as in
                # _tap_columns).
                out_width = tl.where((oy_times_stride >= 0) & (oy < Ho), Wo, 0)
                for tx in range(first_tx, KSIZE, STRIDE):
                    tap = ty * KSIZE + tx
                    ox_times_stride = px + PAD - tx
                    ox = ox_times_stride // STRIDE
                    window_ok = pixel_ok & (ox_times_stride >= 0) & (ox < out_width)
                    stat_ok = window_ok & param_ok
                    stat_offset = (((b * Ho + oy) * Wo + ox) * NQ + q_s) * NH + h_s
                    window_max = tl.load(WINDOW_MAX + stat_offset, mask=stat_ok, other=0.0)
                    inv_sum = tl.load(INV_SUM + stat_offset, mask=stat_ok, other=0.0)
                    delta = tl.load(DELTA + stat_offset, mask=stat_ok, other=0.0)
                    rpe = tl.load(RPE + tap * num_params + param_offset, mask=param_ok, other=0.0)
                    attn_scale = tl.load(SCALE + tap * num_params + param_offset, mask=param_ok,
                                         other=0.0)
                    score = tl.where(stat_ok, cost + rpe, float("-inf"))
                    weight = tl.exp2((score - window_max) * log2e) * inv_sum

                    grad_ptrs = GRAD + b * s_gb + oy * s_gy + ox * s_gx + h_v * s_gh + d_v * s_gd
                    grad = tl.load(grad_ptrs, mask=window_ok & value_ok, other=0.0).to(tl.float32)
                    u = tl.sum(grad * value, axis=2)  # [BW, BH]
                    ds = weight * (attn_scale * u[:, None, :] - delta)
                    dcost += ds
                    _accumulate(sum_base + tap * num_params, tl.sum(ds, axis=0), sum_ok)
                    head_weight = tl.sum(weight * attn_scale, axis=1)  # [BW, BH]
                    dv += head_weight[:, :, None] * grad

            tl.store(DCOST + b * s_dcb + py * s_dcy + px * s_dcx + q_s * s_dcq + h_s * s_dch,
                     dcost.to(DCOST.dtype.element_ty), mask=pixel_ok & param_ok)
            tl.store(DV + b * s_dvb + py * s_dvy + px * s_dvx + h_v * s_dvh + d_v * s_dvd,
                     dv.to(DV.dtype.element_ty), mask=pixel_ok & value_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Elements of the largest register tile a program holds ([BW, BH, BD] or [BW, BQ, BH]). From
# ptxas reports for sm_90 (not yet from timings): at 1024 over 4 warps (8 elements a thread) the
# forward needs 72-96 registers, _bwd_out_kernel 80-128, _bwd_in_kernel 116-168 (spills of at
# most 32 bytes); at 2048 the forward already spills.
_TILE_ELEMENTS = 1024


def _blocks(n_cols: int, Q: int, H: int, D: int) -> dict:
    """Power-of-two block sizes: all queries, as many heads as fit beside BD (at least 1), and
    as many pixels of the row as fit in _TILE_ELEMENTS."""
    bq, bd = triton.next_power_of_2(Q), triton.next_power_of_2(D)
    bh = min(triton.next_power_of_2(H), max(1, _TILE_ELEMENTS // max(bq, bd)))
    bw = min(triton.next_power_of_2(n_cols), max(1, _TILE_ELEMENTS // (bh * max(bq, bd))))
    tile = bw * bh * max(bq, bd)
    warps = 4 if tile >= 1024 else (2 if tile >= 256 else 1)
    return {"BW": bw, "BQ": bq, "BH": bh, "BD": bd, "num_warps": warps}


def _row_chunks(rows: int, device: torch.device) -> Tuple[int, int]:
    """(programs, rows per program) for a backward kernel that splits `rows` image rows among
    programs (per head block): enough programs to fill the GPU, each with its own
    [k*k, Q, h] slice of parameter-gradient sums, so those buffers stay small."""
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one by one; a few still test the sum over programs
        target = 3
    rows_per_program = triton.cdiv(rows, max(1, min(rows, target)))
    return triton.cdiv(rows, rows_per_program), rows_per_program  # no program without rows


def _params_fp32(rpe: Tensor, attn_scale: Tensor) -> Tuple[Tensor, Tensor]:
    """rpe, attn_scale as contiguous fp32 [k*k, Q, h] (tiny: a copy costs nothing)."""
    return rpe.to(torch.float32).contiguous(), attn_scale.to(torch.float32).contiguous()


def forward(
    cost: Tensor, v: Tensor, rpe: Tensor, attn_scale: Tensor, kernel_size: int, stride: int
) -> Tuple[Tensor, Tensor]:
    B, Hi, Wi, Q, H = cost.shape
    D = v.shape[4]
    Ho, Wo = output_size(Hi, kernel_size, stride), output_size(Wi, kernel_size, stride)
    out = new_output((B, Ho, Wo, H, D), v)
    lse = new_output((B, Ho, Wo, Q, H), cost, dtype=torch.float32)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse
    rpe32, scale32 = _params_fp32(rpe, attn_scale)
    cfg = _blocks(Wo, Q, H, D)
    grid = (B * Ho * triton.cdiv(Wo, cfg["BW"]) * triton.cdiv(H, cfg["BH"]),)  # see _program_tile
    _fwd_kernel[grid](
        cost, v, rpe32, scale32, out, lse,
        *cost.stride(), *v.stride(), *out.stride(), *lse.stride(),
        Hi, Wi, Ho, Wo, Q, H, D, kernel_size, stride, (kernel_size - 1) // 2,
        **cfg,
    )
    return out, lse


def backward(
    grad_out: Tensor,
    cost: Tensor,
    v: Tensor,
    rpe: Tensor,
    attn_scale: Tensor,
    lse: Tensor,
    kernel_size: int,
    stride: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    B, Hi, Wi, Q, H = cost.shape
    D = v.shape[4]
    Ho, Wo = output_size(Hi, kernel_size, stride), output_size(Wi, kernel_size, stride)
    taps = kernel_size * kernel_size
    pad = (kernel_size - 1) // 2
    dcost = new_output(cost.shape, cost)
    dv = new_output(v.shape, v)
    if dcost.numel() == 0 or dv.numel() == 0:
        return dcost, dv, torch.zeros_like(rpe), torch.zeros_like(attn_scale)
    rpe32, scale32 = _params_fp32(rpe, attn_scale)

    # 1. Per output pixel: softmax statistics, D, and per-program sums of w * u.
    cfg = _blocks(Wo, Q, H, D)
    out_chunks, rows_per_out_chunk = _row_chunks(B * Ho, cost.device)
    window_max, inv_sum, delta = (
        new_output((B, Ho, Wo, Q, H), cost, dtype=torch.float32) for _ in range(3)
    )
    sum_wu = torch.zeros(out_chunks, taps, Q, H, dtype=torch.float32, device=cost.device)
    _bwd_out_kernel[(out_chunks * triton.cdiv(H, cfg["BH"]),)](
        grad_out, cost, v, rpe32, scale32, window_max, inv_sum, delta, sum_wu,
        *grad_out.stride(), *cost.stride(), *v.stride(),
        B, Hi, Wi, Ho, Wo, Q, H, D, kernel_size, stride, pad, rows_per_out_chunk,
        **cfg,
    )

    # 2. Per input pixel: dcost, dv, and per-program sums of ds.
    cfg = _blocks(triton.cdiv(Wi, stride), Q, H, D)  # blocks hold pixels of one residue class
    in_chunks, rows_per_in_chunk = _row_chunks(B * Hi, cost.device)
    sum_ds = torch.zeros(in_chunks, taps, Q, H, dtype=torch.float32, device=cost.device)
    _bwd_in_kernel[(in_chunks * triton.cdiv(H, cfg["BH"]),)](
        grad_out, cost, v, rpe32, scale32, window_max, inv_sum, delta, dcost, dv, sum_ds,
        *grad_out.stride(), *cost.stride(), *v.stride(), *dcost.stride(), *dv.stride(),
        B, Hi, Wi, Ho, Wo, Q, H, D, kernel_size, stride, pad, rows_per_in_chunk,
        **cfg,
    )

    # 3. Parameter gradients: the per-program sums added in a fixed order (deterministic).
    dattn_scale = sum_wu.sum(dim=0)
    drpe = sum_ds.sum(dim=0)
    return dcost, dv, drpe.to(rpe.dtype).contiguous(), dattn_scale.to(attn_scale.dtype).contiguous()


def compile_variants() -> Iterator[CompileVariant]:
    """Every kernel configuration forward and backward launch, recorded on meta tensors, over
    QnA-ViT's layers and beyond (the kernels take any sizes; _blocks bounds the tiles): each
    dtype; Q queries 1..8, head widths d 1..64 and heads h 1..128 (every power of two), image
    widths 7 to 56 (QnA-ViT's stages at 224 px); windows 3 and 7 at strides 1 and 2 (stride 1 and
    a padding of 1 specialise as constants). cost and v are laid out as the QnA module passes
    them: views of one projection [B, H, W, h·d + Q·h]; rpe and attn_scale in float32."""

    def run(dtype, Q, h, d, width, kernel_size, stride):
        B, Hi, Wi = 2, 3, width
        cost_v = meta(B, Hi, Wi, h * d + Q * h, dtype=dtype)
        v, cost = cost_v.split([h * d, Q * h], dim=-1)
        v, cost = v.unflatten(-1, (h, d)), cost.unflatten(-1, (Q, h))
        rpe = attn_scale = meta(kernel_size * kernel_size, Q, h)
        out, lse = forward(cost, v, rpe, attn_scale, kernel_size, stride)
        backward(out, cost, v, rpe, attn_scale, lse, kernel_size, stride)

    powers = [1, 2, 4, 8, 16, 32, 64, 128]
    with recorded_launches() as variants:
        for dtype in FLOAT_DTYPES:
            for Q, h, d in itertools.product(powers[:4], powers, powers[:7]):
                for width in (7, 14, 28, 56):
                    run(dtype, Q, h, d, width, 3, 1)
            for kernel_size, stride in ((3, 2), (7, 1), (7, 2)):
                variants.case = f"k{kernel_size} stride {stride}"
                run(dtype, 2, 8, 16, 28, kernel_size, stride)
            variants.case = ""
    yield from variants


# ---------------------------------------------------------------------------------------------
# Capability check
# ---------------------------------------------------------------------------------------------




def why_not(
    cost: Tensor, v: Tensor, rpe: Tensor, attn_scale: Tensor, kernel_size: int, stride: int
) -> List[str]:
    """Reasons these Triton kernels cannot run the inputs ([] when they can)."""
    reasons: List[str] = []
    tensors = [("cost", cost), ("v", v), ("rpe", rpe), ("attn_scale", attn_scale)]
    # No GPU-generation limit: there are no dots, and bf16 is only converted to and from fp32
    # (the kernels compile for sm_70, sm_75, sm_80 and sm_90 in every dtype).
    reasons += device_reasons("qna_attention", tensors, cost.dtype, bf16_needs_sm80=False)
    reasons += dtype_reasons(cost.dtype)
    return reasons
