"""Patch third-party models in place with the fused modules (and undo it).

    from fastvit_kernels.patch import patch_timm, unpatch_timm, fold_batchnorm
"""

from fastvit_kernels.patch.timm import (
    FoldedBatchNormWarning,
    PatchReport,
    fold_batchnorm,
    patch_timm,
    registry,
    supported_timm_models,
    unpatch_timm,
)

__all__ = [
    "patch_timm",
    "unpatch_timm",
    "fold_batchnorm",
    "supported_timm_models",
    "registry",
    "PatchReport",
    "FoldedBatchNormWarning",
]
