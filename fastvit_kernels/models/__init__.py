"""Reference model definitions that timm lacks, built on the fused ops.

    QnAViT   QnA-ViT tiny / tiny_7x7 / small / base (models/qna_vit.py)

When timm is installed, importing this package (done by `import fastvit_kernels`) registers
`qna_vit_tiny`, `qna_vit_tiny_7x7`, `qna_vit_small` and `qna_vit_base`, so
`timm.create_model("qna_vit_tiny")` works. Without timm the models work the same; only the
registry is missing.
"""

from fastvit_kernels.models.qna_vit import (
    QnAViT,
    qna_vit_base,
    qna_vit_small,
    qna_vit_tiny,
    qna_vit_tiny_7x7,
)

from fastvit_kernels.models.dynamic_vit import DynamicViT, dynamicvit_deit_base, dynamicvit_deit_small

__all__ = ["QnAViT", "qna_vit_tiny", "qna_vit_tiny_7x7", "qna_vit_small", "qna_vit_base",
           "DynamicViT", "dynamicvit_deit_small", "dynamicvit_deit_base"]
