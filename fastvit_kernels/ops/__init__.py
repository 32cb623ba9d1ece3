"""The functional API: one module per op, each a registered torch.library op with autograd."""

from fastvit_kernels.ops.bias_attention import bias_attention
from fastvit_kernels.ops.ggem_pool import ggem_pool
from fastvit_kernels.ops.policy_attention import policy_attention
from fastvit_kernels.ops.qna_attention import qna_attention
from fastvit_kernels.ops.varlen_attention import varlen_attention

# FlopCounterMode formulas for the ops above (registered on import).
from fastvit_kernels.ops import flops  # noqa: E402,F401

__all__ = ["bias_attention", "qna_attention", "ggem_pool", "policy_attention", "varlen_attention"]
