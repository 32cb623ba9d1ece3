"""ConvHardswish: a convolution and the Hardswish after it as one oneDNN call (inference).

BatchNorm folding (fastvit_kernels/patch/batchnorm.py) puts it into LeViT's stem.
"""

from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

# Decided once at import: torch.compile cannot trace torch.backends.mkldnn.is_available() inside
# forward (it would break the graph there).
_ONEDNN_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def conv_hardswish(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: List[int], stride: List[int],
                   dilation: List[int], groups: int, hardswish: bool) -> Tensor:
    """conv2d (zero padding) then, if `hardswish`, Hardswish: one oneDNN call where it applies (CPU,
    float32, no autograd, not exporting to ONNX), else the two PyTorch ops."""
    onednn = (
        _ONEDNN_FUSED_CONV
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.onnx.is_in_onnx_export()  # ONNX has no oneDNN op: export Conv + HardSwish
    )
    if onednn:
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), weight, bias, padding, stride, dilation, groups,
            "hardswish" if hardswish else "none", [], "",
        )
    if x.device.type == "cpu" and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        # Channels-last weights (optimize_for_inference's half-precision stems): channels-last
        # activations too, so that oneDNN reorders nothing per call.
        x = x.contiguous(memory_format=torch.channels_last)
    y = nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return nn.functional.hardswish(y) if hardswish else y


# FX records the call (evaluated when the traced module runs): the choice above reads x's metadata.
torch.fx.wrap("conv_hardswish")


class ConvHardswish(nn.Conv2d):
    """Inference: a folded Conv2d and the Hardswish after it (or none) as ONE oneDNN convolution
    with a fused post-op, in channels-last memory. On CPU this runs LeViT's stem about 3x faster
    than NCHW convolutions plus separate activations (42 -> 14 ms for levit_128s, batch 32, 2
    cores), and its channels-last output makes the stem's flatten(2).transpose(1, 2) contiguous.
    Where oneDNN does not apply (GPU, half precision, autograd on, ONNX export, TorchScript) it is
    Conv2d then Hardswish, in channels-last memory on CPU when the weight is stored channels-last
    (optimize_for_inference does that for bfloat16 / float16, where Inductor then runs the
    convolution and fuses the Hardswish itself). Parameter names are Conv2d's (`weight`, `bias`);
    zero padding only."""

    def __init__(self, conv: nn.Conv2d, hardswish: bool):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"ConvHardswish: the convolution must use numeric zero padding, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
            padding_mode=conv.padding_mode, device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.hardswish = hardswish

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript: the two PyTorch ops
            y = self._conv_forward(x, self.weight, self.bias)
            return nn.functional.hardswish(y) if self.hardswish else y
        return conv_hardswish(
            x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            self.hardswish,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (", hardswish" if self.hardswish else "")
