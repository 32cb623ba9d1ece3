"""LeViT attention modules on the fused `bias_attention` op (docs/bias_attention.md, "Definition").

`BiasAttention` replaces timm's `levit.Attention` and `ShrinkAttention` replaces timm's
`levit.AttentionDownsample`. Both take the same constructor arguments, have the same submodules,
parameters and buffers (so a timm state_dict loads strictly, either way) and compute the same
function; only the attention core differs: softmax(q kᵀ·scale + bias) v (and the Hardswish or
SiLU that follows it) runs as one op that reads q, k and v in place from the fused projection and
gathers the bias itself.

    BiasAttention.from_timm(m)   # shares m's parameters, buffers and submodules (no copies)
    module.to_timm()             # the reverse, for unpatching

timm is needed only by `from_timm` / `to_timm`; building the modules directly does not import it.

Notes on behaviour:
  * `attention_bias_cache` / `get_attention_biases` keep timm's eval-mode semantics (filled per
    device string in eval, cleared by `train()` and `_apply()` (`.to()`, `.half()`, ...)), for code
    that calls them. `forward` does not use the cache: the op gathers `attention_biases` itself on
    every call, so (unlike timm) edits to `attention_biases` in eval mode are seen at once.
  * When `proj.act` is an `nn.Hardswish` (most variants) or an `nn.SiLU` (the `*d`/`512`/`s8`
    variants) it runs inside the op (activation="hardswish" / "silu", forward and backward) and
    `proj.ln` is called directly; any other activation is applied by `proj` as in timm. BatchNorm
    folding (patch/batchnorm.py) keeps `proj.act` and turns `proj.ln` into a Linear / Conv2d, so
    a folded module still fuses its activation.
  * Conv layout: the op's output memory is [B, N, H, Dv] = channels-last [B, H·Dv, R0, R1], so
    `proj` receives a channels-last tensor (a view, no copy); values are the same as timm's.
  * `forward` has no data-dependent Python control flow, so it compiles without graph breaks;
    `torch.fx.symbolic_trace` records the op and the token-count check as calls (both are
    `torch.fx.wrap`ped); `torch.jit.script` calls the native dispatcher op directly
    (docs/patching.md, "Workflows").
"""

import copy
from collections import OrderedDict
from typing import Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from fastvit_kernels import _native
from fastvit_kernels.ops import bias_attention

# FX records these as calls (evaluated when the traced module runs) instead of tracing into them.
torch.fx.wrap("bias_attention")
torch.fx.wrap("check_token_count")

__all__ = ["BiasAttention", "ShrinkAttention", "LinearNorm", "ConvNorm", "Subsample", "levit_bias_index"]

Resolution = Union[int, Tuple[int, int]]

# proj.act classes the op runs as its epilogue (docs/bias_attention.md, "Definition").
_FUSED_ACTIVATIONS = {nn.Hardswish: "hardswish", nn.SiLU: "silu"}

def _pair(value: Resolution) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"resolution must be an int or a pair of ints, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def check_token_count(module: str, resolution: Tuple[int, int], tokens: int) -> None:
    """Raise ValueError unless `tokens` fills the R0×R1 grid the module was built for."""
    expected = resolution[0] * resolution[1]
    if tokens != expected:
        raise ValueError(
            f"{module} was built for a {resolution[0]}x{resolution[1]} token grid ({expected} tokens), "
            f"got {tokens} tokens"
        )


def levit_bias_index(resolution: Tuple[int, int], stride: int = 1, device=None) -> Tensor:
    """LeViT's relative-position index, int64 [Nq, Nk]: keys on the R0×R1 grid, queries on its
    stride-`stride` subgrid (stride 1: every token), idx(i, j) = |s·qy_i − ky_j|·R1 + |s·qx_i − kx_j|
    (coordinates in row-major order, as timm's ndgrid + flatten)."""
    R0, R1 = resolution

    def grid(step: int) -> Tensor:
        rows, cols = (torch.arange(0, r, step, device=device, dtype=torch.long) for r in (R0, R1))
        return torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)

    rel = (grid(stride)[:, :, None] - grid(1)[:, None, :]).abs()
    return rel[0] * R1 + rel[1]


# ---------------------------------------------------------------------------------------------
# Building blocks with the same structure (and state_dict keys) as timm's LeViT layers
# ---------------------------------------------------------------------------------------------


class LinearNorm(nn.Module):
    """Linear (no bias) then BatchNorm1d over all tokens: timm's `levit.LinearNorm`."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False, **dd)
        self.bn = nn.BatchNorm1d(out_features, **dd)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class ConvNorm(nn.Module):
    """Conv2d (no bias) then BatchNorm2d: timm's `levit.ConvNorm`."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bn_weight_init: float = 1, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.linear(x))


class Subsample(nn.Module):
    """Token-grid subsampling for [B, N, C] tokens: timm's `levit.Downsample`.

    Keeps every `stride`-th row and column (ceil(R/stride) of them), or with `use_pool` averages
    3×3 windows (stride `stride`, padding 1, padding not counted), as timm does.
    """

    def __init__(self, stride: int, resolution: Resolution, use_pool: bool = False, device=None, dtype=None):
        super().__init__()
        self.stride = stride
        self.resolution = _pair(resolution)
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False) if use_pool else None

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        x = x.view(B, self.resolution[0], self.resolution[1], C)
        if self.pool is not None:
            x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            x = x[:, :: self.stride, :: self.stride]
        return x.reshape(B, -1, C)


# ---------------------------------------------------------------------------------------------
# Shared behaviour: bias cache, index buffer, swapping classes with timm
# ---------------------------------------------------------------------------------------------


def adopt(source: nn.Module, cls: type) -> nn.Module:
    """A `cls` instance that shares everything `source` holds (parameters, buffers, submodules,
    hooks, attributes): the same tensors, no copies, so optimizer state stays valid. The
    containers are copied, so registering a new parameter on one does not change the other."""
    target = cls.__new__(cls)
    state = dict(source.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in state:
            state[key] = copy.copy(state[key])
    if "attention_bias_cache" in state:
        state["attention_bias_cache"] = {}  # timm's eval-mode cache of gathered biases: not shared
    target.__dict__.update(state)
    return target


def _timm_class(name: str) -> type:
    try:
        from timm.models import levit
    except ImportError as error:  # pragma: no cover - timm is optional for the modules
        raise ImportError(f"fastvit_kernels: converting to or from timm needs timm ({error})") from error
    return getattr(levit, name)


class _LevitBiasAttentionBase(nn.Module):
    """What BiasAttention and ShrinkAttention share (the parts timm repeats in both classes)."""

    attention_bias_cache: Dict[str, Tensor]
    TIMM_CLASS: str = ""  # name of the timm.models.levit class this module replaces

    # -- timm's eval-mode bias cache ------------------------------------------------------------

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        if self.attention_bias_cache:
            self.attention_bias_cache = {}  # clear the cache, as timm does
        return self

    def _apply(self, fn, *args, **kwargs):
        self.attention_bias_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def get_attention_biases(self, device: torch.device) -> Tensor:
        """attention_biases[:, attention_bias_idxs] ([H, Nq, Nk]); cached per device in eval mode.

        Kept for compatibility with code that calls it on timm's modules; `forward` does not
        use it (the fused op gathers the bias from the table)."""
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        device_key = str(device)
        if device_key not in self.attention_bias_cache:
            self.attention_bias_cache[device_key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[device_key]

    # -- parameters and buffers -----------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Zero the bias table and compute the index buffer (timm's initialisation)."""
        nn.init.zeros_(self.attention_biases)
        self._init_buffers()

    def _init_buffers(self) -> None:
        self.attention_bias_idxs.copy_(self._compute_attention_bias_idxs(device=self.attention_bias_idxs.device))
        self.attention_bias_cache = {}

    def init_non_persistent_buffers(self) -> None:
        """Recompute non-persistent buffers (e.g. after building on the meta device)."""
        self._init_buffers()

    def _compute_attention_bias_idxs(self, device=None) -> Tensor:
        raise NotImplementedError

    # -- the op -----------------------------------------------------------------------------------

    def _fused_activation(self) -> Optional[str]:
        """The op's activation for `proj.act`, or None when the op cannot fuse it."""
        if torch.jit.is_scripting():
            # TorchScript cannot isinstance-check against a module class it has not compiled:
            # __prepare_scriptable__ decided in Python.
            name = self._scripted_activation
            return None if name == "none" else name
        return _FUSED_ACTIVATIONS.get(type(self.proj.act))

    def _project(self, x: Tensor, fused: Optional[str]) -> Tensor:
        return self.proj.ln(x) if fused is not None else self.proj(x)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, fused: Optional[str]) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot call the Python wrapper: it calls the native dispatcher op, whose
            # autograd is C++ (the pre-activation output is kept only when a backward can follow).
            if q.device.type != "cpu":
                raise RuntimeError(
                    "BiasAttention under TorchScript runs the native CPU kernels only; on CUDA use the "
                    "module itself (eager or torch.compile)"
                )
            activation = fused if fused is not None else "none"
            needs_grad = torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad or self.attention_biases.requires_grad
            )
            return torch.ops.fastvit_kernels.bias_attention_forward(
                q, k, v, self.attention_biases, self.attention_bias_idxs, None, self.scale, activation,
                activation != "none" and needs_grad,
            )[0]
        return bias_attention(
            q, k, v, self.attention_biases, self.attention_bias_idxs, scale=self.scale, activation=fused
        )

    def __prepare_scriptable__(self):
        # Called by torch.jit.script before compiling forward: fix the activation as a string, and
        # say why scripting cannot work here instead of TorchScript's "unknown builtin op".
        self._scripted_activation = self._fused_activation() or "none"
        _native.require_for_script(type(self).__name__, "bias_attention_forward")
        return self

    # -- timm conversion --------------------------------------------------------------------------

    @classmethod
    def from_timm(cls, module: nn.Module):
        """The replacement for a timm module, sharing its parameters, buffers and submodules."""
        timm_cls = _timm_class(cls.TIMM_CLASS)
        if type(module) is not timm_cls:
            raise TypeError(
                f"{cls.__name__}.from_timm expects a timm.models.levit.{cls.TIMM_CLASS}, "
                f"got {type(module).__module__}.{type(module).__qualname__}"
            )
        return adopt(module, cls)

    def to_timm(self) -> nn.Module:
        """The timm module this replaces, sharing this module's parameters, buffers and submodules."""
        return adopt(self, _timm_class(self.TIMM_CLASS))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, "
            f"resolution={tuple(self.resolution)}, use_conv={self.use_conv}"
        )


# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------


class BiasAttention(_LevitBiasAttentionBase):
    """LeViT attention block core with a learned relative-position bias (timm `levit.Attention`).

    Input/output: [B, N, dim] tokens (N = R0·R1), or [B, dim, R0, R1] with `use_conv=True`.
    """

    TIMM_CLASS = "Attention"

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: Resolution = 14, use_conv: bool = False, act_layer: Type[nn.Module] = nn.SiLU,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        ln_layer = ConvNorm if use_conv else LinearNorm
        resolution = _pair(resolution)

        self.use_conv = use_conv
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = int(attn_ratio * key_dim) * num_heads
        self.resolution = resolution

        self.qkv = ln_layer(dim, self.val_attn_dim + self.key_attn_dim * 2, **dd)
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()),
            ("ln", ln_layer(self.val_attn_dim, dim, bn_weight_init=0, **dd)),
        ]))

        N = resolution[0] * resolution[1]
        self.attention_biases = nn.Parameter(torch.empty(num_heads, N, **dd))
        self.register_buffer(
            "attention_bias_idxs", torch.empty((N, N), device=device, dtype=torch.long), persistent=False
        )
        self.attention_bias_cache = {}
        self.reset_parameters()

    def _compute_attention_bias_idxs(self, device=None) -> Tensor:
        """idx(i, j) = |y_i − y_j|·R1 + |x_i − x_j| over the R0×R1 grid."""
        return levit_bias_index(self.resolution, 1, device)

    def forward(self, x: Tensor) -> Tensor:
        fused = self._fused_activation()
        H, Dk, Dv = self.num_heads, self.key_dim, self.val_dim
        if self.use_conv:
            B, C, R0, R1 = x.shape
            N = R0 * R1
            check_token_count("BiasAttention", self.resolution, N)
            # channels are laid out per head: [B, H, 2·Dk + Dv, N]
            q, k, v = self.qkv(x).view(B, H, -1, N).split([Dk, Dk, Dv], dim=2)
            out = self._attend(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), fused)
            # out is [B, H, N, Dv] in [B, N, H, Dv] memory: a channels-last [B, H·Dv, R0, R1] view
            x = out.transpose(1, 2).reshape(B, R0, R1, self.val_attn_dim).permute(0, 3, 1, 2)
        else:
            B, N, C = x.shape
            check_token_count("BiasAttention", self.resolution, N)
            q, k, v = self.qkv(x).view(B, N, H, -1).split([Dk, Dk, Dv], dim=3)
            out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), fused)
            x = out.transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self._project(x, fused)


class ShrinkAttention(_LevitBiasAttentionBase):
    """LeViT shrink attention: queries on a stride-`stride` subgrid (timm `levit.AttentionDownsample`).

    Input [B, N, in_dim] (N = R0·R1) → output [B, ceil(R0/s)·ceil(R1/s), out_dim]; or with
    `use_conv=True`, [B, in_dim, R0, R1] → [B, out_dim, ceil(R0/s), ceil(R1/s)].
    """

    TIMM_CLASS = "AttentionDownsample"

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 2.0,
                 stride: int = 2, resolution: Resolution = 14, use_conv: bool = False,
                 use_pool: bool = False, act_layer: Type[nn.Module] = nn.SiLU, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        resolution = _pair(resolution)

        self.stride = stride
        self.resolution = resolution
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.key_attn_dim = key_dim * num_heads
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * self.num_heads
        self.scale = key_dim ** -0.5
        self.use_conv = use_conv

        if use_conv:
            ln_layer = ConvNorm
            down = nn.AvgPool2d(
                kernel_size=3 if use_pool else 1,
                stride=stride,
                padding=1 if use_pool else 0,
                count_include_pad=False,
            )
        else:
            ln_layer = LinearNorm
            down = Subsample(stride=stride, resolution=resolution, use_pool=use_pool, **dd)

        self.kv = ln_layer(in_dim, self.val_attn_dim + self.key_attn_dim, **dd)
        self.q = nn.Sequential(OrderedDict([
            ("down", down),
            ("ln", ln_layer(in_dim, self.key_attn_dim, **dd)),
        ]))
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()),
            ("ln", ln_layer(self.val_attn_dim, out_dim, **dd)),
        ]))

        N_k = resolution[0] * resolution[1]
        N_q = -(-resolution[0] // stride) * -(-resolution[1] // stride)  # ceiling division
        self.attention_biases = nn.Parameter(torch.empty(num_heads, N_k, **dd))
        self.register_buffer(
            "attention_bias_idxs", torch.empty((N_q, N_k), device=device, dtype=torch.long), persistent=False
        )
        self.attention_bias_cache = {}
        self.reset_parameters()

    @property
    def query_resolution(self) -> Tuple[int, int]:
        """The query grid: ceil(R0 / stride) × ceil(R1 / stride)."""
        return (self.resolution[0] - 1) // self.stride + 1, (self.resolution[1] - 1) // self.stride + 1

    def _compute_attention_bias_idxs(self, device=None) -> Tensor:
        """idx(i, j) = |s·qy_i − ky_j|·R1 + |s·qx_i − kx_j| (s = stride)."""
        return levit_bias_index(self.resolution, self.stride, device)

    def forward(self, x: Tensor) -> Tensor:
        fused = self._fused_activation()
        H, Dk, Dv = self.num_heads, self.key_dim, self.val_dim
        if self.use_conv:
            B, C, R0, R1 = x.shape
            N = R0 * R1
            check_token_count("ShrinkAttention", self.resolution, N)
            Q0, Q1 = (R0 - 1) // self.stride + 1, (R1 - 1) // self.stride + 1
            k, v = self.kv(x).view(B, H, -1, N).split([Dk, Dv], dim=2)
            q = self.q(x).view(B, H, Dk, -1)
            out = self._attend(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), fused)
            x = out.transpose(1, 2).reshape(B, Q0, Q1, self.val_attn_dim).permute(0, 3, 1, 2)
        else:
            B, N, C = x.shape
            check_token_count("ShrinkAttention", self.resolution, N)
            k, v = self.kv(x).view(B, N, H, -1).split([Dk, Dv], dim=3)
            q = self.q(x).view(B, -1, H, Dk)
            out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), fused)
            x = out.transpose(1, 2).reshape(B, -1, self.val_attn_dim)
        return self._project(x, fused)
