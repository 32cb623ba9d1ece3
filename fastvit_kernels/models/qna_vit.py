"""QnA-ViT ("Learned Queries for Efficient Local Attention", Arar et al., CVPR 2022; docs/qna_attention.md, "Shapes in real models").

A PyTorch version of the JAX original (moabarar/qna, `models/qna_vit.py`) on the fused ops:
the QnA layers run `fastvit_kernels.ops.qna_attention`, the self-attention layers run
`fastvit_kernels.ops.bias_attention`. Tensors are channels-last [B, H, W, C] throughout.

Structure (the original's, for every variant):
    stem        Conv2d(in_chans, C, 4, stride 4, no bias)                -> H/4 x W/4 tokens
    stage i     lsa_depths[i] self-attention blocks ("LSA") on windows of lsa_windows[i]
                with a Swin relative-position bias, heads lsa_heads[i]; then
                qna_depths[i] QnA blocks (k x k, stride 1, heads qna_heads[i]); then, at every
                stage but the last, a strided QnA block (stride 2, features and heads doubled)
                whose skip path is a 1x1 stride-2 convolution without bias
    head        LayerNorm, global average pool, (dropout), Linear(num_classes)
Every block is pre-LayerNorm (eps 1e-6) with a residual, then an MLP (ratio 4, GELU, biases)
with its own pre-LayerNorm and residual. The MLP's GELU is the tanh approximation, as Flax's
`nn.gelu` (pass act_layer=nn.GELU for the exact one).

    model        C per stage        QnA heads (d)      QnA / LSA blocks     k   params    GMACs @224
    tiny         64/128/256/512     8/16/32/64 (8)     2/3/2/0 + 0/0/4/2    3   15.72M    2.414
    tiny_7x7     same               same               same                 7   15.75M    2.463
    small        same               same               2/3/6/0 + 0/0/12/2   3   24.97M    4.334
    base         96/192/384/768     6/12/24/48 (16)    2/3/6/0 + 0/0/12/2   3   55.67M    9.490
The paper's table: 16M / 2.5G, 16M / 2.6G, 25M / 4.4G, 56M / 9.7G (its "FLOPs" are MACs). Our
MACs are matmuls and convolutions plus the fused ops' own arithmetic (fastvit_kernels/flops.py);
counting the QnA attention as the JAX original computes it (grouped convolutions over Q*F
channels) gives 2.423 / 2.511 / 4.345 / 9.506, 1.3-3.4% under the paper, which presumably also
counts some elementwise work (the repository does not say how the table was counted).

Windows. At 224 x 224 the stage-2 map is 14 x 14 and the stage-3 map 7 x 7, so the LSA windows
(14 and 7) cover the whole map: full attention. A window larger than the map (other input
sizes) shrinks to the map (full attention again), using the centre of its relative-position table, so
any input whose maps are divisible by min(window, map) runs (e.g. 64, 112, 448); others raise.

Stochastic depth (drop_path_rate) is spaced linearly over all blocks in order, the strided blocks
included (the original's drop_path_downsample=True). The strided block's attention branch gets no
drop path (its skip is a convolution, not the identity); its MLP branch does. As in the original,
the LSA blocks run on window batches, so their drop path drops per window (per image at 224,
where there is one window).

Parameter names, relative to the JAX parameters (kernels of Dense layers are transposed; Conv
kernels [kh, kw, in, out] are permuted to [out, in, kh, kw]):
    stem.weight                                 StemBlock_0/conv_1x1/kernel
    stages.i.lsa_blocks.j.attn.to_qkv.weight    .../MSA_Block_{j+1}/.../to_qkv/kernel; the per-head
                                                layout [h, (q, k, v), d] is the original's
    stages.i.lsa_blocks.j.attn.relative_position_bias_table   .../rpe_bias [(2w-1)^2, heads]
    stages.i.lsa_blocks.j.attn.to_out.weight    .../to_out/kernel
    stages.i.qna_blocks.j.attn.*                QnA_Block_{j+1}/FusedKQnA_0/* (see modules/qna.py)
    stages.i.downsample.attn.* / .skip.weight   QnA_Block_{n+1}_stride_2/FusedKQnA_0/*, /Conv_0
    *.norm1 / *.norm2 / *.mlp.fc1 / *.mlp.fc2   LayerNorm_0 / LayerNorm_1 / MlpBlock_0/Dense_0, _1
    norm / head                                 ClassificationHead_0/LayerNorm_0, /head_logits
No pretrained weights are provided (the original's checkpoints are JAX; `pretrained=True` raises).
"""

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastvit_kernels.modules.qna import QnA, lecun_normal_
from fastvit_kernels.ops import bias_attention
from fastvit_kernels.models._timm import attach_cfg, pop_timm_kwargs, register_with_timm

__all__ = [
    "QnAViT",
    "WindowAttention",
    "QnAViTBlock",
    "QnAViTStage",
    "qna_vit_tiny",
    "qna_vit_tiny_7x7",
    "qna_vit_small",
    "qna_vit_base",
    "swin_bias_index",
]

LN_EPS = 1e-6
GeluTanh = partial(nn.GELU, approximate="tanh")


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: zero the branch of whole samples (dim 0) with probability `drop_prob`
    in training, scaling the kept ones by 1 / (1 - drop_prob). (No timm needed.)"""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module] = GeluTanh):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


_index_cache: Dict[Tuple[int, int, int, str], Tensor] = {}


def swin_bias_index(window: int, size: Tuple[int, int], device=None) -> Tensor:
    """Swin's relative-position index, int64 [N, N] with N = size[0] * size[1], into a table of
    (2 * window - 1)^2 rows: idx(i, j) = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
    with (dy, dx) = position i - position j (row-major positions in the size[0] x size[1]
    window). A window smaller than `window` uses the centre of the table."""
    if size[0] > window or size[1] > window:
        raise ValueError(f"swin_bias_index: window {size} is larger than the table's {window}x{window}")
    key = (window, size[0], size[1], str(device))
    index = _index_cache.get(key)
    if index is None:
        # Built on the CPU (whatever the default device), then moved; never as an inference tensor
        # (a first call under torch.inference_mode would otherwise cache one, which a later
        # training step cannot save for backward and the bias cache of bias_attention skips).
        with torch.inference_mode(False):
            rows, cols = torch.meshgrid(
                torch.arange(size[0], device="cpu"), torch.arange(size[1], device="cpu"), indexing="ij"
            )
            coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, N]
            rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], in [0, 2w-2]
            index = (rel[0] * (2 * window - 1) + rel[1]).to(device)
        if not torch.compiler.is_compiling():  # a tensor made while tracing must not outlive the trace
            _index_cache[key] = index
    return index


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias.

    Input/output: window batches [B', wh, ww, dim] with wh, ww <= window_size. The attention core
    is one `bias_attention` call that reads q, k, v in place from the fused to_qkv projection and
    gathers the bias from the [T, heads] table itself.
    """

    def __init__(self, dim: int, heads: int, window_size: int, qkv_bias: bool = False):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"WindowAttention: dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window_size = window_size
        self.scale = self.head_dim ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        self.to_out = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, wh, ww, C = x.shape
        N, h, d = wh * ww, self.heads, self.head_dim
        # The original's per-head layout: features [h, (q | k | v), d].
        q, k, v = self.to_qkv(x).view(B, N, h, 3 * d).split(d, dim=-1)
        index = swin_bias_index(self.window_size, (wh, ww), x.device)
        out = bias_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            self.relative_position_bias_table.t(),
            index,
            scale=self.scale,
        )
        # out is [B', h, N, d] laid out [B', N, h, d]: this reshape is a view.
        return self.to_out(out.transpose(1, 2).reshape(B, wh, ww, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, window_size={self.window_size}"


class StridedSkip(nn.Module):
    """The strided block's skip path: a 1x1 stride-2 convolution without bias, on [B, H, W, C]
    (computed as a matmul of the subsampled pixels; the weight is a Conv2d's [out, in, 1, 1])."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, 1, 1))
        lecun_normal_(self.weight, in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x[:, :: self.stride, :: self.stride], self.weight.flatten(1))


class QnAViTBlock(nn.Module):
    """Pre-LN residual block: x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x))).

    With `skip` (the strided block), the first residual adds skip(x) instead of x and the
    attention branch gets no drop path."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        attn: nn.Module,
        skip: Optional[nn.Module] = None,
        drop_path: float = 0.0,
        mlp_ratio: float = 4.0,
        act_layer: Callable[[], nn.Module] = GeluTanh,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = attn
        self.skip = skip
        self.drop_path1 = DropPath(drop_path) if skip is None and drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(out_dim, eps=LN_EPS)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        x = shortcut + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def window_partition(x: Tensor, wh: int, ww: int) -> Tensor:
    """[B, H, W, C] -> [B * (H/wh) * (W/ww), wh, ww, C] (a view when there is one window)."""
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C).transpose(2, 3)
    return x.reshape(-1, wh, ww, C)


def window_merge(x: Tensor, B: int, H: int, W: int) -> Tensor:
    """The inverse of window_partition."""
    wh, ww, C = x.shape[1:]
    x = x.view(B, H // wh, W // ww, wh, ww, C).transpose(2, 3)
    return x.reshape(B, H, W, C)


class QnAViTStage(nn.Module):
    """LSA blocks (on windows), QnA blocks, then optionally the strided QnA block."""

    def __init__(
        self,
        index: int,
        dim: int,
        lsa_depth: int,
        lsa_heads: int,
        lsa_window: int,
        qna_depth: int,
        qna_heads: int,
        kernel_size: int,
        num_queries: int,
        downsample: bool,
        drop_path: Sequence[float],
        mlp_ratio: float,
        act_layer: Callable[[], nn.Module],
    ):
        super().__init__()
        self.index = index
        self.dim = dim
        self.out_dim = 2 * dim if downsample else dim
        self.lsa_window = lsa_window
        block = partial(QnAViTBlock, mlp_ratio=mlp_ratio, act_layer=act_layer)
        dp = iter(drop_path)
        self.lsa_blocks = nn.Sequential(*[
            block(dim, dim, WindowAttention(dim, lsa_heads, lsa_window), drop_path=next(dp))
            for _ in range(lsa_depth)
        ])
        self.qna_blocks = nn.Sequential(*[
            block(dim, dim, QnA(dim, dim, qna_heads, num_queries, kernel_size, 1), drop_path=next(dp))
            for _ in range(qna_depth)
        ])
        self.downsample = None
        if downsample:
            attn = QnA(dim, 2 * dim, 2 * qna_heads, num_queries, kernel_size, stride=2)
            self.downsample = block(dim, 2 * dim, attn, skip=StridedSkip(dim, 2 * dim), drop_path=next(dp))

    def window_for(self, H: int, W: int) -> Tuple[int, int]:
        wh, ww = min(self.lsa_window, H), min(self.lsa_window, W)
        if H % wh or W % ww:
            raise ValueError(
                f"QnA-ViT stage {self.index}: the {H}x{W} feature map cannot be split into "
                f"{wh}x{ww} attention windows (window {self.lsa_window}, shrunk to the map when "
                f"larger). Use an input whose stage maps are divisible by the windows, e.g. 224 "
                f"(maps 56/28/14/7) or 448."
            )
        return wh, ww

    def forward(self, x: Tensor) -> Tensor:
        if len(self.lsa_blocks):
            B, H, W, _ = x.shape
            wh, ww = self.window_for(H, W)
            x = window_merge(self.lsa_blocks(window_partition(x, wh, ww)), B, H, W)
        x = self.qna_blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _per_stage(value, n: int, name: str) -> Tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(f"QnAViT: {name} must have {n} entries (one per stage), got {value!r}")
        return tuple(value)
    return (value,) * n


class QnAViT(nn.Module):
    """QnA-ViT on [B, in_chans, H, W] images (timm-style API: forward_features, forward_head,
    reset_classifier, num_classes, num_features, default_cfg / pretrained_cfg).

    `forward_features` returns the normalised final map, channels last [B, H/32, W/32, C]."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        embed_dim: int = 64,
        qna_depths: Sequence[int] = (2, 3, 2, 0),
        qna_heads: Sequence[int] = (8, 16, 32, 64),
        qna_kernel_size: Union[int, Sequence[int]] = 3,
        num_queries: int = 2,
        lsa_depths: Sequence[int] = (0, 0, 4, 2),
        lsa_heads: Sequence[int] = (2, 4, 8, 16),
        lsa_windows: Sequence[int] = (7, 7, 14, 7),
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.05,
        drop_path_downsample: bool = True,
        act_layer: Callable[[], nn.Module] = GeluTanh,
    ):
        super().__init__()
        n = len(qna_depths)
        lsa_depths = _per_stage(lsa_depths, n, "lsa_depths")
        lsa_heads = _per_stage(lsa_heads, n, "lsa_heads")
        lsa_windows = _per_stage(lsa_windows, n, "lsa_windows")
        qna_heads = _per_stage(qna_heads, n, "qna_heads")
        kernel_sizes = _per_stage(qna_kernel_size, n, "qna_kernel_size")
        if global_pool not in ("avg", ""):
            raise ValueError(f"QnAViT: global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.patch_size = patch_size
        self.drop_rate = drop_rate

        self.stem = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=False)
        # Drop-path rates in block order; the strided blocks take a slot when drop_path_downsample.
        num_blocks = sum(lsa_depths) + sum(qna_depths) + (n - 1) * int(drop_path_downsample)
        rates = [drop_path_rate * j / max(num_blocks - 1, 1) for j in range(num_blocks)]  # np.linspace
        stages, dim, offset, reduction = [], embed_dim, 0, patch_size
        self.feature_info: List[dict] = []
        for i in range(n):
            downsample = i != n - 1
            count = lsa_depths[i] + qna_depths[i] + int(downsample and drop_path_downsample)
            stage_rates = list(rates[offset : offset + count]) + [0.0]  # [0.0]: strided block without a slot
            offset += count
            stage = QnAViTStage(
                i, dim, lsa_depths[i], lsa_heads[i], lsa_windows[i], qna_depths[i], qna_heads[i],
                kernel_sizes[i], num_queries, downsample, stage_rates, mlp_ratio, act_layer,
            )
            stages.append(stage)
            dim = stage.out_dim
            reduction *= 2 if downsample else 1
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = self.default_cfg = _cfg()
        self.init_weights()

    def init_weights(self) -> None:
        """The original's initialisation: lecun_normal kernels, zero biases, LayerNorm (1, 0),
        zero relative-position tables; QnA layers initialise themselves (modules/qna.py)."""
        qna_children = set()
        for module in self.modules():
            if isinstance(module, QnA):
                module.reset_parameters()  # initialises its to_v / to_out too
                qna_children.update(id(m) for m in module.modules())
            elif id(module) in qna_children:
                continue
            elif isinstance(module, nn.Linear):
                lecun_normal_(module.weight, module.in_features)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                lecun_normal_(module.weight, module.weight[0].numel())
            elif isinstance(module, WindowAttention):
                nn.init.zeros_(module.relative_position_bias_table)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Position tables and learned queries (timm's optimizer factory skips these)."""
        names = ("relative_position_bias_table", "query", "rpe", "attn_scale")
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in names}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"QnAViT: global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            lecun_normal_(self.head.weight, self.num_features)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"QnAViT expects images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}"
            )
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(
                f"QnAViT: image size {tuple(x.shape[2:])} must be divisible by the patch size {self.patch_size}"
            )
        x = self.stem(x).permute(0, 2, 3, 1)  # channels last from here on
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Variants (and timm registration)
# ---------------------------------------------------------------------------------------------


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem",
        "classifier": "head",
        "paper_ids": "arXiv:2112.11435",
        "paper_name": "Learned Queries for Efficient Local Attention",
        "origin_url": "https://github.com/moabarar/qna",
        **kwargs,
    }


# Read by timm's register_model (plain dicts: timm converts them), and by the factories.
default_cfgs = {
    "qna_vit_tiny": _cfg(),
    "qna_vit_tiny_7x7": _cfg(),
    "qna_vit_small": _cfg(),
    "qna_vit_base": _cfg(),
}

_VARIANTS = {
    "qna_vit_tiny": dict(
        embed_dim=64, qna_depths=(2, 3, 2, 0), qna_heads=(8, 16, 32, 64), qna_kernel_size=3,
        lsa_depths=(0, 0, 4, 2), lsa_heads=(2, 4, 8, 16), drop_path_rate=0.05,
    ),
    "qna_vit_tiny_7x7": dict(
        embed_dim=64, qna_depths=(2, 3, 2, 0), qna_heads=(8, 16, 32, 64), qna_kernel_size=7,
        lsa_depths=(0, 0, 4, 2), lsa_heads=(2, 4, 8, 16), drop_path_rate=0.05,
    ),
    "qna_vit_small": dict(
        embed_dim=64, qna_depths=(2, 3, 6, 0), qna_heads=(8, 16, 32, 64), qna_kernel_size=3,
        lsa_depths=(0, 0, 12, 2), lsa_heads=(2, 4, 8, 16), drop_path_rate=0.2,
    ),
    "qna_vit_base": dict(
        embed_dim=96, qna_depths=(2, 3, 6, 0), qna_heads=(6, 12, 24, 48), qna_kernel_size=3,
        lsa_depths=(0, 0, 12, 2), lsa_heads=(3, 6, 12, 24), drop_path_rate=0.5,
    ),
}


def _create(name: str, pretrained: bool, kwargs: dict) -> QnAViT:
    pretrained_cfg, overlay = pop_timm_kwargs(name, kwargs)
    if pretrained:
        raise RuntimeError(
            f"{name}: no pretrained weights are available for QnA-ViT in fastvit_kernels (the "
            "original checkpoints are JAX/Flax; convert them with the parameter map in "
            "fastvit_kernels/models/qna_vit.py and load the state_dict). Use pretrained=False."
        )
    model = QnAViT(**{**_VARIANTS[name], **kwargs})
    return attach_cfg(model, name, default_cfgs[name], pretrained_cfg, overlay)


def qna_vit_tiny(pretrained: bool = False, **kwargs) -> QnAViT:
    """QnA-ViT tiny: 16M params, 2.5 GMACs, 81.7% ImageNet top-1 in the paper."""
    return _create("qna_vit_tiny", pretrained, kwargs)


def qna_vit_tiny_7x7(pretrained: bool = False, **kwargs) -> QnAViT:
    """QnA-ViT tiny with 7x7 QnA windows: 16M params, 2.6 GMACs, 82.0% in the paper."""
    return _create("qna_vit_tiny_7x7", pretrained, kwargs)


def qna_vit_small(pretrained: bool = False, **kwargs) -> QnAViT:
    """QnA-ViT small: 25M params, 4.4 GMACs, 83.2% in the paper."""
    return _create("qna_vit_small", pretrained, kwargs)


def qna_vit_base(pretrained: bool = False, **kwargs) -> QnAViT:
    """QnA-ViT base: 56M params, 9.7 GMACs, 83.9% in the paper."""
    return _create("qna_vit_base", pretrained, kwargs)


TIMM_REGISTERED = register_with_timm((qna_vit_tiny, qna_vit_tiny_7x7, qna_vit_small, qna_vit_base))
