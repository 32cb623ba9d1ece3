"""GGeM pooling installed in a timm VisionTransformer's `attn_pool` slot (and removed again).

`patch_timm(model, pool="ggem")` calls `install_ggem_pool` on every VisionTransformer of the model
whose head pools through timm's `pool()`; `unpatch_timm` calls `uninstall_pools`. The math of the
pooling is in docs/ggem_pool.md; the module is `fastvit_kernels.modules.GGeM`.
"""

from typing import List, Optional

import torch.nn as nn

from fastvit_kernels.modules import GGeM
from fastvit_kernels.patch._tree import check_module

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


def pool_targets(model: nn.Module, pool: str) -> List[nn.Module]:
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
    check_module(vit, "install_ggem_pool")
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


def uninstall_pools(model: nn.Module) -> None:
    for module in list(model.modules()):
        previous = module.__dict__.pop(_PREVIOUS_POOL_ATTR, None)
        if previous is not None:
            module.attn_pool = previous[0]
