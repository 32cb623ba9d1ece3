"""Pieces every Triton backend shares: the dot with its precision switch, block sizing, whether
the kernels run in Triton's interpreter, and the device and dtype checks of `why_not`."""

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    # IEEE: fp32 products with fp32 operands (the GPU's default would be TF32). Set for fp32
    # inputs (the casts are no-ops), and for bf16 under the interpreter, whose bf16 tl.dot is
    # wrong (bf16 x bf16 products are exact in fp32, so only the summation order differs).
    if IEEE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


def interpreted() -> bool:
    # TRITON_INTERPRET is read when @triton.jit runs (at this module's import, which precedes
    # every kernel module's), not per call.
    return type(dot).__name__ == "InterpretedFunction"


def pow2(n: int, cap: Optional[int] = None) -> int:
    """Power of two >= max(n, 16) (the GPU's minimum dot size), optionally capped (cap >= 16)."""
    p = max(16, triton.next_power_of_2(max(int(n), 1)))
    return min(p, cap) if cap else p


def fp32_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels' dots take fp32 operands (see dot)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted())


def device_reasons(module: str, tensors: Sequence[Tuple[str, Tensor]], dtype: torch.dtype,
                   bf16_needs_sm80: bool = True) -> List[str]:
    """why_not's device part: one device, CUDA (or CPU under the interpreter), and bf16 dots
    only from compute capability 8.0 (kernels without dots pass bf16_needs_sm80=False)."""
    reasons = []
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors on different devices {sorted(str(d) for d in devices)}")
    device = tensors[0][1].device
    if device.type == "cuda":
        if (bf16_needs_sm80 and not interpreted() and dtype == torch.bfloat16
                and torch.cuda.get_device_capability(device) < (8, 0)):
            reasons.append("bfloat16 dots need a GPU of compute capability >= 8.0")
    elif not interpreted():
        reasons.append(
            f"tensors on {device.type}: Triton runs on CUDA GPUs (or on CPU with TRITON_INTERPRET=1 "
            f"set before fastvit_kernels.triton.{module} is imported)"
        )
    return reasons


def dtype_reasons(dtype: torch.dtype, head_width: Optional[int] = None, max_head_dim: int = 0) -> List[str]:
    """why_not's kernel limits: a supported float dtype and, for attention, a head width (the
    widest of q's and v's last dimensions) up to max_head_dim. Shapes, ranks and matching dtypes
    are the op's own input checks (ops/<op>.py), which run before any backend is chosen."""
    reasons = []
    if dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {dtype} (supported: float32, bfloat16, float16)")
    if head_width is not None and head_width > max_head_dim:
        reasons.append(f"head width {head_width} > {max_head_dim}")
    return reasons
