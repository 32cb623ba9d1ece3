"""GGeM: group generalized-mean pooling of tokens (Ko et al., 2022; docs/ggem_pool.md, "Definition").

`GGeM` pools [B, N, C] tokens into [B, C] with one learnable exponent per channel group:

    y[b, c] = ((1/M) Σ_n max(x[b, n, c], eps) ^ p_g) ^ (1 / p_g),   g = the group of channel c

over the M = N - num_prefix_tokens patch tokens (cls / register tokens are skipped in place).
With groups = the number of attention heads it is the paper's ViT pooling; `patch_timm(model,
pool="ggem")` installs it as a timm VisionTransformer's pooling (its `attn_pool` slot).

The exponents are a float32 Parameter (a buffer with learnable=False), also under half-precision
inputs: the op accepts p in float32 or in the inputs' dtype. The whole pooling runs as one fused
op (`fastvit_kernels.ops.ggem_pool`), which reads x once per direction and stays finite for large
p and inputs near eps.
"""

import math

import torch
import torch.nn as nn
from torch import Tensor

from fastvit_kernels import _native
from fastvit_kernels.ops import ggem_pool
from fastvit_kernels.ops.ggem_pool import LAYOUTS

# FX records the op as a call (evaluated when the traced module runs) instead of tracing into it.
torch.fx.wrap("ggem_pool")

__all__ = ["GGeM"]


class GGeM(nn.Module):
    """Group generalized-mean pooling, [B, N, C] -> [B, C].

    Args:
        dim: channels C.
        groups: channel groups G (C must be divisible by G); one exponent p per group.
        p: initial exponent (> 0) of every group (3.0 in the paper; 1 is the mean, large p
            approaches the max).
        eps: inputs are clamped to >= eps before the power.
        layout: "contiguous" (channel c in group c // (C / G)) or "interleaved" (c % G).
        learnable: p is a Parameter (True) or a fixed buffer (False).
        num_prefix_tokens: leading tokens to skip (cls / register tokens); 0 when the caller
            passes the patch tokens only (as timm's VisionTransformer does).
    """

    def __init__(
        self,
        dim: int,
        groups: int,
        p: float = 3.0,
        eps: float = 1e-6,
        layout: str = "contiguous",
        learnable: bool = True,
        num_prefix_tokens: int = 0,
    ):
        super().__init__()
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"GGeM: dim must be divisible by groups >= 1, got dim={dim}, groups={groups}")
        if not (isinstance(p, (int, float)) and 0 < float(p) < math.inf):
            raise ValueError(f"GGeM: p must be a finite float > 0, got {p!r}")
        if not (isinstance(eps, (int, float)) and 0 < float(eps) < math.inf):
            raise ValueError(f"GGeM: eps must be a finite float > 0, got {eps!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"GGeM: layout must be one of {LAYOUTS}, got {layout!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"GGeM: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.dim = int(dim)
        self.groups = int(groups)
        self.eps = float(eps)
        self.layout = layout
        self.num_prefix_tokens = int(num_prefix_tokens)
        initial = torch.full((self.groups,), float(p), dtype=torch.float32)
        if learnable:
            self.p = nn.Parameter(initial)
        else:
            self.register_buffer("p", initial)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot call the Python wrapper: it calls the native dispatcher op (C++ autograd).
            if x.device.type != "cpu":
                raise RuntimeError(
                    "GGeM under TorchScript runs the native CPU kernels only; on CUDA use the module "
                    "itself (eager or torch.compile)"
                )
            return torch.ops.fastvit_kernels.ggem_pool_forward(
                x, self.p, self.groups, self.eps, self.layout == "interleaved", self.num_prefix_tokens
            )[0]
        return ggem_pool(
            x,
            self.p,
            groups=self.groups,
            eps=self.eps,
            layout=self.layout,
            num_prefix_tokens=self.num_prefix_tokens,
        )

    def __prepare_scriptable__(self):
        # Called by torch.jit.script before compiling forward: say why scripting cannot work here.
        _native.require_for_script("GGeM", "ggem_pool_forward")
        return self

    def extra_repr(self) -> str:
        text = f"dim={self.dim}, groups={self.groups}, eps={self.eps:g}, layout={self.layout!r}"
        if self.num_prefix_tokens:
            text += f", num_prefix_tokens={self.num_prefix_tokens}"
        if not isinstance(self.p, nn.Parameter):
            text += ", learnable=False"
        return text
