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

Pooling (`pool="ggem"`, or `install_ggem_pool`; patch/ggem.py) is not a class swap: it sets the
`attn_pool` of every timm VisionTransformer in the model to a new GGeM module (new parameters
`attn_pool.p`, one exponent per group), which timm's `pool()` calls on the patch tokens;
`unpatch_timm` puts back what was there before (usually None, i.e. the model's `global_pool`).

BatchNorm folding (`fold_bn=True`, or `fold_batchnorm`; patch/batchnorm.py) is inference-only and
cannot be undone: `unpatch_timm` on a folded model restores timm's attention classes but warns
(FoldedBatchNormWarning) that the BatchNorms stay folded (the state_dict then has
`qkv.weight`/`qkv.bias` instead of `qkv.linear.*`/`qkv.bn.*`).
"""

import importlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch.nn as nn

from fastvit_kernels.modules import BiasAttention, GGeM, ShrinkAttention
from fastvit_kernels.patch._tree import check_module, replace_children
from fastvit_kernels.patch.batchnorm import FOLDED_ATTR, FoldedBatchNormWarning, check_foldable, fold
from fastvit_kernels.patch.ggem import install_ggem_pool, pool_targets, uninstall_pools

__all__ = ["patch_timm", "unpatch_timm", "supported_timm_models", "registry", "PatchReport"]


# ---------------------------------------------------------------------------------------------
# The registry: timm class (dotted path, resolved lazily so timm is imported only when used)
# -> replacement class. Adding a supported module is one line here.
# ---------------------------------------------------------------------------------------------

# A replacement given as a dotted path is imported when the registry is first used
# (modules/timm_attention.py subclasses timm's classes, so it imports timm).
_FAMILIES = "fastvit_kernels.modules.timm_attention"
_REGISTRY_SPEC: Dict[str, Union[type, str]] = {
    "timm.models.levit.Attention": BiasAttention,
    "timm.models.levit.AttentionDownsample": ShrinkAttention,
    "timm.models.swin_transformer.WindowAttention": f"{_FAMILIES}.SwinWindowAttention",
    "timm.models.tiny_vit.Attention": f"{_FAMILIES}.TinyVitAttention",
    "timm.models.efficientformer.Attention": f"{_FAMILIES}.EfficientFormerAttention",
    "timm.models.efficientvit_msra.CascadedGroupAttention": f"{_FAMILIES}.EfficientVitCascadedAttention",
    "timm.models.efficientformer_v2.Attention2dDownsample": f"{_FAMILIES}.EfficientFormerV2Downsample",
}

# Model-name patterns (timm.list_models) whose attention the registry covers.
# (efficientformerv2_*: only the downsampling attention; the report names what is left alone.)
_SUPPORTED_MODEL_PATTERNS: Tuple[str, ...] = (
    "levit*", "swin_*", "tiny_vit_*", "efficientformer_l*", "efficientvit_m*", "efficientformerv2_*",
)

# timm attention classes with a learned bias that patch_timm leaves alone, and why (the report
# lists them; docs/patching.md, "Families").
LEFT_ALONE: Dict[str, str] = {
    "timm.models.efficientformer_v2.Attention2d":
        "talking heads mix the heads before and after the softmax (not one softmax per head)",
    "timm.models.swin_transformer_v2.WindowAttention":
        "cosine attention with a learned per-head logit scale and a bias from an MLP over "
        "log-spaced coordinates (16·sigmoid), not a table lookup",
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention":
        "cosine attention with a learned temperature and an MLP position bias, not a table lookup",
}


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
            self._resolved = {
                _resolve(path): _resolve(cls) if isinstance(cls, str) else cls for path, cls in self._spec.items()
            }
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
        body = ", ".join(f"{path}: {cls if isinstance(cls, str) else cls.__name__}" for path, cls in self._spec.items())
        return f"TimmRegistry({{{body}}})"


registry = TimmRegistry(_REGISTRY_SPEC)


def supported_timm_models() -> List[str]:
    """Every timm model name whose attention modules patch_timm replaces (timm.list_models of
    _SUPPORTED_MODEL_PATTERNS)."""
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
    # "efficientformer_v2.Attention2d" -> (count, why it was left alone); see LEFT_ALONE
    left_alone: Dict[str, Tuple[int, str]] = field(default_factory=dict)

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
        for name, (count, why) in self.left_alone.items():
            text += f"; left {count} {name} alone ({why})"
        if self.folded_batchnorms:
            text += f"; folded {self.folded_batchnorms} BatchNorms into their Linear/Conv (inference only)"
        else:
            text += "; no BatchNorm folded"
        return text + "."


# ---------------------------------------------------------------------------------------------
# Patch / unpatch
# ---------------------------------------------------------------------------------------------


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
    check_module(model, "patch_timm")
    if fold_bn:
        check_foldable(model)  # fail before changing anything
    vits = pool_targets(model, pool) if pool is not None else []  # fails before any change too
    mapping = registry.mapping()
    patched_classes = set(mapping.values())
    left_alone = _left_alone_classes()
    replaced: Counter = Counter()
    skipped: Counter = Counter()
    already = 0

    def convert(module: nn.Module) -> Optional[nn.Module]:
        nonlocal already
        if type(module) in patched_classes:
            already += 1
            return None
        cls = mapping.get(type(module))
        if cls is None:
            if type(module) in left_alone:
                skipped[type(module)] += 1
            return None
        replaced[f"{_class_name(type(module))} -> {cls.__name__}"] += 1
        return cls.from_timm(module)

    replace_children(model, convert)
    for vit in vits:
        if type(vit.attn_pool) is GGeM:
            already += 1
            continue
        install_ggem_pool(vit)
        replaced[f"{_class_name(type(vit))}.attn_pool -> GGeM"] += 1
    report = PatchReport(model=type(model).__name__, replaced=dict(replaced), already_patched=already,
                         left_alone={_class_name(c): (n, left_alone[c]) for c, n in skipped.items()})
    if fold_bn:
        report.folded_batchnorms = fold(model)
    model.fastvit_kernels_report = report
    if verbose:
        print(report)
    return model


def _left_alone_classes() -> Dict[type, str]:
    """LEFT_ALONE with the classes this timm version has (older versions lack some)."""
    classes = {}
    for path, why in LEFT_ALONE.items():
        try:
            classes[_resolve(path)] = why
        except ImportError:
            pass
    return classes


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo patch_timm in place: every replacement module becomes its timm class again, sharing
    the same parameters, buffers and submodules, and every GGeM pooling installed by patch_timm /
    install_ggem_pool is replaced by the attn_pool that was there before. Returns `model`.

    BatchNorm folding cannot be undone: if the model was folded, the timm classes are restored
    but the BatchNorms stay folded, and a FoldedBatchNormWarning says so.
    """
    check_module(model, "unpatch_timm")
    reverse = {cls: timm_cls for timm_cls, cls in registry.items()}

    def convert(module: nn.Module) -> Optional[nn.Module]:
        if type(module) not in reverse:
            return None
        restored = module.to_timm()
        assert type(restored) is reverse[type(module)]
        return restored

    replace_children(model, convert)
    uninstall_pools(model)
    if any(getattr(m, FOLDED_ATTR, 0) for m in model.modules()):
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
