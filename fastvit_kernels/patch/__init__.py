"""Patch third-party models in place with the fused modules (and undo it).

    from fastvit_kernels.patch import patch_timm, unpatch_timm, fold_batchnorm
"""

from fastvit_kernels.patch.timm import (
    POOLS,
    FoldedBatchNormWarning,
    PatchReport,
    fold_batchnorm,
    install_ggem_pool,
    patch_timm,
    registry,
    supported_timm_models,
    unpatch_timm,
)

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
