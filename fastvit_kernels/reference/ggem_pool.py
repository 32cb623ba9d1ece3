"""Plain-PyTorch reference for GGeM, group generalized-mean pooling (docs/ggem_pool.md, "Definition").

This file is the specification of the op: the test oracle (run `ggem_pool` in float64), the
fallback backend when no native kernel fits, and the path that exports (ONNX, TorchScript)
because it is ordinary tensor code.

Shapes: x [B, N, C] tokens, p [G] (G = groups, one exponent per channel group). The first
`num_prefix_tokens` tokens (cls / register tokens) are skipped; n runs over the M = N - prefix
remaining ones. Channel c belongs to group g(c) = c // (C / G) ("contiguous" layout) or c % G
("interleaved"); write p_c = p[g(c)] and x̂ = max(x, eps).

    S[b, c] = (1/M) Σ_n x̂[b, n, c] ^ p_c
    y[b, c] = S[b, c] ^ (1 / p_c)

Gradients (T = (1/M) Σ_n x̂^p · ln x̂; the clamp passes the gradient where x >= eps, as
torch.clamp does):

    dy/dx[b, n, c] = x̂^(p-1) · S^(1/p - 1) / M = y · exp((p - 1)·ln x̂ - ln(M·S))      (0 where x < eps)
    dy/dp_c        = y · (T / S - ln S / p) / p
    dp[g]          = Σ_b Σ_{c in g} grad_y[b, c] · dy/dp_c

Numerics. x̂^p overflows or underflows float32 for large p (x̂ = 100, p = 10: 1e20 is fine but
1e4^10 is not; 1e-6^10 = 1e-60 underflows). Every backend therefore works with
l = p·ln x̂ and keeps ln S = logsumexp_n(l) - ln M (a running max of l per (b, c)), so that
y = exp(ln S / p) and exp((p - 1)·ln x̂ - ln(M·S)) are computed without forming x̂^p.
T / S = Σ_n w_n ln x̂_n with the softmax weights w_n = exp(l_n - ln(M·S)), also safe.

Backend contract (shared by the reference, the C++ and the Triton backends):
    forward(x, p, groups, eps, interleaved, num_prefix_tokens)
        -> y         [B, C] contiguous, in x's dtype
           log_mean  [B, C] contiguous float32 (float64 for float64 x): ln S, the statistic the
                     backward reuses (y = exp(log_mean / p) in fp32)
    backward(grad_y, x, p, log_mean, groups, eps, interleaved, num_prefix_tokens)
        -> dx  [B, N, C] contiguous, in x's dtype; the prefix rows get zero gradient
           dp  [G] contiguous, in p's dtype
    x may be any strided view (e.g. x[:, 1:] of a token buffer, or a transpose); p is in x's dtype
    or float32 (the module keeps it in float32) and every p must be > 0; C % G == 0 and
    0 <= num_prefix_tokens < N (the callers check). All accumulation is in float32 (float64 for
    float64 x). dp is a sum over b in a fixed order (no atomics): bitwise reproducible.
"""

import math
from typing import Tuple

import torch
from torch import Tensor

from fastvit_kernels.reference._outputs import new_output

LAYOUTS = ("contiguous", "interleaved")


def channel_group(channels: int, groups: int, interleaved: bool, device=None) -> Tensor:
    """g(c) for every channel, int64 [C]: c // (C / G) (contiguous) or c % G (interleaved)."""
    c = torch.arange(channels, device=device)
    return c % groups if interleaved else c // (channels // groups)


def per_channel(p: Tensor, channels: int, interleaved: bool) -> Tensor:
    """p_c = p[g(c)] as a [C] tensor (a view-free index; differentiable with respect to p)."""
    return p[channel_group(channels, p.shape[0], interleaved, p.device)]


def ggem_pool(x: Tensor, p: Tensor, groups: int, eps: float = 1e-6, layout: str = "contiguous",
              num_prefix_tokens: int = 0) -> Tensor:
    """The formula exactly as written (clamp, power, mean, root): the oracle, run in float64.

    In float32 it overflows for large p (e.g. x = 1e4, p = 10): use `ggem_pool_stable` there.
    """
    pc = per_channel(p, x.shape[2], layout == "interleaved").to(x.dtype)
    tokens = x[:, num_prefix_tokens:]
    return tokens.clamp(min=eps).pow(pc).mean(dim=1).pow(1.0 / pc)


def ggem_pool_stable(x: Tensor, p: Tensor, groups: int, eps: float = 1e-6, layout: str = "contiguous",
                     num_prefix_tokens: int = 0) -> Tensor:
    """The same function in the log domain (finite wherever the result is): differentiable,
    exportable, in the inputs' dtype."""
    pc = per_channel(p, x.shape[2], layout == "interleaved").to(x.dtype)
    tokens = x[:, num_prefix_tokens:]
    count = tokens.shape[1]
    log_mean = torch.logsumexp(pc * tokens.clamp(min=eps).log(), dim=1) - math.log(count)
    return torch.exp(log_mean / pc)


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward(
    x: Tensor, p: Tensor, groups: int, eps: float, interleaved: bool, num_prefix_tokens: int
) -> Tuple[Tensor, Tensor]:
    """Backend forward: fp32 math for every input dtype (float64 stays float64)."""
    acc = _accumulation_dtype(x)
    B, N, C = x.shape
    pc = per_channel(p.to(acc), C, interleaved)
    log_x = x[:, num_prefix_tokens:].to(acc).clamp(min=eps).log()
    log_mean = torch.logsumexp(pc * log_x, dim=1) - math.log(N - num_prefix_tokens)
    y = new_output((B, C), x)
    y.copy_(torch.exp(log_mean / pc))
    out_log_mean = new_output((B, C), x, acc)
    out_log_mean.copy_(log_mean)
    return y, out_log_mean


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
    """Backend backward, written out (the kernels implement these same formulas)."""
    acc = _accumulation_dtype(x)
    B, N, C = x.shape
    count = N - num_prefix_tokens
    pc = per_channel(p.to(acc), C, interleaved)
    log_mean = log_mean.to(acc)
    tokens = x[:, num_prefix_tokens:].to(acc)
    log_x = tokens.clamp(min=eps).log()
    y = torch.exp(log_mean / pc)  # [B, C]
    gy = grad_y.to(acc)
    # w = x̂^(p-1) / (M·S): the softmax weight of token n divided by x̂.
    w = torch.exp((pc - 1) * log_x - (log_mean + math.log(count))[:, None, :])
    dx = new_output((B, N, C), x)
    dx[:, :num_prefix_tokens].zero_()
    dx[:, num_prefix_tokens:].copy_(torch.where(tokens >= eps, (gy * y)[:, None, :] * w, 0.0))
    # T / S = Σ_n w_n · x̂_n · ln x̂_n.
    t_over_s = (w * log_x.exp() * log_x).sum(dim=1)
    dy_dp = y * (t_over_s - log_mean / pc) / pc
    per_group = (gy * dy_dp).sum(dim=0)  # [C], summed over b in order
    dp = torch.zeros(groups, dtype=acc, device=x.device)
    dp.index_add_(0, channel_group(C, groups, interleaved, x.device), per_group)
    return dx, dp.to(p.dtype)
