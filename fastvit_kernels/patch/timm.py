"""Swap timm's attention modules for fastvit_kernels' fused ones, in place, and back.

    model = timm.create_model("levit_256", pretrained=True)
    patch_timm(model)                        # every levit Attention/AttentionDownsample replaced
    print(model.fastvit_kernels_report)
    model.eval(); fold_batchnorm(model)      # optional, inference only
    unpatch_timm(model)                      # timm's classes again (BatchNorm stays folded)

    vit = timm.create_model("vit_base_patch16_224")
    patch_timm(vit, pool="ggem")             # GGeM pooling in the attn_pool slot (groups = heads)
    # or, with explicit settings: install_ggem_pool(vit, groups=24, p=4.0)

Patching shares the parameter, buffer and submodule objects between the timm module and its
replacement (no copies): an optimizer built before patching keeps working, a timm state_dict
loads strictly into the patched model, and the patched model's state_dict loads into timm.

Supported classes live in one registry (`registry`, below): one line per timm class.
A replacement class must provide `from_timm(module)` (a classmethod) and `to_timm()`.

Pooling (`pool="ggem"`, or `install_ggem_pool`) is not a class swap: it sets the `attn_pool` of
every timm VisionTransformer in the model to a new GGeM module (new parameters `attn_pool.p`, one
exponent per group), which timm's `pool()` calls on the patch tokens; `unpatch_timm` puts back
what was there before (usually None, i.e. the model's `global_pool`).

BatchNorm folding is inference-only and cannot be undone: `unpatch_timm` on a folded model
restores timm's attention classes but warns (FoldedBatchNormWarning) that the BatchNorms stay
folded (the state_dict then has `qkv.weight`/`qkv.bias` instead of `qkv.linear.*`/`qkv.bn.*`).
"""

import importlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from fastvit_kernels.modules import BiasAttention, GGeM, ShrinkAttention
from fastvit_kernels.modules import bias_attention as _levit_modules

__all__ = [
    "patch_timm",
    "unpatch_timm",
    "fold_batchnorm",
    "install_ggem_pool",
    "POOLS",
    "supported_timm_models",
    "registry",
    "PatchReport",
    "FoldedBatchNormWarning",
]


# ---------------------------------------------------------------------------------------------
# The registry: timm class (dotted path, resolved lazily so timm is imported only when used)
# -> replacement class. Adding a supported module is one line here.
# ---------------------------------------------------------------------------------------------

_REGISTRY_SPEC: Dict[str, type] = {
    "timm.models.levit.Attention": BiasAttention,
    "timm.models.levit.AttentionDownsample": ShrinkAttention,
}

# Model-name patterns (timm.list_models) whose attention the registry covers.
_SUPPORTED_MODEL_PATTERNS: Tuple[str, ...] = ("levit*",)


def _resolve(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"fastvit_kernels.patch: cannot import {path} ({error}); is timm installed?") from error


class TimmRegistry:
    """Mapping timm class -> replacement class (read-only view of `_REGISTRY_SPEC`, resolved lazily).

    `registry[timm.models.levit.Attention]` is `BiasAttention`; `registry.register(path, cls)` adds
    an entry at run time; `registry.replacement_for(module)` and `registry.timm_class_for(module)`
    are what patch/unpatch use. Matching is on the exact class (subclasses of a timm class may
    change its forward, so they are left alone).
    """

    def __init__(self, spec: Dict[str, type]):
        self._spec = spec
        self._resolved: Optional[Dict[type, type]] = None

    def register(self, timm_class_path: str, replacement: type) -> None:
        for method in ("from_timm", "to_timm"):
            if not hasattr(replacement, method):
                raise TypeError(f"{replacement.__name__} must define {method}() to be registered")
        self._spec[timm_class_path] = replacement
        self._resolved = None

    def unregister(self, timm_class_path: str) -> None:
        del self._spec[timm_class_path]
        self._resolved = None

    def mapping(self) -> Dict[type, type]:
        if self._resolved is None:
            self._resolved = {_resolve(path): cls for path, cls in self._spec.items()}
        return dict(self._resolved)

    def replacement_for(self, module: nn.Module) -> Optional[type]:
        return self.mapping().get(type(module))

    def timm_class_for(self, module: nn.Module) -> Optional[type]:
        for timm_cls, cls in self.mapping().items():
            if type(module) is cls:
                return timm_cls
        return None

    def __getitem__(self, timm_cls: type) -> type:
        return self.mapping()[timm_cls]

    def __contains__(self, timm_cls: object) -> bool:
        return timm_cls in self.mapping()

    def __iter__(self) -> Iterator[type]:
        return iter(self.mapping())

    def __len__(self) -> int:
        return len(self._spec)

    def items(self):
        return self.mapping().items()

    def __repr__(self) -> str:
        body = ", ".join(f"{path}: {cls.__name__}" for path, cls in self._spec.items())
        return f"TimmRegistry({{{body}}})"


registry = TimmRegistry(_REGISTRY_SPEC)


def supported_timm_models() -> List[str]:
    """Every timm model name whose attention modules patch_timm replaces (timm.list_models('levit*'))."""
    import timm

    names = set()
    for pattern in _SUPPORTED_MODEL_PATTERNS:
        names.update(timm.list_models(pattern))
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _class_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("timm.models."):
        module = module[len("timm.models."):]
    return f"{module}.{cls.__qualname__}"


@dataclass
class PatchReport:
    """What one patch_timm call did. `replaced` maps "levit.Attention -> BiasAttention" to a count."""

    model: str = ""
    replaced: Dict[str, int] = field(default_factory=dict)
    already_patched: int = 0
    folded_batchnorms: int = 0

    @property
    def num_replaced(self) -> int:
        return sum(self.replaced.values())

    def __str__(self) -> str:
        if self.replaced:
            parts = ", ".join(f"{n} {name}" for name, n in self.replaced.items())
            text = f"fastvit_kernels.patch_timm({self.model}): replaced {self.num_replaced} modules ({parts})"
        else:
            text = f"fastvit_kernels.patch_timm({self.model}): replaced no modules"
        if self.already_patched:
            text += f"; {self.already_patched} were already patched"
        if self.folded_batchnorms:
            text += f"; folded {self.folded_batchnorms} BatchNorms into their Linear/Conv (inference only)"
        else:
            text += "; no BatchNorm folded"
        return text + "."


# ---------------------------------------------------------------------------------------------
# Patch / unpatch
# ---------------------------------------------------------------------------------------------


def _check_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastvit_kernels.{fn} expects a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}")


def _replace_children(model: nn.Module, convert) -> None:
    """Replace, recursively, every submodule for which convert(module) returns a new module.
    A module reachable under several names is converted once and the result used everywhere;
    the children of a new module are visited too (except the module it replaced, if it wraps it)."""
    done: Dict[int, nn.Module] = {}
    visited = set()

    def visit(parent: nn.Module) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in done:
                if done[id(child)] is not parent:  # a replacement may wrap the module it replaces
                    parent._modules[name] = done[id(child)]
                continue
            new = convert(child)
            if new is not None:
                done[id(child)] = new
                parent._modules[name] = new
                visit(new)
            else:
                visit(child)

    visit(model)


def patch_timm(
    model: nn.Module, *, pool: Optional[str] = None, fold_bn: bool = False, verbose: bool = False
) -> nn.Module:
    """Replace, in place, every supported timm submodule of `model` by its fused replacement.

    Parameters, buffers and submodules are shared with the replaced modules (no copies).
    Already patched modules are left alone (patching twice is a no-op). With `fold_bn=True` the
    LeViT BatchNorms are then folded (see `fold_batchnorm`; the model must be in eval mode).
    With `pool="ggem"` every timm VisionTransformer in `model` also gets GGeM pooling in its
    `attn_pool` slot with default settings (see `install_ggem_pool`; ValueError if there is none).
    Returns `model`, with `model.fastvit_kernels_report` (a PatchReport) attached.
    Only submodules are replaced: when `model` itself is a supported class, build its
    replacement with e.g. `BiasAttention.from_timm(model)`. Raises TypeError if `model` is not
    an nn.Module.
    """
    _check_module(model, "patch_timm")
    if fold_bn:
        _check_foldable(model)  # fail before changing anything
    vits = _pool_targets(model, pool) if pool is not None else []  # fails before any change too
    mapping = registry.mapping()
    patched_classes = set(mapping.values())
    replaced: Counter = Counter()
    already = 0

    def convert(module: nn.Module) -> Optional[nn.Module]:
        nonlocal already
        if type(module) in patched_classes:
            already += 1
            return None
        cls = mapping.get(type(module))
        if cls is None:
            return None
        replaced[f"{_class_name(type(module))} -> {cls.__name__}"] += 1
        return cls.from_timm(module)

    _replace_children(model, convert)
    for vit in vits:
        if type(vit.attn_pool) is GGeM:
            already += 1
            continue
        install_ggem_pool(vit)
        replaced[f"{_class_name(type(vit))}.attn_pool -> GGeM"] += 1
    report = PatchReport(model=type(model).__name__, replaced=dict(replaced), already_patched=already)
    if fold_bn:
        report.folded_batchnorms = _fold(model)
    model.fastvit_kernels_report = report
    if verbose:
        print(report)
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo patch_timm in place: every replacement module becomes its timm class again, sharing
    the same parameters, buffers and submodules, and every GGeM pooling installed by patch_timm /
    install_ggem_pool is replaced by the attn_pool that was there before. Returns `model`.

    BatchNorm folding cannot be undone: if the model was folded, the timm classes are restored
    but the BatchNorms stay folded, and a FoldedBatchNormWarning says so.
    """
    _check_module(model, "unpatch_timm")
    reverse = {cls: timm_cls for timm_cls, cls in registry.items()}

    def convert(module: nn.Module) -> Optional[nn.Module]:
        if type(module) not in reverse:
            return None
        restored = module.to_timm()
        assert type(restored) is reverse[type(module)]
        return restored

    _replace_children(model, convert)
    _uninstall_pools(model)
    if any(getattr(m, _FOLDED_ATTR, 0) for m in model.modules()):
        warnings.warn(
            "fastvit_kernels.unpatch_timm: this model's BatchNorms were folded into their "
            "Linear/Conv layers (fold_batchnorm / patch_timm(fold_bn=True)), which cannot be undone: "
            "timm's attention classes are restored, but the model stays inference-only and its "
            "state_dict keys differ from timm's (e.g. 'qkv.weight'/'qkv.bias' instead of "
            "'qkv.linear.weight'/'qkv.bn.*'). Rebuild the model from its original weights to train it.",
            FoldedBatchNormWarning,
            stacklevel=2,
        )
    if hasattr(model, "fastvit_kernels_report"):
        del model.fastvit_kernels_report
    return model


# ---------------------------------------------------------------------------------------------
# Pooling: GGeM in a timm VisionTransformer's attn_pool slot
# ---------------------------------------------------------------------------------------------

POOLS = ("ggem",)
# The attn_pool replaced by install_ggem_pool, kept (inside a tuple, so that it is not registered
# as a submodule and stays out of state_dict) for unpatch_timm.
_PREVIOUS_POOL_ATTR = "_fastvit_kernels_previous_attn_pool"


def _vision_transformer_class() -> type:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as error:
        raise ImportError(f"fastvit_kernels.patch: cannot import timm's VisionTransformer ({error}); is timm installed?") from error
    if not hasattr(VisionTransformer, "pool"):
        raise ImportError(
            "fastvit_kernels.patch: this timm's VisionTransformer has no pool() method (timm >= 1.0.20 "
            "has it): its attn_pool would receive the prefix tokens too"
        )
    return VisionTransformer


def _uses_timm_pooling(module: nn.Module, vit_class: type) -> bool:
    """A VisionTransformer (or a subclass) whose head still pools through timm's pool()/attn_pool
    (e.g. not DeiT's distilled model, whose forward_head reads the cls and dist tokens)."""
    cls = type(module)
    return (
        isinstance(module, vit_class)
        and cls.pool is vit_class.pool
        and cls.forward_head is vit_class.forward_head
    )


def _pool_targets(model: nn.Module, pool: str) -> List[nn.Module]:
    if pool not in POOLS:
        raise ValueError(f"fastvit_kernels.patch_timm: pool must be None or one of {POOLS}, got {pool!r}")
    vit_class = _vision_transformer_class()
    targets = [m for m in model.modules() if _uses_timm_pooling(m, vit_class)]
    if not targets:
        raise ValueError(
            f"fastvit_kernels.patch_timm(pool={pool!r}): {type(model).__name__} contains no timm "
            "VisionTransformer whose head pools through attn_pool; nothing to install the pooling in"
        )
    return targets


def _num_heads(vit: nn.Module) -> Optional[int]:
    for block in getattr(vit, "blocks", ()):
        heads = getattr(getattr(block, "attn", None), "num_heads", None)
        if isinstance(heads, int):
            return heads
    return None


def install_ggem_pool(
    vit: nn.Module,
    *,
    groups: Optional[int] = None,
    p: float = 3.0,
    eps: float = 1e-6,
    layout: str = "contiguous",
    learnable: bool = True,
) -> GGeM:
    """Make GGeM the pooling of a timm VisionTransformer, in place, and return the new module.

    The module goes into `vit.attn_pool`, which timm's `pool()` calls on the tokens after the final
    norm, with the prefix (cls / register) tokens removed by a slice (no copy); if the model pools
    with `pool_include_prefix=True`, GGeM skips them itself. `fc_norm`, dropout and the head follow
    as usual. groups defaults to the number of attention heads (the paper's choice); p, eps,
    layout and learnable are GGeM's arguments. The exponents are a new float32 Parameter
    `attn_pool.p` on the model's device: build the optimizer after installing (or add it).
    A previous attn_pool (e.g. timm's 'map' attention pooling) is kept aside for unpatch_timm.
    """
    _check_module(vit, "install_ggem_pool")
    vit_class = _vision_transformer_class()
    if not _uses_timm_pooling(vit, vit_class):
        raise TypeError(
            "fastvit_kernels.install_ggem_pool expects a timm VisionTransformer whose head pools "
            f"through attn_pool, got {type(vit).__module__}.{type(vit).__qualname__}"
        )
    if groups is None:
        groups = _num_heads(vit)
        if groups is None:
            raise ValueError("fastvit_kernels.install_ggem_pool: cannot find the number of heads; pass groups=")
    dim = vit.embed_dim
    prefix = vit.num_prefix_tokens if vit.pool_include_prefix else 0
    module = GGeM(dim, groups, p=p, eps=eps, layout=layout, learnable=learnable, num_prefix_tokens=prefix)
    reference = next(iter(vit.parameters()), None)
    if reference is not None:
        module = module.to(reference.device)
    if not hasattr(vit, _PREVIOUS_POOL_ATTR):
        object.__setattr__(vit, _PREVIOUS_POOL_ATTR, (vit.attn_pool,))
    vit.attn_pool = module.train(vit.training)
    return module


def _uninstall_pools(model: nn.Module) -> None:
    for module in list(model.modules()):
        previous = module.__dict__.pop(_PREVIOUS_POOL_ATTR, None)
        if previous is not None:
            module.attn_pool = previous[0]


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------


class FoldedBatchNormWarning(UserWarning):
    """unpatch_timm was called on a model whose BatchNorms were folded (which cannot be undone)."""


_FOLDED_ATTR = "fastvit_kernels_folded_batchnorms"


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


def _check_foldable(model: nn.Module) -> None:
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


class ConvHardswish(nn.Conv2d):
    """Inference: a folded Conv2d and the Hardswish after it (or none) as ONE oneDNN convolution
    with a fused post-op, in channels-last memory. On CPU this runs LeViT's stem about 3x faster
    than NCHW convolutions plus separate activations (42 -> 14 ms for levit_128s, batch 32, 2
    cores), and its channels-last output makes the stem's flatten(2).transpose(1, 2) contiguous.
    Where oneDNN does not apply (GPU, half precision, autograd on) it is Conv2d then Hardswish.
    Parameter names are Conv2d's (`weight`, `bias`)."""

    def __init__(self, conv: nn.Conv2d, hardswish: bool):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
            padding_mode=conv.padding_mode, device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.hardswish = hardswish

    def _onednn_applies(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn_applies(x):
            return torch.ops.mkldnn._convolution_pointwise(
                x.contiguous(memory_format=torch.channels_last), self.weight, self.bias, self.padding,
                self.stride, self.dilation, self.groups, "hardswish" if self.hardswish else "none", [], "",
            )
        y = super().forward(x)
        return nn.functional.hardswish(y) if self.hardswish else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", hardswish" if self.hardswish else "")


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


def _fold(model: nn.Module) -> int:
    _check_foldable(model)
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

    _replace_children(model, convert)
    _fuse_stem_activations(model)
    if count:
        setattr(model, _FOLDED_ATTR, getattr(model, _FOLDED_ATTR, 0) + count)
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
    _check_module(model, "fold_batchnorm")
    count = _fold(model)
    report = getattr(model, "fastvit_kernels_report", None)
    if isinstance(report, PatchReport):
        report.folded_batchnorms += count
    return model
