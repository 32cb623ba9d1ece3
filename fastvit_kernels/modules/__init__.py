"""nn.Modules built on the fused ops: drop-in replacements for timm's layers.

    BiasAttention    timm.models.levit.Attention            (LeViT attention with learned bias)
    ShrinkAttention  timm.models.levit.AttentionDownsample  (LeViT shrink attention)
"""

from fastvit_kernels.modules.bias_attention import BiasAttention, ConvNorm, LinearNorm, ShrinkAttention, Subsample

__all__ = ["BiasAttention", "ShrinkAttention", "LinearNorm", "ConvNorm", "Subsample"]
