"""The QnA layer ("Learned Queries for Efficient Local Attention", CVPR 2022; docs/qna_attention.md, "Definition").

`QnA` is the full layer of the paper on channels-last images: [B, H, W, in_dim] -> [B, Ho, Wo, dim].
A few learned queries, shared by every window, attend over the k x k window around each (strided)
pixel; the queries' outputs are mixed with learned per-position weights and summed.

How it runs:
  * The key projection is folded into the queries: x . (W_k q̂) gives each query's score at every
    pixel directly, so the keys ([B, H, W, dim]) are never materialised. The folded matrix
    [in_dim, Q*h] is recomputed from the parameters on every forward (it is tiny).
  * The values and the scores come out of ONE matmul with the concatenated weight
    [dim + Q*h, in_dim]; the op reads both in place as strided views of its result.
  * The windowed softmax and the sum over queries run in the fused `qna_attention` op.

Parameters, and how they map to the JAX original (moabarar/qna, `layers/qna.py`, `FusedKQnA`;
F = dim features, h heads, d = F / h, Q queries, k window):

    this module            shape              JAX parameter                 conversion
    query                  [Q, F]             query [Q, F]                  as is
    wk                     [in_dim, F]        Wk [in_dim, F]                as is
    to_v.weight            [F, in_dim]        to_v/kernel [in_dim, F]       transpose
    to_v.bias              [F]                to_v/bias (use_bias=True)     as is
    to_out.weight          [out, F]           to_out/kernel [F, out]        transpose
    to_out.bias            [out]              to_out/bias (use_bias=True)   as is
    rpe                    [k*k, Q, h]        rpe_bias [k*k, Q*h]           reshape
    attn_scale             [k*k, Q, h]        attn_scale_weights            reshape
                                              [1, 1, k*k, Q*h]

In all of them the window position is t = ty * k + tx (row-major) and the flattened Q*h axis is
q * h + head, as in the JAX code. The JAX key bias `Wk_b` (use_bias=True) adds the same constant
to every score of a (query, head) softmax, so it cannot change the output: it has no counterpart
here, and with `qkv_bias=True` only to_v and to_out get a bias.
The JAX layer's other options (attn_scale modes other than 'normal', contextual/absolute position
embeddings, query max-norm) are not implemented; QnA-ViT uses the defaults reproduced here.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvit_kernels.ops import qna_attention

__all__ = ["QnA", "lecun_normal_", "truncated_normal_"]

# The JAX default kernel initialiser, lecun_normal: a normal truncated to +-2 std, rescaled so the
# variance stays 1 / fan_in (0.8796... is the std of a unit normal truncated to [-2, 2]).
_TRUNCATED_STD = 0.87962566103423978


@torch.no_grad()
def truncated_normal_(tensor: Tensor, std: float) -> Tensor:
    """N(0, std^2) truncated to [-2 std, 2 std], in place, by resampling the ~4.6% of samples
    that fall outside (much faster on CPU than nn.init.trunc_normal_'s inverse-CDF method)."""
    tensor.normal_(0.0, std)
    if tensor.device.type == "meta" or not tensor.is_contiguous():
        if tensor.device.type != "meta":
            nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)
        return tensor
    flat = tensor.view(-1)
    redo = (flat.abs() > 2 * std).nonzero().squeeze(1)  # one pass over the tensor
    while redo.numel():
        samples = flat.new_empty(redo.numel()).normal_(0.0, std)
        inside = samples.abs() <= 2 * std
        flat[redo[inside]] = samples[inside]
        redo = redo[~inside]
    return tensor


def lecun_normal_(tensor: Tensor, fan_in: int) -> Tensor:
    """Flax's `lecun_normal()` initialiser (truncated normal, variance 1 / fan_in), in place."""
    return truncated_normal_(tensor, math.sqrt(1.0 / fan_in) / _TRUNCATED_STD)


class QnA(nn.Module):
    """QnA learned-query local attention on channels-last images.

    Args:
        in_dim: channels of the input.
        dim: features F of the attention (queries, keys, values); must be divisible by `heads`.
        heads: number of heads h (head width d = dim // heads).
        num_queries: learned queries Q per head (the paper uses 2).
        kernel_size: odd window size k (3 or 7 in QnA-ViT).
        stride: 1, or 2 for the downsampling layer (output pixel o attends the window centred on
            input pixel o * stride; out-of-image positions are masked).
        qkv_bias: biases on to_v and to_out (QnA-ViT uses none).
        out_dim: output channels of to_out (default: dim).
        normalize_queries: L2-normalise each query head (the paper's setting) before the d^-0.5
            scaling.

    Input [B, H, W, in_dim]; output [B, Ho, Wo, out_dim], Ho = (H - 1) // stride + 1.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        heads: int,
        num_queries: int = 2,
        kernel_size: int = 3,
        stride: int = 1,
        qkv_bias: bool = False,
        out_dim: Optional[int] = None,
        normalize_queries: bool = True,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"QnA: dim ({dim}) must be divisible by heads ({heads})")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"QnA: kernel_size must be odd and >= 1, got {kernel_size}")
        if stride < 1:
            raise ValueError(f"QnA: stride must be >= 1, got {stride}")
        if num_queries < 1:
            raise ValueError(f"QnA: num_queries must be >= 1, got {num_queries}")
        self.in_dim = in_dim
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.num_queries = num_queries
        self.kernel_size = kernel_size
        self.stride = stride
        self.normalize_queries = normalize_queries
        out_dim = dim if out_dim is None else out_dim
        self.out_dim = out_dim
        kk = kernel_size * kernel_size

        self.query = nn.Parameter(torch.empty(num_queries, dim, **dd))
        self.wk = nn.Parameter(torch.empty(in_dim, dim, **dd))
        self.to_v = nn.Linear(in_dim, dim, bias=qkv_bias, **dd)
        self.to_out = nn.Linear(dim, out_dim, bias=qkv_bias, **dd)
        self.rpe = nn.Parameter(torch.empty(kk, num_queries, heads, **dd))
        self.attn_scale = nn.Parameter(torch.empty(kk, num_queries, heads, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The JAX initialisation: queries truncated normal (std sqrt(1/d), cut at +-2 std), the
        projections lecun_normal with zero biases, rpe zeros, attn_scale N(0, 0.02)."""
        truncated_normal_(self.query, math.sqrt(1.0 / self.head_dim))
        lecun_normal_(self.wk, self.in_dim)
        for linear in (self.to_v, self.to_out):
            lecun_normal_(linear.weight, linear.in_features)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.rpe)
        nn.init.normal_(self.attn_scale, std=0.02)

    def normalized_queries(self) -> Tensor:
        """The queries as the attention uses them: [Q, h, d], unit norm per head, times d^-0.5."""
        q = self.query.view(self.num_queries, self.heads, self.head_dim)
        if self.normalize_queries:
            q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + 1e-6)
        return q * self.head_dim ** -0.5

    def score_weight(self) -> Tensor:
        """W_k q̂ as a [Q*h, in_dim] matrix (Linear layout): row q*h + head gives the score of
        query q, head `head` at a pixel from that pixel's input features."""
        wk = self.wk.view(self.in_dim, self.heads, self.head_dim)
        return torch.einsum("chd,qhd->qhc", wk, self.normalized_queries()).reshape(-1, self.in_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"QnA expects a channels-last image [B, H, W, C={self.in_dim}], "
                f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
            )
        B, H, W, _ = x.shape
        Q, h, d = self.num_queries, self.heads, self.head_dim
        # One matmul for the values and the scores: [B, H, W, dim + Q*h].
        weight = torch.cat([self.to_v.weight, self.score_weight().to(self.to_v.weight.dtype)], dim=0)
        bias = self.to_v.bias
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(Q * h)])
        # split (not two slices): its backward writes both gradients into one buffer with a
        # single cat, where each slice's backward would zero-fill and copy a full-size buffer.
        v, cost = F.linear(x, weight, bias).split([self.dim, Q * h], dim=-1)
        v = v.unflatten(-1, (h, d))  # [B, H, W, h, d], a view
        cost = cost.unflatten(-1, (Q, h))  # [B, H, W, Q, h], a view
        out = qna_attention(cost, v, self.rpe, self.attn_scale, kernel_size=self.kernel_size, stride=self.stride)
        return self.to_out(out.flatten(-2))  # [B, Ho, Wo, out_dim]

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, dim={self.dim}, heads={self.heads}, num_queries={self.num_queries}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
            + (f", out_dim={self.out_dim}" if self.out_dim != self.dim else "")
        )
