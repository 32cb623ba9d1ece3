"""Folding LeViT's BatchNorms into the Linear / Conv2d layers beside them (inference only).

Each LinearNorm / ConvNorm (a layer, then BatchNorm) and NormLinear (BatchNorm, then a layer)
becomes one layer with a bias; in LeViT's stem each folded convolution and its Hardswish then
become one ConvHardswish. The math is in docs/patching.md ("BatchNorm folding").

The attention modules' `proj` keeps its activation: a patched BiasAttention / ShrinkAttention
still runs a Hardswish or SiLU inside the op and calls the folded `proj.ln` (now a Linear or
Conv2d with bias) directly (modules/bias_attention.py).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from fastvit_kernels.modules import bias_attention as _levit_modules
from fastvit_kernels.modules.conv_hardswish import ConvHardswish
from fastvit_kernels.patch._tree import check_module, replace_children


class FoldedBatchNormWarning(UserWarning):
    """unpatch_timm was called on a model whose BatchNorms were folded (which cannot be undone)."""


FOLDED_ATTR = "fastvit_kernels_folded_batchnorms"


def _foldable_classes() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    """(norm-after classes: Linear/Conv then BN, norm-before classes: BN then Linear)."""
    after: List[type] = [_levit_modules.LinearNorm, _levit_modules.ConvNorm]
    before: List[type] = []
    try:
        from timm.models import levit
    except ImportError:
        pass
    else:
        after += [levit.LinearNorm, levit.ConvNorm]
        before.append(levit.NormLinear)
    return tuple(after), tuple(before)


def _iter_foldable(model: nn.Module):
    after, before = _foldable_classes()
    for name, module in model.named_modules():
        if type(module) in after or type(module) in before:
            yield name, module


def check_foldable(model: nn.Module) -> None:
    if model.training:
        raise RuntimeError(
            "fastvit_kernels.fold_batchnorm: BatchNorm folding is inference-only; call model.eval() first "
            "(in training mode BatchNorm normalises with the batch's statistics, which cannot be folded)"
        )
    for name, module in _iter_foldable(model):
        bn = module.bn
        if module.training or bn.training:
            raise RuntimeError(
                "fastvit_kernels.fold_batchnorm: BatchNorm folding is inference-only; call model.eval() "
                f"first ('{name or type(model).__name__}' is in training mode, where BatchNorm normalises "
                "with the batch's statistics, which cannot be folded into a weight)"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise RuntimeError(
                f"fastvit_kernels.fold_batchnorm: '{name}.bn' tracks no running statistics; cannot fold it"
            )


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with bn(x) = x·s + t in eval mode."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _new_param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


@torch.no_grad()
def _fold_norm_after(module: nn.Module) -> nn.Module:
    """Linear/Conv2d (no bias) then BN → one Linear/Conv2d with bias."""
    layer, bn = module.linear, module.bn
    scale, shift = _bn_scale_shift(bn)
    w = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    b = shift if layer.bias is None else shift + layer.bias.double() * scale
    if isinstance(layer, nn.Conv2d):
        fused = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=True,
            padding_mode=layer.padding_mode, device="meta",
        )
    else:
        fused = nn.Linear(layer.in_features, layer.out_features, bias=True, device="meta")
    fused.weight = _new_param(w, layer.weight)
    fused.bias = _new_param(b, layer.weight)
    return fused.train(False)


@torch.no_grad()
def _fold_norm_before(module: nn.Module) -> nn.Module:
    """BN then (dropout, identity in eval) then Linear → one Linear with bias."""
    bn, layer = module.bn, module.linear
    scale, shift = _bn_scale_shift(bn)
    w = layer.weight.double()
    b = w @ shift
    if layer.bias is not None:
        b = b + layer.bias.double()
    fused = nn.Linear(layer.in_features, layer.out_features, bias=True, device="meta")
    fused.weight = _new_param(w * scale[None, :], layer.weight)
    fused.bias = _new_param(b, layer.weight)
    return fused.train(False)


def _stem_classes() -> Tuple[type, ...]:
    try:
        from timm.models import levit
    except ImportError:
        return ()
    return tuple(getattr(levit, name) for name in ("Stem16", "Stem8") if hasattr(levit, name))


def _fuse_stem_activations(model: nn.Module) -> int:
    """In LeViT's (sequential) stems, each folded Conv2d [+ Hardswish] → one ConvHardswish."""
    fused = 0
    stems = _stem_classes()
    for stem in [m for m in model.modules() if isinstance(m, stems)]:
        names = list(stem._modules)
        for i, name in enumerate(names):
            conv = stem._modules[name]
            if type(conv) is not nn.Conv2d or conv.bias is None:
                continue
            following = stem._modules[names[i + 1]] if i + 1 < len(names) else None
            with_act = type(following) is nn.Hardswish
            stem._modules[name] = ConvHardswish(conv, with_act)
            if with_act:
                stem._modules[names[i + 1]] = nn.Identity()
            fused += 1
    return fused


def fold(model: nn.Module) -> int:
    """Fold every foldable BatchNorm of `model` in place; returns how many were folded."""
    check_foldable(model)
    after, before = _foldable_classes()
    count = 0

    def convert(module: nn.Module) -> Optional[nn.Module]:
        nonlocal count
        if type(module) in after:
            count += 1
            return _fold_norm_after(module)
        if type(module) in before:
            count += 1
            return _fold_norm_before(module)
        return None

    replace_children(model, convert)
    _fuse_stem_activations(model)
    if count:
        setattr(model, FOLDED_ATTR, getattr(model, FOLDED_ATTR, 0) + count)
    return count


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold, in place, each BatchNorm of LeViT's LinearNorm / ConvNorm / NormLinear into its
    Linear or Conv2d (weight and bias), replacing the pair by one layer. Outputs are unchanged
    up to float32 rounding (the folding is computed in float64).

    In LeViT's stem each folded convolution and its Hardswish then become one ConvHardswish
    (a oneDNN convolution with a fused activation, channels-last; plain PyTorch off the CPU or
    with autograd on).

    Inference only: the model (every module to fold) must be in eval mode, else RuntimeError.
    The folded layers hold new Parameters (an existing optimizer does not see them) and the
    state_dict keys change (`qkv.weight`/`qkv.bias` instead of `qkv.linear.*`/`qkv.bn.*`).
    Works on patched and unpatched timm models. Returns `model`; the number of BatchNorms folded
    so far is in `model.fastvit_kernels_folded_batchnorms` (and in the patch report when done via
    patch_timm(fold_bn=True)).
    """
    check_module(model, "fold_batchnorm")
    count = fold(model)
    from fastvit_kernels.patch.timm import PatchReport  # here: timm.py imports this module

    report = getattr(model, "fastvit_kernels_report", None)
    if isinstance(report, PatchReport):
        report.folded_batchnorms += count
    return model
