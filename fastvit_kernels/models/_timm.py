"""What every model here needs to be built by `timm.create_model`: taking timm's extra keyword
arguments, attaching the pretrained_cfg timm expects, and registering (timm is optional)."""

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch.nn as nn


def pop_timm_kwargs(name: str, kwargs: dict) -> Tuple[Optional[object], Optional[dict]]:
    """Removes timm's create_model extras from kwargs -> (pretrained_cfg, pretrained_cfg_overlay)."""
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)  # timm passes it for downloads; there are none
    if kwargs.pop("features_only", False):
        raise ValueError(f"{name}: features_only is not supported (use forward_features)")
    return pretrained_cfg, overlay


def attach_cfg(model: nn.Module, name: str, default_cfg: Dict, pretrained_cfg=None, overlay=None) -> nn.Module:
    """Sets model.pretrained_cfg / default_cfg as timm's own models carry them."""
    cfg = dict(default_cfg)
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):  # a str names a tag: none exist
        cfg.update(pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg))
    cfg.update(overlay or {})
    cfg["architecture"] = name
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def register_with_timm(entry_points: Sequence[Callable]) -> bool:
    """Register the model functions with timm's registry if timm imports (it is optional)."""
    try:
        from timm.models import register_model
    except Exception:  # timm missing or broken: the models still work without it
        return False
    for fn in entry_points:
        register_model(fn)
    return True
