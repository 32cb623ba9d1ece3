"""Triton kernels for GGeM, group generalized-mean pooling (docs/ggem_pool.md, "Definition").

Math and backend contract: `fastvit_kernels/reference/ggem_pool.py`. In short, with x̂ = max(x, eps)
and M pooled tokens (the prefix tokens are skipped by offsetting the token index, no copy):
    log_mean[b, c] = ln((1/M) Σ_n x̂^p_c),   y = exp(log_mean / p_c)
    dx  = grad_y · y · exp((p_c - 1)·ln x̂ - ln(M·S))          (0 where x < eps)
    dp_g = Σ_b Σ_{c in g} grad_y · y · (T/S - log_mean / p_c) / p_c,   T/S = Σ_n x̂ · exp(...) · ln x̂

Kernels (x and grad_y are read through their strides; p arrives as a contiguous fp32 [C] vector
p_c = p[g(c)], so the kernels never see the channel layout):
  _fwd_kernel   one program per (b, block of channels), looping over the tokens in blocks of
                BN rows: l = p·log2 x̂ per tile, then an online log-sum-exp with one rescale per
                tile (the running max makes large p and tiny x safe: x̂^p is never formed).
                Writes y and log_mean. One read of x.
  _bwd_kernel   same grid and loop: writes dx (zeros for the prefix rows) and this program's
                dy/dp contribution per (b, c) into a [B, C] fp32 buffer, which the launcher sums
                over b in torch and scatters into the groups (deterministic, no atomics).
                One read of x, one write of dx.

Logarithms and exponentials run in base 2 (the native instructions); all math is fp32 and
y / dx are rounded to x's dtype only when stored.
"""

import math
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
from fastvit_kernels.reference.ggem_pool import channel_group

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    X, PC, Y, LOGMEAN,
    s_xb, s_xn, s_xc,
    N, C, PREFIX, eps, log_count,
    BN: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, BC)
    b = (pid // num_cb).to(tl.int64)  # batch offsets can pass 2**31 elements
    offs_c = (pid % num_cb) * BC + tl.arange(0, BC)
    c_mask = offs_c < C
    pc = tl.load(PC + offs_c, mask=c_mask, other=1.0)
    x_base = X + b * s_xb + offs_c[None, :] * s_xc

    m = tl.full([BC], float("-inf"), tl.float32)  # running max of p·log2 x̂
    s = tl.zeros([BC], tl.float32)  # Σ 2^(l - m)
    for start in range(PREFIX, N, BN):
        offs_n = start + tl.arange(0, BN)
        n_mask = offs_n < N
        x = tl.load(x_base + offs_n[:, None].to(tl.int64) * s_xn,
                    mask=n_mask[:, None] & c_mask[None, :], other=1.0).to(tl.float32)
        l = pc[None, :] * tl.log2(tl.maximum(x, eps))
        l = tl.where(n_mask[:, None], l, float("-inf"))
        # Every tile holds at least one real token, so m_new is finite.
        m_new = tl.maximum(m, tl.max(l, 0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(l - m_new[None, :]), 0)
        m = m_new

    log_mean = (m + tl.log2(s)) * 0.6931471805599453 - log_count
    y = tl.exp(log_mean / pc)
    tl.store(LOGMEAN + b * C + offs_c, log_mean, mask=c_mask)
    tl.store(Y + b * C + offs_c, y.to(Y.dtype.element_ty), mask=c_mask)


@triton.jit
def _bwd_kernel(
    GY, X, PC, LOGMEAN, DX, DYDP,
    s_gb, s_gc,
    s_xb, s_xn, s_xc,
    N, C, PREFIX, eps, log_count,
    BN: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, BC)
    b = (pid // num_cb).to(tl.int64)
    offs_c = (pid % num_cb) * BC + tl.arange(0, BC)
    c_mask = offs_c < C
    pc = tl.load(PC + offs_c, mask=c_mask, other=1.0)
    log_mean = tl.load(LOGMEAN + b * C + offs_c, mask=c_mask, other=0.0)
    gy = tl.load(GY + b * s_gb + offs_c * s_gc, mask=c_mask, other=0.0).to(tl.float32)
    y = tl.exp(log_mean / pc)
    coef = gy * y
    # dx = coef · 2^((p - 1)·log2 x̂ - log2(M·S)).
    shift = (log_mean + log_count) * 1.4426950408889634
    x_base = X + b * s_xb + offs_c[None, :] * s_xc
    dx_base = DX + b * N * C + offs_c[None, :]

    for start in range(0, PREFIX, BN):  # the skipped tokens get zero gradient
        offs_n = start + tl.arange(0, BN)
        mask = (offs_n < PREFIX)[:, None] & c_mask[None, :]
        tl.store(dx_base + offs_n[:, None].to(tl.int64) * C,
                 tl.zeros([BN, BC], tl.float32).to(DX.dtype.element_ty), mask=mask)

    t = tl.zeros([BC], tl.float32)  # Σ_n w_n x̂_n log2 x̂_n = (T / S) / ln 2
    for start in range(PREFIX, N, BN):
        offs_n = start + tl.arange(0, BN)
        n_mask = offs_n < N
        mask = n_mask[:, None] & c_mask[None, :]
        x = tl.load(x_base + offs_n[:, None].to(tl.int64) * s_xn, mask=mask, other=1.0).to(tl.float32)
        xc = tl.maximum(x, eps)
        lx = tl.log2(xc)
        # Padding gets exp2(-inf) = 0 (its argument could overflow: x = 1 is not from this row).
        w = tl.exp2(tl.where(mask, (pc[None, :] - 1.0) * lx - shift[None, :], float("-inf")))
        dx = tl.where(x >= eps, coef[None, :] * w, 0.0)
        tl.store(dx_base + offs_n[:, None].to(tl.int64) * C, dx.to(DX.dtype.element_ty), mask=mask)
        t += tl.sum(w * xc * lx, 0)

    dydp = coef * (t * 0.6931471805599453 - log_mean / pc) / pc
    tl.store(DYDP + b * C + offs_c, dydp, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------



def _config(N: int, C: int) -> dict:
    """Channel block BC (contiguous in the common layout: 128 fp32 = 512 bytes per row) and token
    block BN (rows per online-softmax rescale). Not yet tuned on a GPU."""
    bc = min(128, triton.next_power_of_2(C))
    bn = min(32, triton.next_power_of_2(max(N, 1)))
    return {"BN": bn, "BC": bc, "num_warps": 4}


def _per_channel_p(p: Tensor, C: int, interleaved: bool) -> Tensor:
    return p.float()[channel_group(C, p.shape[0], interleaved, p.device)].contiguous()


def forward(
    x: Tensor, p: Tensor, groups: int, eps: float, interleaved: bool, num_prefix_tokens: int
) -> Tuple[Tensor, Tensor]:
    B, N, C = x.shape
    y = new_output((B, C), x)
    log_mean = new_output((B, C), x, torch.float32)
    if B * C == 0:
        return y, log_mean
    pc = _per_channel_p(p, C, interleaved)
    cfg = _config(N - num_prefix_tokens, C)
    grid = (B * triton.cdiv(C, cfg["BC"]),)
    _fwd_kernel[grid](
        x, pc, y, log_mean,
        *x.stride(),
        N, C, num_prefix_tokens, float(eps), math.log(N - num_prefix_tokens),
        **cfg,
    )
    return y, log_mean


def backward(
    grad_y: Tensor,
    x: Tensor,
    p: Tensor,
    log_mean: Tensor,
    groups: int,
    eps: float,
    interleaved: bool,
    num_prefix_tokens: int,
) -> Tuple[Tensor, Tensor]:
    B, N, C = x.shape
    dx = new_output((B, N, C), x)
    if B * C == 0:
        return dx, torch.zeros_like(p)
    if log_mean.dtype != torch.float32 or not log_mean.is_contiguous():
        log_mean = log_mean.to(torch.float32).contiguous()
    pc = _per_channel_p(p, C, interleaved)
    dydp = torch.empty(B, C, dtype=torch.float32, device=x.device)
    cfg = _config(N - num_prefix_tokens, C)
    grid = (B * triton.cdiv(C, cfg["BC"]),)
    _bwd_kernel[grid](
        grad_y, x, pc, log_mean, dx, dydp,
        *grad_y.stride(), *x.stride(),
        N, C, num_prefix_tokens, float(eps), math.log(N - num_prefix_tokens),
        **cfg,
    )
    # dp[g] = Σ_b Σ_{c in g} dydp[b, c]: a fixed-order reduction.
    dp = torch.zeros(groups, dtype=torch.float32, device=x.device)
    dp.index_add_(0, channel_group(C, groups, interleaved, x.device), dydp.sum(0))
    return dx, dp.to(p.dtype)


def compile_variants() -> Iterator[CompileVariant]:
    """Every kernel configuration forward and backward launch, recorded on meta tensors: each
    dtype; channel counts C with every channel block BC _config can choose (1 to 128) and pooled
    token counts with every token block BN (1 to 32). x is laid out as a ViT's tokens [B, N, C]
    with one class token (num_prefix_tokens = 1: the constant 1); without prefix tokens (an
    integer divisible by 16), for the smallest and largest blocks."""

    def run(dtype, C, pooled, prefix):
        x = meta(2, pooled + prefix, C, dtype=dtype)
        p = meta(1)
        y, log_mean = forward(x, p, 1, 1e-6, False, prefix)
        backward(y, x, p, log_mean, 1, 1e-6, False, prefix)

    channels, pooled_counts = (1, 2, 3, 5, 9, 17, 33, 65, 129), (1, 2, 3, 5, 9, 17, 33)
    with recorded_launches() as variants:
        for dtype in FLOAT_DTYPES:
            for C, pooled in itertools.product(channels, pooled_counts):
                run(dtype, C, pooled, 1)
            variants.case = "no prefix"
            for C, pooled in ((channels[0], pooled_counts[0]), (channels[-1], pooled_counts[-1])):
                run(dtype, C, pooled, 0)
            variants.case = ""
    yield from variants


# ---------------------------------------------------------------------------------------------
# Capability check
# ---------------------------------------------------------------------------------------------




def why_not(x: Tensor, p: Tensor) -> List[str]:
    """Reasons these Triton kernels cannot run the inputs ([] when they can)."""
    reasons: List[str] = []
    reasons += device_reasons("ggem_pool", [("x", x), ("p", p)], x.dtype)
    reasons += dtype_reasons(x.dtype)
    return reasons
