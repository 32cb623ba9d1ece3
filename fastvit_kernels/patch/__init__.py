"""Patch third-party models in place with the fused modules (and undo it).

    from fastvit_kernels.patch import patch_timm, unpatch_timm, fold_batchnorm

timm.py holds the registry of replaced timm classes and patch/unpatch; ggem.py installs GGeM
pooling in timm ViTs; batchnorm.py folds LeViT's BatchNorms for inference.
"""

from fastvit_kernels.patch.batchnorm import FoldedBatchNormWarning, fold_batchnorm
from fastvit_kernels.patch.ggem import POOLS, install_ggem_pool
from fastvit_kernels.patch.timm import PatchReport, patch_timm, registry, supported_timm_models, unpatch_timm

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
