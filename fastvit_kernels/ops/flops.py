"""FLOP formulas for the custom ops, so `torch.utils.flop_counter.FlopCounterMode` counts them.

Without these the counter sees the ops as opaque calls and counts nothing for them. Convention:
the counter's own, 2 FLOPs per multiply-accumulate (MAC) (papers' "FLOPs" usually mean MACs:
divide by 2). Only the MACs are counted, as for matmuls; softmax exponentials are not.

    bias_attention forward   B·H·Nq·Nk·(Dk + Dv) MACs       (q kᵀ, then P v)
                   backward  B·H·Nq·Nk·(3·Dk + 2·Dv) MACs   (q kᵀ again, dP = dO vᵀ, dv, dq, dk)
    qna_attention  forward   B·Ho·Wo·h·k²·(Q + d) MACs      (the Q softmaxes folded with
                                                             attn_scale into one k x k weight per
                                                             head, then the weighted sum of values)
                   backward  B·Ho·Wo·h·k²·(2·Q + 2·d) MACs  (g·v per key, dv, the weight gradients)

Note: the QnA scores (x · W_k q̂) are an ordinary matmul outside the op and are counted as such.
The JAX original computes the value sum as a grouped convolution over Q·F channels, i.e.
B·Ho·Wo·Q·F·k² MACs, Q times more than the fused op needs.

Importing `fastvit_kernels.ops` imports this module, which registers the formulas once.
"""

from torch.utils import flop_counter

from fastvit_kernels.ops import bias_attention as _bias_attention_op  # noqa: F401  (defines the ops)
from fastvit_kernels.ops import qna_attention as _qna_attention_op  # noqa: F401
from fastvit_kernels.reference.qna_attention import output_size

import torch

__all__ = ["bias_attention_macs", "qna_attention_macs"]


def bias_attention_macs(q_shape, k_shape, v_shape) -> int:
    B, H, Nq, Dk = q_shape
    return B * H * Nq * k_shape[2] * (Dk + v_shape[3])


def qna_attention_macs(cost_shape, v_shape, kernel_size: int, stride: int) -> int:
    B, Hi, Wi, Q, h = cost_shape
    Ho, Wo = output_size(Hi, kernel_size, stride), output_size(Wi, kernel_size, stride)
    return B * Ho * Wo * h * kernel_size * kernel_size * (Q + v_shape[4])


def _bias_attention_forward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * bias_attention_macs(q, k, v)


def _bias_attention_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    B, H, Nq, Dk = q
    return 2 * B * H * Nq * k[2] * (3 * Dk + 2 * v[3])


def _qna_attention_forward_flops(cost, v, rpe, attn_scale, kernel_size, stride, *args, out_shape=None, **kwargs) -> int:
    return 2 * qna_attention_macs(cost, v, kernel_size, stride)


def _qna_attention_backward_flops(
    grad_out, cost, v, rpe, attn_scale, lse, kernel_size, stride, *args, out_shape=None, **kwargs
) -> int:
    return 4 * qna_attention_macs(cost, v, kernel_size, stride)


_FORMULAS = {
    "bias_attention_forward": _bias_attention_forward_flops,
    "bias_attention_backward": _bias_attention_backward_flops,
    "qna_attention_forward": _qna_attention_forward_flops,
    "qna_attention_backward": _qna_attention_backward_flops,
}


def _register() -> None:
    """Each formula for the native op (when the extension is built) and for its Python twin
    `<name>_python`, whose extra last argument (the backend) the formulas ignore."""
    for name, formula in _FORMULAS.items():
        for op_name in (name, f"{name}_python"):
            if not hasattr(torch.ops.fastvit_kernels, op_name):  # no native build
                continue
            op = getattr(torch.ops.fastvit_kernels, op_name)
            if op not in flop_counter.flop_registry:  # registering twice raises
                flop_counter.register_flop_formula(op)(formula)


_register()
