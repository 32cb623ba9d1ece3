"""fastvit_kernels: fused kernels for efficient vision transformers (LeViT, QnA, DynamicViT, ViT).

    from fastvit_kernels import BiasAttention, ShrinkAttention, patch_timm
    from fastvit_kernels.ops import bias_attention

`python -m fastvit_kernels.info` tells what was built and which backend each op uses.
"""

__version__ = "0.1.0"

from fastvit_kernels import ops
from fastvit_kernels.backends import use_backend
from fastvit_kernels.modules import BiasAttention, GGeM, QnA, ShrinkAttention
from fastvit_kernels.modules import MaskedTokenAttention
from fastvit_kernels.patch import patch_timm, unpatch_timm, fold_batchnorm
from fastvit_kernels.inference import compile_frozen, optimize_for_inference, package_for_inference
# QnA-ViT; registers qna_vit_* with timm when timm is installed (and the ops' FLOP formulas).
from fastvit_kernels import models

__all__ = [
    "ops",
    "use_backend",
    "__version__",
    "BiasAttention",
    "ShrinkAttention",
    "QnA",
    "GGeM",
    "MaskedTokenAttention",
    "models",
    "patch_timm",
    "unpatch_timm",
    "fold_batchnorm",
    "optimize_for_inference",
    "compile_frozen",
    "package_for_inference",
]
