"""nn.Modules built on the fused ops: drop-in replacements for timm's layers.

    BiasAttention    timm.models.levit.Attention            (LeViT attention with learned bias)
    ShrinkAttention  timm.models.levit.AttentionDownsample  (LeViT shrink attention)
    QnA              the QnA learned-query local attention layer (no timm counterpart)
    GGeM             group generalized-mean pooling (a timm VisionTransformer's attn_pool slot)

The replacements for Swin, TinyViT, EfficientFormer, EfficientViT-MSRA and EfficientFormerV2
subclass timm's classes, so they live in `fastvit_kernels.modules.timm_attention`, imported only
on use (it imports timm).
"""

from fastvit_kernels.modules.bias_attention import BiasAttention, ConvNorm, LinearNorm, ShrinkAttention, Subsample
from fastvit_kernels.modules.ggem import GGeM
from fastvit_kernels.modules.qna import QnA
from fastvit_kernels.modules.masked_token_attention import MaskedTokenAttention

__all__ = ["BiasAttention", "ShrinkAttention", "QnA", "GGeM", "LinearNorm", "ConvNorm", "Subsample", "MaskedTokenAttention"]
